//! One definition of the test tiers for the whole workspace (docs/testing.md);
//! `xtask` includes this file by path so the test runner and the tests agree.
//!
//! - Plain tier: `cargo test --workspace`, any user, no setup beyond
//!   `cargo xtask setup`. A test that needs root and loop devices is marked
//!   `#[ignore = "root tier: ..."]` there, so it is counted as ignored, never
//!   as passed.
//! - Root tier: those tests, run as root with `--ignored` by `cargo xtask
//!   test`. Each starts with [`require_root`]: run without root it fails, it
//!   does not skip.
//! - CI: `CI=true` (or `CI=1`). Under CI anything that would skip is a
//!   failure ([`cannot_run`]).
#![allow(dead_code)]

/// Whether this is a CI run (`CI=true` or `CI=1`).
pub fn in_ci() -> bool {
    std::env::var("CI").map(|v| v == "true" || v == "1").unwrap_or(false)
}

/// Whether the effective user is root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { geteuid() == 0 }
}

extern "C" {
    fn geteuid() -> u32;
}

/// The first line of every root-tier test (they are `#[ignore]` in the
/// plain tier and run with `--ignored`): not root is a failure, not a skip.
pub fn require_root() {
    assert!(
        is_root(),
        "this is a root-tier test (loop devices): run it as root, as `cargo xtask test` does with --ignored"
    );
}

/// A case this machine cannot show (`why`): under CI a failure; elsewhere a
/// note on stderr, and the caller returns. Use only where the case is
/// covered in CI by a machine that can show it.
pub fn cannot_run(why: &str) {
    assert!(!in_ci(), "CI=true forbids skipping: {why}");
    eprintln!("note: not exercised on this machine: {why}");
}
