//! The whole-disk lock: an exclusive `flock` on the disk's node, the
//! convention systemd and udev follow (udev leaves a locked disk alone).
//! Held for the whole read-modify-write of a partition table.
//!
//! Children must not try to take it again: growpart ≥ 0.33 takes this very
//! lock itself, so the extend code releases it around growpart (see
//! `extend.rs`).
use anyhow::{bail, Context, Result};
use nix::fcntl::{Flock, FlockArg};
use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};

/// Held while alive; the kernel drops it when the process dies.
pub struct DiskLock {
    _lock: Flock<File>,
}

/// Take the exclusive lock on `node`, waiting at most `timeout` (someone
/// else, typically udev probing, may hold it for a moment).
pub fn lock(node: &Path, timeout: Duration) -> Result<DiskLock> {
    let deadline = Instant::now() + timeout;
    let mut f = File::open(node).with_context(|| format!("cannot open {} to lock it", node.display()))?;
    loop {
        match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            Ok(l) => return Ok(DiskLock { _lock: l }),
            Err((back, errno)) => {
                if errno != nix::errno::Errno::EWOULDBLOCK && errno != nix::errno::Errno::EINTR {
                    bail!("cannot lock {}: {errno}", node.display());
                }
                if Instant::now() >= deadline {
                    bail!("{} is locked by another process (waited {}s)", node.display(), timeout.as_secs());
                }
                f = back;
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_waits_then_gives_up() {
        let t = tempfile::NamedTempFile::new().unwrap();
        let _a = lock(t.path(), Duration::from_secs(1)).unwrap();
        let e = lock(t.path(), Duration::from_millis(50)).err().unwrap();
        assert!(e.to_string().contains("locked by another process"), "{e}");
    }
}
