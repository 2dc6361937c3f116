//! Mounts and swaps as the kernel reports them (`/proc/self/mountinfo`,
//! `/proc/swaps`), and the two ways of mounting: through systemd when it is
//! PID 1 (a hardened service has its own mount namespace, where a plain
//! `mount` would be invisible to everyone else), a plain `mount` otherwise.
//! Also the private temporary mount XFS needs to grow while unmounted.
use super::sysfs::parse_devnum;
use crate::runner::Runner;
use anyhow::{anyhow, Context, Result};
use std::fs;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub devnum: (u64, u64),
    pub mount_point: String,
    pub fstype: String,
    pub source: String,
}

/// Parse `/proc/self/mountinfo` text.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    let mut v = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let Some(sep) = f.iter().position(|x| *x == "-") else { continue };
        if f.len() < 5 || f.len() < sep + 3 {
            continue;
        }
        let Some(devnum) = parse_devnum(f[2]) else { continue };
        v.push(Mount {
            devnum,
            mount_point: super::fstab::unescape(f[4]),
            fstype: f[sep + 1].to_string(),
            source: super::fstab::unescape(f[sep + 2]),
        });
    }
    v
}

pub fn mounts() -> Result<Vec<Mount>> {
    Ok(parse_mountinfo(&fs::read_to_string("/proc/self/mountinfo").context("cannot read /proc/self/mountinfo")?))
}

/// Device paths in `/proc/swaps` text.
pub fn parse_swaps(text: &str) -> Vec<String> {
    text.lines().skip(1).filter_map(|l| l.split_whitespace().next()).map(super::fstab::unescape).collect()
}

pub fn swaps() -> Vec<String> {
    fs::read_to_string("/proc/swaps").map(|t| parse_swaps(&t)).unwrap_or_default()
}

/// systemd is the init system (the sd_booted() test).
pub fn systemd_is_pid1() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// Whether mounts for entries of `fstab` go through systemd: systemd is PID 1
/// and `fstab` is the system's own. Then systemd, not the agent, creates a
/// missing mount point (the agent's sandbox may see `/` read-only).
pub fn mounts_through_systemd(fstab: &Path) -> bool {
    systemd_is_pid1() && fstab == Path::new("/etc/fstab")
}

/// Mount `mount_point` through its fstab entry. Under systemd (and with the
/// system's own fstab), reload and start the mount unit so the mount lands
/// in the host namespace; otherwise `mount --fstab PATH MOUNTPOINT`.
/// Returns how it was mounted.
pub fn mount_via_fstab(runner: &Runner, fstab: &Path, mount_point: &str) -> Result<String> {
    if mounts_through_systemd(fstab) {
        let esc = runner.probe("systemd-escape", &["--path", "--suffix=mount", mount_point])?;
        let unit = esc.stdout.trim().to_string();
        if esc.code != 0 || unit.is_empty() {
            return Err(anyhow!("systemd-escape failed for {mount_point}: {}", esc.stderr.trim()));
        }
        runner.run_ok("systemctl", &["daemon-reload"])?;
        runner.run_ok("systemctl", &["start", &unit])?;
        Ok(format!("systemd unit {unit}"))
    } else {
        let f = fstab.to_string_lossy().into_owned();
        runner.run_ok("mount", &["--fstab", &f, mount_point])?;
        Ok(if systemd_is_pid1() {
            format!("mount --fstab {f} (not the system fstab, so not through systemd)")
        } else {
            "mount (systemd is not PID 1)".to_string()
        })
    }
}

/// Directory holding the agent's private temporary mounts.
pub fn temp_mount_root(state_dir: &Path) -> PathBuf {
    state_dir.join("mnt")
}

/// A temporary mount, unmounted and removed on drop.
pub struct TempMount {
    pub dir: PathBuf,
    mounted: bool,
}

impl TempMount {
    pub fn new(runner: &Runner, state_dir: &Path, dev: &Path, fstype: &str) -> Result<TempMount> {
        let root = temp_mount_root(state_dir);
        let name = format!("grow-{}", std::process::id());
        let dir = root.join(name);
        if runner.dry_run() {
            runner.note(format!("mkdir {}", dir.display()));
        } else {
            fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let d = dir.to_string_lossy().into_owned();
        runner.run_ok("mount", &["-t", fstype, &dev.to_string_lossy(), &d]).map_err(|e| {
            let _ = fs::remove_dir(&dir);
            // The CmdError itself (no source: the same text), so a caller
            // can still downcast to it.
            anyhow::Error::new(e)
        })?;
        Ok(TempMount { dir, mounted: true })
    }

    pub fn path(&self) -> String {
        self.dir.to_string_lossy().into_owned()
    }

    pub fn finish(mut self, runner: &Runner) -> Result<()> {
        self.mounted = false;
        runner.run_ok("umount", &[&self.path()])?;
        if !runner.dry_run() {
            let _ = fs::remove_dir(&self.dir);
        }
        Ok(())
    }
}

impl Drop for TempMount {
    fn drop(&mut self) {
        if self.mounted {
            let r = Runner::new(false);
            let _ = r.run_ok("umount", &[&self.path()]);
            let _ = fs::remove_dir(&self.dir);
        }
    }
}

/// Unmount temporary mounts a killed earlier run left under `state_dir`.
pub fn clean_stale_temp_mounts(runner: &Runner, state_dir: &Path) -> Result<Vec<String>> {
    let root = temp_mount_root(state_dir);
    let root = fs::canonicalize(&root).unwrap_or(root);
    let mut done = Vec::new();
    for m in mounts()? {
        if Path::new(&m.mount_point).starts_with(&root) {
            runner.run_ok("umount", &[&m.mount_point])?;
            if !runner.dry_run() {
                let _ = fs::remove_dir(&m.mount_point);
            }
            done.push(m.mount_point);
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_parses_and_unescapes() {
        let t = "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
                 40 22 259:1 / /mnt/my\\040data rw,relatime - xfs /dev/loop0p1 rw,attr2\n\
                 41 22 0:5 / /proc rw - proc proc rw\n";
        let m = parse_mountinfo(t);
        assert_eq!(m.len(), 3);
        assert_eq!(m[1].devnum, (259, 1));
        assert_eq!(m[1].mount_point, "/mnt/my data");
        assert_eq!(m[1].fstype, "xfs");
        assert_eq!(m[1].source, "/dev/loop0p1");
    }

    #[test]
    fn swaps_parse() {
        let t = "Filename\tType\tSize\tUsed\tPriority\n/dev/xvda5 partition 1000 0 -2\n/swap\\040file file 10 0 -3\n";
        assert_eq!(parse_swaps(t), vec!["/dev/xvda5".to_string(), "/swap file".to_string()]);
    }
}
