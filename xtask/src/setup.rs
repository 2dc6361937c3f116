//! `cargo xtask setup`: install the system packages and Rust targets the
//! other tasks need. As root on Debian/Ubuntu it runs apt-get; elsewhere it
//! prints the exact command to run. Each entry names the program that proves
//! the package is there, so a machine that has everything installs nothing.
use crate::util::{self, have, is_root, step};
use anyhow::{bail, Result};
use std::process::Command;

/// (program that must exist, Debian package providing it).
pub const PACKAGES: &[(&str, &str)] = &[
    ("musl-gcc", "musl-tools"),
    ("mkfs.xfs", "xfsprogs"),
    ("mkfs.ext4", "e2fsprogs"),
    ("growpart", "cloud-guest-utils"),
    ("sgdisk", "gdisk"),
    ("parted", "parted"),
    ("sfdisk", "fdisk"),
    ("pvcreate", "lvm2"),
    ("xenstore-read", "xenstore-utils"),
    ("lintian", "lintian"),
    ("rpmlint", "rpmlint"),
    ("rpm", "rpm"),
    ("mmdebstrap", "mmdebstrap"),
    ("shellcheck", "shellcheck"),
    ("systemd-analyze", "systemd"),
    ("fakeroot", "fakeroot"),
    // Signed repositories (cargo xtask repo and its checks): rpm-md metadata
    // and a real dnf and zypper to read it.
    ("createrepo_c", "createrepo-c"),
    ("dnf", "dnf"),
    ("zypper", "zypper"),
    // The offline install tier: insserv numbers SysV links in a --root tree
    // the way the tree's update-rc.d would; qemu-img and qemu-storage-daemon
    // attach qcow2 images where there is no nbd module.
    ("insserv", "insserv"),
    ("qemu-storage-daemon", "qemu-utils"),
    // qemu-ga, the peer measured side by side in `cargo xtask bench`.
    ("qemu-ga", "qemu-guest-agent"),
    // The VM matrix report page is checked in a real headless browser.
    ("chromium", "chromium"),
    // The VM matrix forwards each guest connection to mgmt-server (QEMU guestfwd cmd:).
    ("socat", "socat"),
];

/// The workflow-schema checker, pinned.
pub const CHECK_JSONSCHEMA: &str = "check-jsonschema==0.33.0";

/// Run as `python3 -m check_jsonschema`: a pip-installed script is not always
/// on PATH (pyenv shims need a rehash), the module always is.
pub fn have_check_jsonschema() -> bool {
    Command::new("python3")
        .args(["-m", "check_jsonschema", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

pub fn missing() -> Vec<&'static str> {
    let mut v: Vec<&str> = PACKAGES.iter().filter(|(p, _)| !have(p)).map(|(_, d)| *d).collect();
    v.dedup();
    v
}

pub fn run_setup(quiet_if_done: bool) -> Result<()> {
    let miss = missing();
    if miss.is_empty() {
        if !quiet_if_done {
            step("setup: every system package is already installed");
        }
    } else {
        let cmd = format!("apt-get update && apt-get install -y --no-install-recommends {}", miss.join(" "));
        if !is_root() || !have("apt-get") {
            bail!(
                "missing system packages: {}. Install them (as root on Debian/Ubuntu) with:\n    {cmd}",
                miss.join(" ")
            );
        }
        step(&format!("setup: installing {}", miss.join(" ")));
        util::run(Command::new("apt-get").args(["-o", "DPkg::Lock::Timeout=600", "update", "-q"]))?;
        util::run(
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["-o", "DPkg::Lock::Timeout=600", "install", "-y", "-q", "--no-install-recommends"])
                .args(&miss),
        )?;
    }
    // check-jsonschema (PyPI) validates ci/github/vm-matrix.yml against the
    // GitHub workflow schema it carries (offline).
    if !have_check_jsonschema() {
        let cmd = ["-m", "pip", "install", "-q", "--disable-pip-version-check", CHECK_JSONSCHEMA];
        if is_root() || std::env::var_os("VIRTUAL_ENV").is_some() {
            step(&format!("setup: installing {CHECK_JSONSCHEMA} from PyPI"));
            util::run(Command::new("python3").args(cmd))?;
        } else {
            bail!("missing check-jsonschema; install it with: python3 {}", cmd.join(" "));
        }
    }
    // Fuzzing (cargo xtask fuzz, a short run in cargo xtask test): nightly
    // and cargo-fuzz from crates.io, built once (about 45 s of CPU).
    if !crate::fuzz::have_cargo_fuzz() {
        let has_nightly = Command::new("rustup")
            .args(["toolchain", "list"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.starts_with("nightly")))
            .unwrap_or(false);
        if !has_nightly {
            step("setup: installing the nightly Rust toolchain (for cargo fuzz)");
            util::run(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))?;
        }
        step("setup: installing cargo-fuzz from crates.io (cargo install --locked)");
        util::run(crate::util::cargo().args(["install", "--locked", "cargo-fuzz@0.13.2"]))?;
    }
    // The musl target gives a static binary that runs on glibc and musl
    // systems; without it `dist` falls back to gnu + crt-static.
    let targets = Command::new("rustup").args(["target", "list", "--installed"]).output();
    if let Ok(o) = targets {
        if !String::from_utf8_lossy(&o.stdout).contains("x86_64-unknown-linux-musl") {
            step("setup: adding the x86_64-unknown-linux-musl Rust target");
            if let Err(e) = util::run(Command::new("rustup").args(["target", "add", "x86_64-unknown-linux-musl"])) {
                eprintln!("    warning: {e:#}; builds fall back to x86_64-unknown-linux-gnu with crt-static");
            }
        }
    }
    Ok(())
}

pub fn run(args: &[String]) -> Result<()> {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("cargo xtask setup\n\nInstall the system packages (apt-get, as root) and the musl Rust target that\nthe test, demo, bench and dist tasks need (prints the command when not root),\nand cargo-mutants for `cargo xtask mutants` (not needed by `cargo xtask test`).");
        return Ok(());
    }
    run_setup(false)?;
    // Only here, not in run_setup: `cargo xtask test` must not spend minutes
    // of CI time building a tool it does not use.
    crate::mutants::ensure_cargo_mutants()
}
