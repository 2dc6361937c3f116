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
    ("mkfs.btrfs", "btrfs-progs"),
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
    // The VM matrix's guest commands must parse in BusyBox ash (Alpine):
    // `busybox sh -n` in vm::pkg's checks.
    ("busybox", "busybox"),
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
    // The cloud path (cargo xtask vm-cloud): the NoCloud seed and the package
    // disk are vfat images made without mounting.
    ("mkfs.vfat", "dosfstools"),
    ("mcopy", "mtools"),
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

/// What `cargo xtask demo` needs and nothing more (no lintian, no QEMU):
/// the tools its loop-device jobs run (InitializeDisk with GPT and ext4,
/// ExtendPartition of a mounted ext4) and the ones the demo itself runs.
/// util-linux and coreutils are Essential in Debian. The test
/// `demo_packages_cover_the_tools` keeps this list true.
pub const DEMO_PACKAGES: &[(&str, &str)] = &[
    ("sfdisk", "fdisk"),
    ("sgdisk", "gdisk"),
    ("growpart", "cloud-guest-utils"),
    ("mkfs.ext4", "e2fsprogs"),
    ("resize2fs", "e2fsprogs"),
    ("e2fsck", "e2fsprogs"),
    ("losetup", "mount"),
    ("mount", "mount"),
    ("umount", "mount"),
];

pub fn missing() -> Vec<&'static str> {
    missing_of(PACKAGES)
}

fn missing_of(list: &[(&str, &'static str)]) -> Vec<&'static str> {
    let mut v: Vec<&str> = list.iter().filter(|(p, _)| !have(p)).map(|(_, d)| *d).collect();
    v.sort();
    v.dedup();
    v
}

/// Install the Debian packages of `list` whose program is missing (as root
/// with apt-get; otherwise fail with the command to run).
pub fn install_missing(list: &[(&str, &'static str)]) -> Result<()> {
    let miss = missing_of(list);
    if miss.is_empty() {
        return Ok(());
    }
    let cmd = format!("apt-get update && apt-get install -y --no-install-recommends {}", miss.join(" "));
    if !is_root() || !have("apt-get") {
        bail!("missing system packages: {}. Install them (as root on Debian/Ubuntu) with:\n    {cmd}", miss.join(" "));
    }
    step(&format!("setup: installing {}", miss.join(" ")));
    util::run(Command::new("apt-get").args(["-o", "DPkg::Lock::Timeout=600", "update", "-q"]))?;
    util::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["-o", "DPkg::Lock::Timeout=600", "install", "-y", "-q", "--no-install-recommends"])
            .args(&miss),
    )?;
    Ok(())
}

pub fn run_setup(quiet_if_done: bool) -> Result<()> {
    if missing().is_empty() {
        if !quiet_if_done {
            step("setup: every system package is already installed");
        }
    } else {
        install_missing(PACKAGES)?;
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
    // clippy, for the lint step of cargo xtask test (the workspace lints in
    // Cargo.toml); a minimal rustup profile leaves it out.
    let has_clippy = crate::util::cargo().args(["clippy", "--version"]).output().is_ok_and(|o| o.status.success());
    if !has_clippy {
        step("setup: adding the clippy component (rustup component add clippy)");
        util::run(Command::new("rustup").args(["component", "add", "clippy"]))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// Programs in `"..."` literals of a source file that are in `known`.
    fn tools_in(path: &str, known: &BTreeSet<&str>) -> BTreeSet<String> {
        let text = std::fs::read_to_string(crate::util::root().join(path)).unwrap();
        text.split('"').skip(1).step_by(2).filter(|s| known.contains(s)).map(|s| s.to_string()).collect()
    }

    /// Every tool the demo runs, or the agent runs for the demo's jobs, is
    /// in DEMO_PACKAGES or Essential; a new tool in those sources fails here
    /// until it is listed (or named as not reached by the demo).
    #[test]
    fn demo_packages_cover_the_tools() {
        const ESSENTIAL: &[&str] = &["truncate", "partx", "blockdev", "blkid", "wipefs", "findmnt"];
        // Reached only by paths the demo does not take: LVM, XFS, and
        // mounting through systemd when systemd is PID 1.
        const NOT_IN_DEMO: &[&str] = &["pvresize", "lvextend", "mkfs.xfs", "xfs_growfs", "systemctl"];
        let mut known: BTreeSet<&str> = PACKAGES.iter().map(|(p, _)| *p).collect();
        known.extend(DEMO_PACKAGES.iter().map(|(p, _)| *p));
        known.extend(ESSENTIAL);
        known.extend(NOT_IN_DEMO);
        known.extend(["mount", "umount", "losetup", "resize2fs", "e2fsck", "lvm", "xfs_admin", "tune2fs", "parted"]);
        let demo: BTreeSet<&str> = DEMO_PACKAGES.iter().map(|(p, _)| *p).chain(ESSENTIAL.iter().copied()).collect();
        let mut used = BTreeSet::new();
        used.extend(tools_in("xtask/src/demo.rs", &known));
        // Every file under agent/src/disk, its subdirectories (initialize/) too.
        let mut dirs = vec!["agent/src/disk".to_string()];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(crate::util::root().join(&d)).unwrap() {
                let e = e.unwrap();
                let path = format!("{d}/{}", e.file_name().to_string_lossy());
                if e.file_type().unwrap().is_dir() {
                    dirs.push(path);
                } else {
                    used.extend(tools_in(&path, &known));
                }
            }
        }
        assert!(used.contains("sfdisk") && used.contains("growpart"), "the scan found no tools: {used:?}");
        let uncovered: Vec<&String> =
            used.iter().filter(|t| !demo.contains(t.as_str()) && !NOT_IN_DEMO.contains(&t.as_str())).collect();
        assert!(uncovered.is_empty(), "the demo runs {uncovered:?}, which DEMO_PACKAGES does not install");
        // And nothing only other tasks need.
        for heavy in ["lintian", "rpmlint", "mmdebstrap", "qemu-system-x86", "musl-tools", "shellcheck"] {
            assert!(!DEMO_PACKAGES.iter().any(|(_, d)| *d == heavy), "the demo must not wait for {heavy}");
        }
    }
}
