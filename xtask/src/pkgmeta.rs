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
/// Alpine splits e2fsprogs and xfsprogs: `resize2fs` (ExtendPartition of an
/// ext4) is in `e2fsprogs-extra`, `xfs_growfs` in `xfsprogs-extra`.
pub const APK_DEPENDS: &[&str] = &[
    "cloud-utils-growpart",
    "parted",
    "sgdisk",
    "e2fsprogs",
    "e2fsprogs-extra",
    "xfsprogs",
    "xfsprogs-extra",
    "util-linux",
];

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

#[cfg(test)]
mod tests {
    /// The tools the agent's disk jobs run, and the Alpine package that
    /// ships each (not the package named after the project: Alpine keeps
    /// the growing tools in -extra). Red before e2fsprogs-extra and
    /// xfsprogs-extra were added: ExtendPartition on Alpine would have
    /// found no resize2fs or xfs_growfs.
    #[test]
    fn the_apk_depends_on_the_alpine_packages_of_the_disk_tools() {
        for (tool, pkg) in [
            ("growpart", "cloud-utils-growpart"),
            ("mkfs.ext4", "e2fsprogs"),
            ("resize2fs", "e2fsprogs-extra"),
            ("mkfs.xfs", "xfsprogs"),
            ("xfs_growfs", "xfsprogs-extra"),
            ("sgdisk", "sgdisk"),
            ("parted", "parted"),
        ] {
            assert!(
                super::APK_DEPENDS.contains(&pkg),
                "{tool} is in Alpine's {pkg}, which the .apk does not depend on"
            );
        }
    }
}
