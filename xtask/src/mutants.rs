//! `cargo xtask mutants [--file PATH]...`: mutation testing of the pure core
//! modules with cargo-mutants (installed on demand, never by `cargo xtask
//! test`). One cargo-mutants run per file, one after the other, so a partial
//! run still gives whole figures for the files it reached; every run shares
//! one target directory (`target/mutants/build`) so dependencies build once.
//! Writes `target/mutants/<file>/mutants.out/` per file and
//! `target/mutants/summary.md` (caught / missed / timeout / unviable per file,
//! the survivors listed). docs/testing.md keeps the figures and says why each
//! survivor that is not killed is equivalent.
use crate::util::{self, cargo, step};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The pure core modules: no I/O of their own, so a unit test can pin
/// every behaviour down. Job parameter parsing lives in jobs/mod.rs; the
/// spool and markers in state/mod.rs, the seen-jobs list in state/seen.rs.
pub const CORE: &[&str] = &[
    "agent/src/state/mod.rs",
    "agent/src/state/seen.rs",
    "agent/src/backoff.rs",
    "agent/src/config.rs",
    "agent/src/disk/fstab.rs",
    "agent/src/disk/table.rs",
    "agent/src/disk/target.rs",
    "agent/src/protocol.rs",
    "agent/src/jobs/mod.rs",
];

/// The unit tests run against a mutant of `file`: the agent's library
/// tests of the file's own module (`agent/src/disk/fstab.rs` ->
/// `disk::fstab::`; `jobs/mod.rs` -> `jobs::`). A pure module's behaviour is
/// pinned by its own tests; running the whole suite (40-70 s on a loaded
/// 2-core machine, with its network and timeout tests) for each mutant
/// would make a run take hours.
pub fn test_filter(file: &str) -> String {
    let m = file.trim_start_matches("agent/src/").trim_end_matches(".rs").trim_end_matches("/mod");
    format!("{}::", m.replace('/', "::"))
}

/// The agent's package: its unit tests are the ones that must catch a
/// mutant in its pure modules.
const PACKAGE: &str = "xcp-vm-agent";

const HELP: &str = "\
cargo xtask mutants [--file PATH]... [--list]

Mutation testing (cargo-mutants) of the agent's pure core modules, one file at a
time: each mutant is built and the agent's unit tests of that module run against it; a mutant
the tests do not catch is a behaviour no test pins down. Installs cargo-mutants
(cargo install --locked) when missing. Writes target/mutants/<file>/mutants.out
and target/mutants/summary.md. About 10 s a mutant on an idle 2-core machine.

  --file PATH   only this file (repeatable); default: every core module
  --list        list the mutants without running them
";

/// Figures of one file's run.
#[derive(Default, Debug, PartialEq)]
pub struct Figures {
    pub caught: u32,
    pub missed: u32,
    pub timeout: u32,
    pub unviable: u32,
    pub survivors: Vec<String>,
}

impl Figures {
    /// Caught (timeouts count as caught: the mutant hung the tests) over
    /// viable mutants, in percent.
    pub fn score(&self) -> f64 {
        let viable = self.caught + self.missed + self.timeout;
        if viable == 0 {
            return 100.0;
        }
        f64::from(self.caught + self.timeout) * 100.0 / f64::from(viable)
    }
}

/// Figures from cargo-mutants' `outcomes.json`.
pub fn parse_outcomes(json: &serde_json::Value) -> Figures {
    let mut f = Figures::default();
    for o in json["outcomes"].as_array().into_iter().flatten() {
        // The baseline (the unmutated tree) has scenario "Baseline".
        let Some(m) = o["scenario"].get("Mutant") else { continue };
        match o["summary"].as_str().unwrap_or("") {
            "CaughtMutant" => f.caught += 1,
            "MissedMutant" => {
                f.missed += 1;
                let line = m["span"]["start"]["line"].as_u64().unwrap_or(0);
                let func = m["function"]["function_name"].as_str().unwrap_or("?");
                let repl = m["replacement"].as_str().unwrap_or("");
                let genre = m["genre"].as_str().unwrap_or("");
                f.survivors.push(format!("line {line}: {func}: {genre} -> {repl}"));
            }
            "Timeout" => f.timeout += 1,
            "Unviable" => f.unviable += 1,
            _ => {}
        }
    }
    f
}

fn slug(file: &str) -> String {
    file.trim_start_matches("agent/src/").replace(['/', '.'], "_")
}

pub fn ensure_cargo_mutants() -> Result<()> {
    let ok = cargo().args(["mutants", "--version"]).output().map(|o| o.status.success()).unwrap_or(false);
    if !ok {
        step("mutants: installing cargo-mutants (cargo install --locked cargo-mutants, a few minutes once)");
        util::run(cargo().args(["install", "--locked", "cargo-mutants"]))?;
    }
    Ok(())
}

