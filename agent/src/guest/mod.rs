//! Guest control: FreezeFilesystems / ThawFilesystems with a thaw guard
//! ([`freeze`]), Reboot / Shutdown delivered before the init system is asked
//! ([`power`]), the filesystem report of the check-in inventory and
//! TrimFilesystems ([`fsreport`]).
//!
//! The ioctls are made through `nix::libc` (no crate of their own): the
//! static binary has a 2.2 MB budget.
// Refusals are `JobResult`s, as in `jobs::parse_params`.
#![allow(clippy::result_large_err)]
pub mod freeze;
pub mod fsreport;
pub mod power;

use crate::protocol::JobResult;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The parameters object of `op`, refusing keys outside `allowed`.
/// Parsed by hand rather than with serde derives: each derived parameter
/// type costs kilobytes of the 2.2 MB budget.
pub(crate) fn params<'a>(
    op: &str,
    p: &'a serde_json::Value,
    allowed: &[&str],
) -> Result<Option<&'a serde_json::Map<String, serde_json::Value>>, JobResult> {
    match p {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::Object(m) => match m.keys().find(|k| !allowed.contains(&k.as_str())) {
            Some(k) => Err(bad(op, k, &format!("unknown field, expected one of {}", allowed.join(", ")))),
            None => Ok(Some(m)),
        },
        _ => Err(JobResult::refused(format!("invalid parameters for {op}: expected an object"))),
    }
}

fn bad(op: &str, field: &str, what: &str) -> JobResult {
    JobResult::refused(format!("invalid parameters for {op}: field `{field}`: {what}"))
}

/// An optional non-negative integer field.
pub(crate) fn opt_u64(
    op: &str,
    m: Option<&serde_json::Map<String, serde_json::Value>>,
    k: &str,
) -> Result<Option<u64>, JobResult> {
    match m.and_then(|m| m.get(k)) {
        None => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| bad(op, k, &format!("expected a non-negative integer, got {v}"))),
    }
}

/// The optional `mount_points` list of strings.
pub(crate) fn mount_points(
    op: &str,
    m: Option<&serde_json::Map<String, serde_json::Value>>,
) -> Result<Option<Vec<String>>, JobResult> {
    let Some(v) = m.and_then(|m| m.get("mount_points")) else { return Ok(None) };
    let list = v.as_array().ok_or_else(|| bad(op, "mount_points", "expected a list of strings"))?;
    let mut out = Vec::new();
    for x in list {
        out.push(x.as_str().ok_or_else(|| bad(op, "mount_points", "expected a list of strings"))?.to_string());
    }
    if out.is_empty() {
        return Err(JobResult::refused("mount_points is empty: name at least one, or leave it out for all"));
    }
    Ok(Some(out))
}

/// Virtual, pseudo and network filesystem types: never frozen or trimmed,
/// refused when named, left out of the filesystem report.
const VIRTUAL_OR_NETWORK: &[&str] = &[
    "proc",
    "sysfs",
    "tmpfs",
    "devtmpfs",
    "devpts",
    "ramfs",
    "cgroup",
    "cgroup2",
    "securityfs",
    "debugfs",
    "tracefs",
    "pstore",
    "bpf",
    "configfs",
    "fusectl",
    "mqueue",
    "hugetlbfs",
    "autofs",
    "binfmt_misc",
    "efivarfs",
    "rpc_pipefs",
    "nsfs",
    "selinuxfs",
    "overlay",
    "squashfs",
    "iso9660",
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "smbfs",
    "9p",
    "ceph",
    "glusterfs",
    "afs",
    "virtiofs",
    "xenfs",
    "sshfs",
    "lustre",
    "gfs2",
    "ocfs2",
];

/// Whether a filesystem type is virtual or on the network.
pub fn is_virtual_or_network(fstype: &str) -> bool {
    VIRTUAL_OR_NETWORK.contains(&fstype) || fstype.starts_with("fuse") || fstype.starts_with("nfs")
}

/// A mount the guest operations may act on: a local filesystem on a device node.
pub fn is_local(m: &crate::disk::mount::Mount) -> bool {
    m.source.starts_with("/dev/") && !is_virtual_or_network(&m.fstype)
}

/// What an operation acts on, one entry per filesystem with its `st_dev`:
/// the named mount points (each must be a mount point of a local,
/// device-backed filesystem, else `refused` naming it, before anything is
/// done), or every local filesystem.
pub(crate) fn targets(named: &Option<Vec<String>>) -> Result<Vec<(crate::disk::mount::Mount, u64)>, JobResult> {
    use std::os::unix::fs::MetadataExt;
    let mounts = crate::disk::mount::mounts().map_err(|e| JobResult::failed(format!("{e:#}")))?;
    let list: Vec<&crate::disk::mount::Mount> = match named {
        None => mounts.iter().filter(|m| is_local(m)).collect(),
        Some(names) => {
            let mut v = Vec::new();
            for mp in names {
                let m = mount_at(&mounts, mp)
                    .ok_or_else(|| JobResult::refused(format!("{mp} is not a mount point; nothing was done")))?;
                if !is_local(m) {
                    return Err(JobResult::refused(format!(
                        "{mp} is a {} filesystem ({}): virtual and network filesystems are refused; nothing was done",
                        m.fstype, m.source
                    )));
                }
                v.push(m);
            }
            v
        }
    };
    let mut out: Vec<(crate::disk::mount::Mount, u64)> = Vec::new();
    for m in list {
        if let Ok(md) = std::fs::metadata(&m.mount_point) {
            if !out.iter().any(|x| x.1 == md.dev()) {
                out.push((m.clone(), md.dev()));
            }
        }
    }
    Ok(out)
}

/// The topmost mount at exactly `path` (after resolving symlinks and `..`).
pub fn mount_at<'a>(mounts: &'a [crate::disk::mount::Mount], path: &str) -> Option<&'a crate::disk::mount::Mount> {
    let p = std::fs::canonicalize(path).ok()?;
    let p = p.to_string_lossy();
    mounts.iter().rev().find(|m| m.mount_point == p)
}

/// Depth of a mount point (`/` is 0, `/a/b` is 2): freeze deepest first.
pub fn depth(mp: &str) -> usize {
    mp.split('/').filter(|c| !c.is_empty()).count()
}

/// A path as a C string (mount points never hold NUL).
pub(crate) fn cpath(p: &str) -> CString {
    CString::new(Path::new(p).as_os_str().as_bytes()).unwrap_or_default()
}

/// Open a mount point's root directory read-only for an ioctl.
pub(crate) fn open_dir(p: &str) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let c = cpath(p);
    // SAFETY: a valid NUL-terminated path; the fd is owned by the result.
    let fd =
        unsafe { nix::libc::open(c.as_ptr(), nix::libc::O_RDONLY | nix::libc::O_DIRECTORY | nix::libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just opened and is not owned elsewhere.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    #[test]
    fn classifies_filesystem_types() {
        for t in ["proc", "sysfs", "tmpfs", "nfs", "nfs4", "cifs", "fuse.sshfs", "9p", "overlay"] {
            assert!(super::is_virtual_or_network(t), "{t}");
        }
        for t in ["ext4", "xfs", "btrfs", "vfat", "ext3"] {
            assert!(!super::is_virtual_or_network(t), "{t}");
        }
        assert_eq!(super::depth("/"), 0);
        assert_eq!(super::depth("/var/lib"), 2);
    }
}
