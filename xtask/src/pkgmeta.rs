//! Package metadata: the name, summary, description, maintainer, licence and
//! dependencies every package format carries, the artifact file names, and
//! the version (the workspace's). `dist` writes packages from it; `pkgtest`,
//! `repo`, `takeover`, `offlinetest` and the VM tiers find artifacts by it,
//! without depending on the packaging code.
use crate::util::root;
use anyhow::{bail, Result};

pub const NAME: &str = "xcp-vm-agent";
pub const SUMMARY: &str = "In-guest agent for XCP-ng and KVM virtual machines";
pub const DESCRIPTION: &str = "xcp-vm-agent runs inside XCP-ng and KVM virtual machines. It checks in with a \
management server over mutually authenticated HTTPS, reports the VM's identity and metrics, and runs the \
jobs it is given: extending and initialising disks and file systems, and running scripts.";
pub const MAINTAINER: &str = "xcp-vm-agent maintainers <xcp-vm-agent@example.invalid>";
pub const URL: &str = "https://example.invalid/xcp-vm-agent";
pub const LICENSE: &str = "GPL-2.0-only";

/// Tools the disk jobs run, named per distribution.
pub const DEB_DEPENDS: &str = "cloud-guest-utils, parted | gdisk, e2fsprogs, xfsprogs, util-linux (>= 2.29)";
pub const RPM_REQUIRES: &[&str] =
    &["(cloud-utils-growpart or growpart)", "(parted or gdisk)", "e2fsprogs", "xfsprogs", "util-linux"];
pub const APK_DEPENDS: &[&str] = &["cloud-utils-growpart", "parted", "sgdisk", "e2fsprogs", "xfsprogs", "util-linux"];

pub fn workspace_version() -> Result<String> {
    let text = std::fs::read_to_string(root().join("Cargo.toml"))?;
    let mut in_pkg = false;
    for line in text.lines() {
        let l = line.trim();
        if l.starts_with('[') {
            in_pkg = l == "[workspace.package]";
        } else if in_pkg && l.starts_with("version") {
            if let Some(v) = l.split('"').nth(1) {
                return Ok(v.to_string());
            }
        }
    }
    bail!("no version in [workspace.package] of Cargo.toml")
}

pub fn deb_name(version: &str) -> String {
    format!("{NAME}_{version}_amd64.deb")
}
pub fn rpm_name(version: &str) -> String {
    format!("{NAME}-{version}-1.x86_64.rpm")
}
pub fn apk_name(version: &str) -> String {
    format!("{NAME}-{version}-r0.apk")
}
pub fn tarball_name(version: &str) -> String {
    format!("{NAME}-{version}-x86_64.tar.gz")
}
