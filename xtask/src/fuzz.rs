//! `cargo xtask fuzz`: run the `cargo fuzz` targets in `fuzz/` (the agent's
//! parsers of peer-controlled input: job, fstab, http_response,
//! xenstore_reply, config) for a bounded time each. `cargo xtask test` runs
//! each for a few seconds; docs/fuzzing.md says how to run them for hours.
//!
//! Needs the nightly toolchain and cargo-fuzz (`cargo xtask setup` installs
//! both). Built with `--sanitizer none --debug-assertions`: the targets are
//! safe Rust, so AddressSanitizer would mostly cost build time, while debug
//! assertions turn integer overflow into a crash libFuzzer reports.
use crate::util::{self, step};
use anyhow::{bail, Context, Result};
use std::process::Command;
use std::time::Instant;

pub const TARGETS: &[&str] = &["job", "fstab", "http_response", "xenstore_reply", "config"];

/// `cargo +nightly ...` in fuzz/, through rustup's `cargo` proxy (the
/// `$CARGO` xtask runs under is the stable toolchain's own binary, which
/// does not understand `+nightly`).
fn nightly() -> Command {
    let mut c = Command::new("cargo");
    c.env_remove("CARGO").env_remove("RUSTUP_TOOLCHAIN").arg("+nightly").current_dir(util::root().join("fuzz"));
    c
}

/// Whether `cargo +nightly fuzz` can run.
pub fn have_cargo_fuzz() -> bool {
    nightly().args(["fuzz", "--version"]).output().map(|o| o.status.success()).unwrap_or(false)
}

pub fn run(args: &[String]) -> Result<()> {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!(
            "cargo xtask fuzz [--seconds N] [--runs N --seed S] [TARGET...]\n\nRun each cargo-fuzz target in fuzz/ for N seconds (default 10): {}.\n\
             --runs N --seed S: a fixed sequence of N inputs from seed S (reproducible; the\n\
             seconds cap only cuts it short).\n\
             A crash stops the run; its input is in fuzz/artifacts/TARGET/ (add it as a unit test).\n\
             Needs nightly and cargo-fuzz (cargo xtask setup installs them). See docs/fuzzing.md.",
            TARGETS.join(", ")
        );
        return Ok(());
    }
    let mut seconds = 10u64;
    // With --runs and --seed the run is a fixed sequence of inputs (the same
    // binary explores the same inputs every time, and a time cap only cuts
    // it short): what `cargo xtask test` uses, so CI is never red by luck.
    let mut runs: Option<u64> = None;
    let mut seed: Option<u64> = None;
    let mut targets: Vec<String> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => {
                seconds = it.next().and_then(|s| s.parse().ok()).filter(|&s| s > 0).unwrap_or_else(|| {
                    eprintln!("--seconds needs a positive number");
                    std::process::exit(2)
                })
            }
            "--runs" => runs = Some(it.next().and_then(|s| s.parse().ok()).context("--runs needs a number")?),
            "--seed" => seed = Some(it.next().and_then(|s| s.parse().ok()).context("--seed needs a number")?),
            t if TARGETS.contains(&t) => targets.push(t.to_string()),
            other => bail!("unknown fuzz target or option {other:?}; targets: {}", TARGETS.join(", ")),
        }
    }
    if targets.is_empty() {
        targets = TARGETS.iter().map(|s| s.to_string()).collect();
    }
    if !have_cargo_fuzz() {
        bail!("cargo-fuzz or the nightly toolchain is missing: run `cargo xtask setup` (as root) first");
    }
    let flags = ["--sanitizer", "none", "--debug-assertions"];
    let t0 = Instant::now();
    step("fuzz: building the targets (cargo +nightly fuzz build)");
    util::run(nightly().args(["fuzz", "build"]).args(flags))?;
    println!("    built in {:.0} s", t0.elapsed().as_secs_f64());
    for t in &targets {
        step(&format!("fuzz: {t} for {seconds} s"));
        let corpus = util::root().join("target").join("fuzz-corpus").join(t);
        std::fs::create_dir_all(&corpus)?;
        let mut extra = vec![format!("-max_total_time={seconds}"), "-print_final_stats=1".to_string()];
        extra.extend(runs.map(|n| format!("-runs={n}")));
        extra.extend(seed.map(|n| format!("-seed={n}")));
        util::run(nightly().args(["fuzz", "run", t]).args(flags).arg(&corpus).arg("--").args(&extra))?;
    }
    Ok(())
}