pub fn run(args: &[String]) -> Result<()> {
    let mut files = Vec::new();
    let mut list = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--help" | "-h" => {
                print!("{HELP}");
                return Ok(());
            }
            "--file" => files.push(it.next().context("--file needs a path")?.clone()),
            "--list" => list = true,
            other => bail!("unknown argument {other:?}\n\n{HELP}"),
        }
    }
    if files.is_empty() {
        files = CORE.iter().map(|s| s.to_string()).collect();
    }
    let root = util::root();
    for f in &files {
        if !root.join(f).is_file() {
            bail!("no such file {f} (paths are relative to the workspace root)");
        }
    }
    ensure_cargo_mutants()?;
    let out_root = root.join("target/mutants");
    std::fs::create_dir_all(&out_root)?;
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    for f in &files {
        let out = out_root.join(slug(f));
        let mut cmd = cargo();
        cmd.current_dir(&root)
            // One shared build directory: the dependencies compile once for
            // every file's copy of the tree.
            .env("CARGO_TARGET_DIR", out_root.join("build"))
            // No debug info in the mutants' builds: each mutant is one
            // incremental build of the agent, and debug info is a good part
            // of its compile and link time. The directory is mutants' own.
            .env("CARGO_PROFILE_DEV_DEBUG", "0")
            .args(["mutants", "--package", PACKAGE, "--file", f, "--jobs", "1", "--no-shuffle", "--colors", "never"]);
        let filter = test_filter(f);
        if list {
            util::run(cmd.arg("--list"))?;
            continue;
        }
        cmd.arg("--output").arg(&out).args(["--", "--lib", &filter]);
        step(&format!("mutants: {f} (tests: {filter})"));
        let t0 = Instant::now();
        // cargo-mutants exits 2 when a mutant survives, 3 on a timeout:
        // figures come from outcomes.json, not from the exit status.
        let st = cmd.status().context("cannot start cargo mutants")?;
        let secs = t0.elapsed().as_secs();
        let outcomes = out.join("mutants.out/outcomes.json");
        let fig = std::fs::read_to_string(&outcomes)
            .with_context(|| format!("cargo mutants ({st}) wrote no {}", outcomes.display()))
            .and_then(|t| Ok(parse_outcomes(&serde_json::from_str(&t)?)));
        match fig {
            Ok(fig) if fig.caught + fig.missed + fig.timeout + fig.unviable > 0 => {
                eprintln!("    {f}: {:.0} % caught ({fig:?}) in {secs} s", fig.score());
                rows.push((f.clone(), fig, secs));
                write_summary(&out_root.join("summary.md"), &rows)?;
            }
            // Go on with the other files: one failed baseline must not cost
            // the figures of the rest.
            Ok(_) => failed.push(format!("{f}: cargo mutants ({st}) tested no mutant")),
            Err(e) => failed.push(format!("{f}: {e:#}")),
        }
    }
    if list {
        return Ok(());
    }
    if !failed.is_empty() {
        bail!("no figures for:\n  {}\n(see target/mutants/<file>/mutants.out/log)", failed.join("\n  "));
    }
    let summary = out_root.join("summary.md");
    println!("{}", std::fs::read_to_string(&summary)?);
    let below: Vec<&str> = rows.iter().filter(|(_, f, _)| f.score() < 90.0).map(|(n, _, _)| n.as_str()).collect();
    if !below.is_empty() {
        bail!("below 90 % of viable mutants caught: {} (survivors in {})", below.join(", "), summary.display());
    }
    Ok(())
}

fn write_summary(path: &Path, rows: &[(String, Figures, u64)]) -> Result<()> {
    let mut s = String::from(
        "# cargo xtask mutants\n\n| file | caught | missed | timeout | unviable | caught of viable | time |\n|---|---|---|---|---|---|---|\n",
    );
    for (f, x, secs) in rows {
        s += &format!(
            "| {f} | {} | {} | {} | {} | {:.0} % | {secs} s |\n",
            x.caught,
            x.missed,
            x.timeout,
            x.unviable,
            x.score()
        );
    }
    for (f, x, _) in rows.iter().filter(|(_, x, _)| !x.survivors.is_empty()) {
        s += &format!("\n## Survivors in {f}\n\n");
        for m in &x.survivors {
            s += &format!("- {m}\n");
        }
    }
    std::fs::write(path, s).with_context(|| format!("cannot write {}", PathBuf::from(path).display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn figures_from_outcomes() {
        let mutant = |summary: &str, line: u64| {
            json!({"scenario": {"Mutant": {"function": {"function_name": "delay"}, "span": {"start": {"line": line}},
                   "replacement": "0", "genre": "FnValue"}}, "summary": summary})
        };
        let j = json!({"outcomes": [
            {"scenario": "Baseline", "summary": "Success"},
            mutant("CaughtMutant", 1), mutant("CaughtMutant", 2), mutant("MissedMutant", 7),
            mutant("Timeout", 3), mutant("Unviable", 4),
        ]});
        let f = parse_outcomes(&j);
        assert_eq!((f.caught, f.missed, f.timeout, f.unviable), (2, 1, 1, 1));
        assert_eq!(f.survivors, vec!["line 7: delay: FnValue -> 0".to_string()]);
        assert_eq!(f.score(), 75.0);
        assert_eq!(slug("agent/src/disk/fstab.rs"), "disk_fstab_rs");
        assert_eq!(test_filter("agent/src/disk/fstab.rs"), "disk::fstab::");
        assert_eq!(test_filter("agent/src/jobs/mod.rs"), "jobs::");
        assert_eq!(test_filter("agent/src/state/mod.rs"), "state::");
        assert_eq!(test_filter("agent/src/state/seen.rs"), "state::seen::");
    }

    /// A module moved or split (state.rs became state/ in 9dcf09d) must
    /// move here too, or `cargo xtask mutants` fails on a missing file.
    #[test]
    fn every_core_file_exists() {
        for f in CORE {
            assert!(util::root().join(f).is_file(), "{f} is in CORE but not in the tree");
        }
    }
}
