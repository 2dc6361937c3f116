//! `cargo xtask test`: every test tier, in order. CI runs exactly this.
//!
//! Tiers: formatting; unit and integration tests (real mgmt-server, real TLS
//! on loopback); the root-only loop-device tier (`XCP_TEST_ROOT=1`); the
//! packaging checks. In CI (`CI=true`) a tier that cannot run is a failure,
//! never a skip.
use crate::util::{self, cargo, in_ci, is_root, step};
use anyhow::{bail, Result};

pub fn run(args: &[String]) -> Result<()> {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!(
            "cargo xtask test [--no-setup]\n\nInstall what is missing (as root), then run: cargo fmt --check; cargo test for the\nworkspace (unit tests, integration tests against the real mgmt-server over TLS);\nthe root-only loop-device tier; the packaging checks. In CI (CI=true) a tier that\ncannot run fails the run."
        );
        return Ok(());
    }
    if !args.iter().any(|a| a == "--no-setup") {
        crate::setup::run_setup(true)?;
    }
    step("fmt: cargo fmt --check");
    util::run(cargo().args(["fmt", "--all", "--", "--check"]))?;

    step("unit and integration tests: cargo test --workspace");
    util::run(cargo().args(["test", "--workspace", "--all-targets"]))?;

    if is_root() {
        step("root tier: loop devices (XCP_TEST_ROOT=1)");
        util::run(cargo().env("XCP_TEST_ROOT", "1").args([
            "test",
            "-p",
            "vm-tests",
            "--test",
            "disk",
            "--test",
            "xen",
            "--",
            "--test-threads=1",
        ]))?;
    } else if in_ci() {
        bail!("the root-only loop-device tier cannot run: not root, and CI=true forbids skipping it");
    } else {
        eprintln!("\n    note: not root, the loop-device tier was skipped (run as root to include it)");
    }

    step("packaging checks");
    crate::pkgtest::run(&[])?;
    Ok(())
}
