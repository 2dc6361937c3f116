//! `cargo xtask test`: every test tier, in order. CI runs exactly this.
//!
//! Tiers (docs/testing.md; root and CI are defined once, in
//! vm-tests/src/tier.rs): formatting; clippy with the workspace lints; the plain tier (unit and integration
//! tests: real mgmt-server, real TLS on loopback; root-only tests are
//! `#[ignore]` there); the root tier (those tests, as root, with
//! `--ignored`); the packaging checks; the signed repositories; the
//! offline install tier (`cargo xtask offline-test`); the booted-VM tier
//! (`cargo xtask vm-test`). In CI (`CI=true`) a tier that cannot run is a failure, never a
//! skip. The closing `N passed, N failed` line counts what ran: cargo's
//! passed and failed tests (ignored ones are not counted), plus one for each
//! of the packaging, repository, offline install and VM tiers that ran whole
//! (the short fuzzing run is not a count of tests); a tier that skipped part of
//! itself is named and not counted.
use crate::util::{self, cargo, in_ci, is_root, step};
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// Passed and failed test counts, summed over every `cargo test` run.
#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
}

impl Tally {
    /// Run `cargo test ...`, passing its output through, and add up its
    /// `test result:` lines (passed and failed; ignored tests did not run).
    fn cargo_test(&mut self, cmd: &mut Command) -> Result<()> {
        let line = format!("{cmd:?}");
        eprintln!("    $ {line}");
        let mut child = cmd.stdout(Stdio::piped()).spawn().with_context(|| format!("cannot start {line}"))?;
        for l in BufReader::new(child.stdout.take().unwrap()).lines() {
            let l = l?;
            println!("{l}");
            if let Some((p, f)) = parse_result(&l) {
                self.passed += p;
                self.failed += f;
            }
        }
        let st = child.wait()?;
        if !st.success() {
            println!("{} passed, {} failed", self.passed, self.failed.max(1));
            bail!("{line} failed with {st}");
        }
        Ok(())
    }
}

/// (passed, failed) from a `test result: ok. 5 passed; 0 failed; ...` line.
fn parse_result(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("test result: ")?;
    let rest = rest.trim_start_matches("ok. ").trim_start_matches("FAILED. ");
    let num = |word: &str| rest.split(';').find_map(|p| p.trim().strip_suffix(word)?.trim().parse().ok());
    Some((num(" passed")?, num(" failed")?))
}

