//! The filesystem report of the check-in inventory (`filesystems`: each
//! mounted local filesystem with type, device, UUID, size, used, free and
//! whether it is frozen), the inventory with it (`disk::inventory` plus this
//! report: what the check-in and `xcp-vm-agent inventory` show) and
//! TrimFilesystems (`FITRIM`, bytes trimmed).
use nix::libc;
use serde_json::{json, Value};
use std::os::fd::AsRawFd;

use crate::context::JobContext;
use crate::protocol::JobResult;

const FITRIM: u64 = 0xC018_5879; // _IOWR('X', 121, struct fstrim_range)

#[repr(C)]
struct FstrimRange {
    start: u64,
    len: u64,
    minlen: u64,
}

/// UUID of the filesystem on `dev`: udev's `/dev/disk/by-uuid` links, else
/// `blkid -p` (no udev, as on a build machine).
fn uuid_of(dev: &str) -> Option<String> {
    let real = std::fs::canonicalize(dev).ok()?;
    for e in std::fs::read_dir("/dev/disk/by-uuid").into_iter().flatten().flatten() {
        if std::fs::canonicalize(e.path()).ok().as_ref() == Some(&real) {
            return Some(e.file_name().to_string_lossy().into_owned());
        }
    }
    crate::disk::fs::probe(&crate::runner::Runner::new(false), &real.to_string_lossy()).ok()?.uuid
}

/// The `filesystems` list of the inventory: each local filesystem once.
pub fn report() -> Value {
    let frozen = super::freeze::in_force();
    let mut out = Vec::new();
    for (m, dev) in super::targets(&None).unwrap_or_default() {
        let (size, free, avail) = match nix::sys::statvfs::statvfs(m.mount_point.as_str()) {
            #[allow(clippy::unnecessary_cast)] // fsblkcnt_t differs between libcs
            Ok(s) => {
                let f = s.fragment_size() as u64;
                (s.blocks() as u64 * f, s.blocks_free() as u64 * f, s.blocks_available() as u64 * f)
            }
            Err(_) => (0, 0, 0),
        };
        let until = frozen.as_ref().filter(|r| r.frozen.iter().any(|f| f.dev == dev)).map(|r| r.thaw_at);
        out.push(json!({
            "mount_point": m.mount_point,
            "type": m.fstype,
            "device": m.source,
            "uuid": uuid_of(&m.source),
            "size_bytes": size,
            "used_bytes": size.saturating_sub(free),
            "free_bytes": avail,
            "frozen": until.is_some(),
            "frozen_until": until,
        }));
    }
    Value::Array(out)
}

/// The check-in inventory (and `xcp-vm-agent inventory`'s): the disks
/// (`disk::inventory`) and [`report`] as `filesystems`.
pub fn inventory() -> anyhow::Result<Value> {
    let mut inv = crate::disk::inventory()?;
    inv["filesystems"] = report();
    Ok(inv)
}

/// TrimFilesystems.
pub fn trim(ctx: &JobContext, params: &Value) -> JobResult {
    const OP: &str = "TrimFilesystems";
    let targets = match super::params(OP, params, &["mount_points"])
        .and_then(|m| super::mount_points(OP, m))
        .and_then(|n| super::targets(&n))
    {
        Ok(x) => x,
        Err(r) => return r,
    };
    let frozen = super::freeze::in_force();
    let mut trimmed = Vec::new();
    let mut skipped = Vec::new();
    let mut total = 0u64;
    for (m, dev) in &targets {
        let mp = &m.mount_point;
        if frozen.as_ref().is_some_and(|r| r.frozen.iter().any(|f| f.dev == *dev)) {
            skipped.push(format!("{mp}: frozen"));
            continue;
        }
        if ctx.runner.dry_run() {
            ctx.runner.note(format!("FITRIM {mp}"));
            continue;
        }
        let mut range = FstrimRange { start: 0, len: u64::MAX, minlen: 0 };
        let r = super::open_dir(mp).and_then(|fd| {
            // SAFETY: FITRIM reads and updates a struct fstrim_range.
            match unsafe { libc::ioctl(fd.as_raw_fd(), FITRIM as _, &mut range as *mut FstrimRange) } {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            }
        });
        match r {
            Ok(()) => {
                total += range.len;
                trimmed.push(json!({"mount_point": mp, "bytes_trimmed": range.len}));
            }
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => skipped.push(format!("{mp}: no discard support")),
            Err(e) => skipped.push(format!("{mp}: {e}")),
        }
    }
    let details = json!({"trimmed": trimmed, "skipped": skipped, "bytes_trimmed": total});
    if trimmed.is_empty() && !ctx.runner.dry_run() {
        return JobResult::failed("no filesystem could be trimmed").with_details(details);
    }
    JobResult::succeeded(format!("trimmed {total} bytes")).with_details(details)
}

#[cfg(test)]
mod tests {
    #[test]
    fn fitrim_number_matches_linux() {
        let size = std::mem::size_of::<super::FstrimRange>() as u64;
        assert_eq!(super::FITRIM, (3u64 << 30) | (size << 16) | ((b'X' as u64) << 8) | 121);
    }
}