pub fn run(args: &[String]) -> Result<()> {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!(
            "cargo xtask test [--no-setup]\n\nInstall what is missing (as root), then run: cargo fmt --check; cargo clippy with the workspace lints (-D warnings); cargo test for the\nworkspace (unit tests, integration tests against the real mgmt-server over TLS);\nevery cargo-fuzz target for 5 s; the root-only loop-device tier; the packaging checks; the signed-repository checks;\nthe booted-VM tier (QEMU, the .deb under systemd). In CI (CI=true) a tier that cannot run fails the run."
        );
        return Ok(());
    }
    if !args.iter().any(|a| a == "--no-setup") {
        crate::setup::run_setup(true)?;
    }
    step("fmt: cargo fmt --check");
    util::run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    // The workspace lints of Cargo.toml ([workspace.lints], clippy.toml):
    // every warning fails the run.
    step("clippy: cargo clippy --workspace --all-targets -- -D warnings");
    util::run(cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;

    step("ci: the cloud-image catalogue and the GitHub workflow (ci/)");
    crate::vm::catalogue_check::ci_checks(&crate::vm::scenario_names())?;

    let mut tally = Tally::default();
    let mut partial: Vec<&str> = Vec::new();
    step("plain tier: cargo test --workspace (root-only tests are ignored here)");
    tally.cargo_test(cargo().args(["test", "--workspace", "--all-targets"]))?;

    // Every cargo-fuzz target for a few seconds (the build dominates).
    // A fixed sequence (seed 1, 500,000 inputs, at most 60 s each): the
    // same inputs every run, so a red here is a bug in this tree, never luck
    // (docs/fuzzing.md: long random runs are for finding new ones).
    crate::fuzz::run(&["--seconds", "60", "--runs", "500000", "--seed", "1"].map(String::from))?;

    if is_root() {
        // Exactly the tests marked #[ignore = "root tier: ..."], so none is
        // run (and counted) twice.
        step("root tier: loop devices and mounts (the ignored root-only tests, --ignored)");
        tally.cargo_test(cargo().args([
            "test",
            "-p",
            "vm-tests",
            "--test",
            "disk",
            "--test",
            "xen",
            "--test",
            "agent_jobs",
            "--test",
            "guest",
            "--",
            "--ignored",
            "--test-threads=1",
        ]))?;
    } else if in_ci() {
        bail!("the root-only loop-device tier cannot run: not root, and CI=true forbids skipping it");
    } else {
        eprintln!("\n    note: not root, the loop-device tier was skipped (run as root to include it)");
        partial.push("root tier (not root)");
    }

    step("packaging checks");
    match crate::pkgtest::run_tier(&[]) {
        Ok(true) => tally.passed += 1,
        Ok(false) => partial.push("packaging (chroot checks need root)"),
        Err(e) => {
            println!("{} passed, {} failed", tally.passed, tally.failed + 1);
            return Err(e);
        }
    }
    step("signed repositories: apt, rpm-md and apk (cargo xtask repo --check)");
    if let Err(e) = crate::repotest::run() {
        println!("{} passed, {} failed", tally.passed, tally.failed + 1);
        return Err(e);
    }
    // Its apt checks need root; without root (outside CI) it skips them.
    if is_root() {
        tally.passed += 1;
    } else {
        partial.push("signed repositories (apt checks need root)");
    }
    // The offline install: install.sh --root / --image, uninstall.sh --root.
    if is_root() {
        step("offline install: install.sh --root / --image (cargo xtask offline-test)");
        if let Err(e) = crate::offlinetest::run(&[]) {
            println!("{} passed, {} failed", tally.passed, tally.failed + 1);
            return Err(e);
        }
        tally.passed += 1;
    } else if in_ci() {
        println!("{} passed, {} failed", tally.passed, tally.failed + 1);
        bail!("the offline install tier needs root, and CI=true forbids skipping it");
    } else {
        eprintln!("\n    note: not root, the offline install tier was skipped (run as root to include it)");
        partial.push("offline install (needs root)");
    }
    // The booted-VM tier: the .deb under a real systemd PID 1 (docs/vm-tests.md).
    if is_root() {
        step("VM matrix: the cells CI runs (cargo xtask vm-test, see docs/vm-tests.md)");
        if let Err(e) = crate::vm::run(&crate::vm::ci_args()) {
            println!("{} passed, {} failed", tally.passed, tally.failed + 1);
            return Err(e);
        }
        tally.passed += 1;
    } else if in_ci() {
        println!("{} passed, {} failed", tally.passed, tally.failed + 1);
        bail!("the booted-VM tier needs root, and CI=true forbids skipping it");
    } else {
        eprintln!("\n    note: not root, the booted-VM tier was skipped (run as root to include it)");
        partial.push("booted VM (needs root)");
    }
    // The closing line: the tests that ran, nothing else.
    if partial.is_empty() {
        step("all tiers passed");
    } else {
        step(&format!("passed, but not counted (skipped in whole or part): {}", partial.join("; ")));
    }
    println!("{} passed, {} failed", tally.passed, tally.failed);
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_cargo_test_summaries() {
        let p = super::parse_result;
        assert_eq!(
            p("test result: ok. 16 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 4s"),
            Some((16, 0))
        );
        assert_eq!(p("test result: FAILED. 3 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out"), Some((3, 1)));
        assert_eq!(p("running 3 tests"), None);
    }
}
