//! Block devices as the kernel describes them in sysfs: names, device
//! numbers, partition numbers, parents, sizes, sector sizes, holders.
//!
//! Everything here takes its roots (`/sys`, `/dev`) from a [`Sys`] value so
//! unit tests run against a fake tree. A partition is never found by gluing a
//! number onto a disk name (`nvme0n1p1`, `loop0p1`, `xvda1` all differ): the
//! disk's sysfs directory is searched for the child whose `partition` file
//! holds the number, and a partition's disk is its parent directory.
use anyhow::{anyhow, bail, Context, Result};
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where sysfs and the device nodes live.
#[derive(Debug, Clone)]
pub struct Sys {
    pub sys: PathBuf,
    pub dev: PathBuf,
}

/// One block device (a whole disk or a partition).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// Kernel name (`loop0p1`, `xvdb`).
    pub name: String,
    /// `major:minor`.
    pub devnum: (u64, u64),
    /// Partition number, None for a whole disk.
    pub partition: Option<u32>,
    /// The whole disk's kernel name (the device itself for a disk).
    pub disk: String,
    /// Start in 512-byte units (partitions only; sysfs always counts 512).
    pub start_512: Option<u64>,
    /// Size in bytes (sysfs `size` × 512).
    pub size_bytes: u64,
    /// Logical sector size of the whole disk.
    pub logical_block_size: u64,
    pub read_only: bool,
    /// Node under /dev (from uevent DEVNAME, else the kernel name).
    pub node: PathBuf,
}

impl Block {
    pub fn is_partition(&self) -> bool {
        self.partition.is_some()
    }
}

fn read_trim(p: &Path) -> Result<String> {
    Ok(fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?.trim().to_string())
}

fn read_u64(p: &Path) -> Result<u64> {
    let s = read_trim(p)?;
    s.parse().with_context(|| format!("{} holds {s:?}, not a number", p.display()))
}

pub fn parse_devnum(s: &str) -> Option<(u64, u64)> {
    let (a, b) = s.trim().split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

impl Default for Sys {
    fn default() -> Self {
        Sys { sys: PathBuf::from("/sys"), dev: PathBuf::from("/dev") }
    }
}

impl Sys {
    pub fn new(sys: impl Into<PathBuf>, dev: impl Into<PathBuf>) -> Self {
        Sys { sys: sys.into(), dev: dev.into() }
    }

    pub fn class_dir(&self, name: &str) -> PathBuf {
        self.sys.join("class/block").join(name)
    }

    pub fn exists(&self, name: &str) -> bool {
        self.class_dir(name).exists()
    }

    /// Kernel name for a device number, through `/sys/dev/block/MAJ:MIN`.
    pub fn name_for_devnum(&self, devnum: (u64, u64)) -> Result<String> {
        let link = self.sys.join(format!("dev/block/{}:{}", devnum.0, devnum.1));
        let target =
            fs::read_link(&link).with_context(|| format!("no block device {}:{} in sysfs", devnum.0, devnum.1))?;
        target
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string)
            .ok_or_else(|| anyhow!("odd sysfs link {}", link.display()))
    }

    /// Whole disks: entries of `/sys/block`.
    pub fn disks(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.sys.join("block"))
            .map(|rd| rd.filter_map(|e| e.ok()).filter_map(|e| e.file_name().into_string().ok()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    /// The disk a partition belongs to: the parent of its sysfs directory.
    pub fn parent_disk(&self, name: &str) -> Result<String> {
        let real = fs::canonicalize(self.class_dir(name))
            .with_context(|| format!("cannot resolve sysfs directory of {name}"))?;
        real.parent()
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str())
            .map(str::to_string)
            .ok_or_else(|| anyhow!("cannot find the disk of partition {name}"))
    }

    /// Partitions the kernel knows on `disk`: (number, name), sorted by number.
    pub fn partitions(&self, disk: &str) -> Vec<(u32, String)> {
        let mut v = Vec::new();
        if let Ok(rd) = fs::read_dir(self.class_dir(disk)) {
            for e in rd.flatten() {
                let p = e.path().join("partition");
                if let Some(n) = read_u64(&p).ok().and_then(|n| u32::try_from(n).ok()) {
                    if let Ok(name) = e.file_name().into_string() {
                        v.push((n, name));
                    }
                }
            }
        }
        v.sort();
        v
    }

    /// The kernel name of partition `n` of `disk`, if the kernel knows it.
    pub fn partition_by_number(&self, disk: &str, n: u32) -> Option<String> {
        self.partitions(disk).into_iter().find(|(k, _)| *k == n).map(|(_, name)| name)
    }

    /// Devices holding this one (device-mapper, md): `holders/`.
    pub fn holders(&self, name: &str) -> Vec<String> {
        self.ls(name, "holders")
    }

    /// Devices this one is built on (device-mapper, md): `slaves/`.
    pub fn slaves(&self, name: &str) -> Vec<String> {
        self.ls(name, "slaves")
    }

    fn ls(&self, name: &str, sub: &str) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.class_dir(name).join(sub))
            .map(|rd| rd.flatten().filter_map(|e| e.file_name().into_string().ok()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    /// A device-mapper device's name and uuid (`dm/name`, `dm/uuid`; empty
    /// when unreadable or not set).
    pub fn dm(&self, name: &str) -> (String, String) {
        let d = self.class_dir(name).join("dm");
        let r = |f| read_trim(&d.join(f)).unwrap_or_default();
        (r("name"), r("uuid"))
    }

    /// Serial number where the kernel knows one (virtio `serial`, SCSI
    /// `device/serial`).
    pub fn serial(&self, disk: &str) -> Option<String> {
        for rel in ["serial", "device/serial"] {
            if let Ok(s) = read_trim(&self.class_dir(disk).join(rel)) {
                if !s.is_empty() {
                    return Some(s);
                }
            }
        }
        None
    }

    /// Everything about one device, read fresh from sysfs.
    pub fn block(&self, name: &str) -> Result<Block> {
        let dir = self.class_dir(name);
        if !dir.exists() {
            bail!("no block device named {name} in {}", self.sys.join("class/block").display());
        }
        let devnum = parse_devnum(&read_trim(&dir.join("dev"))?)
            .ok_or_else(|| anyhow!("cannot parse {}", dir.join("dev").display()))?;
        let partition = read_u64(&dir.join("partition")).ok().and_then(|n| u32::try_from(n).ok());
        let disk = if partition.is_some() { self.parent_disk(name)? } else { name.to_string() };
        let start_512 = if partition.is_some() { Some(read_u64(&dir.join("start"))?) } else { None };
        let size_bytes = read_u64(&dir.join("size"))? * 512;
        let ddir = self.class_dir(&disk);
        let logical_block_size = read_u64(&ddir.join("queue/logical_block_size")).unwrap_or(512);
        let read_only = read_trim(&dir.join("ro")).map(|s| s == "1").unwrap_or(false)
            || read_trim(&ddir.join("ro")).map(|s| s == "1").unwrap_or(false);
        let devname = fs::read_to_string(dir.join("uevent"))
            .ok()
            .and_then(|u| u.lines().find_map(|l| l.strip_prefix("DEVNAME=").map(str::to_string)))
            .unwrap_or_else(|| name.to_string());
        Ok(Block {
            name: name.to_string(),
            devnum,
            partition,
            disk,
            start_512,
            size_bytes,
            logical_block_size,
            read_only,
            node: self.dev.join(devname),
        })
    }

    /// Resolve a path the user gave (`/dev/xvdb1`, `/dev/disk/by-uuid/...`)
    /// to a block device: follow links, take the device number from the
    /// node, look it up in sysfs. `/dev/disk/by-*` links may vanish for a
    /// moment while udev handles a change, so a missing link is waited for
    /// (up to `wait`).
    pub fn resolve_path(&self, path: &Path, wait: Duration) -> Result<Block> {
        let deadline = Instant::now() + wait;
        let in_by = path.starts_with(self.dev.join("disk"));
        loop {
            match fs::metadata(path) {
                Ok(md) => {
                    if !md.file_type().is_block_device() {
                        bail!("{} is not a block device", path.display());
                    }
                    let rdev = md.rdev();
                    let devnum = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
                    let name = self.name_for_devnum(devnum)?;
                    return self.block(&name);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && in_by && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e).with_context(|| format!("cannot use device {}", path.display())),
            }
        }
    }
}

/// Wait until `cond` holds, polling every few milliseconds, for at most
/// `timeout`. Returns whether it held. No fixed sleeps: the first check is
/// immediate.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Whether `p` is a block device node right now.
pub fn is_block_node(p: &Path) -> bool {
    fs::metadata(p).map(|m| m.file_type().is_block_device()).unwrap_or(false)
}

#[cfg(test)]
pub mod fake {
    //! A fake sysfs tree for unit tests.
    use std::fs;
    use std::path::Path;

    pub fn disk(root: &Path, name: &str, devnum: &str, size512: u64, lbs: u64) {
        let d = root.join("sys/devices/virtual/block").join(name);
        fs::create_dir_all(d.join("queue")).unwrap();
        fs::create_dir_all(d.join("holders")).unwrap();
        fs::write(d.join("dev"), format!("{devnum}\n")).unwrap();
        fs::write(d.join("size"), format!("{size512}\n")).unwrap();
        fs::write(d.join("ro"), "0\n").unwrap();
        fs::write(d.join("queue/logical_block_size"), format!("{lbs}\n")).unwrap();
        fs::write(d.join("uevent"), format!("MAJOR=7\nDEVNAME={name}\nDEVTYPE=disk\n")).unwrap();
        link(root, name, &format!("../../devices/virtual/block/{name}"), devnum);
        fs::create_dir_all(root.join("sys/block")).unwrap();
        std::os::unix::fs::symlink(format!("../devices/virtual/block/{name}"), root.join("sys/block").join(name))
            .unwrap();
    }

    pub fn part(root: &Path, disk: &str, name: &str, devnum: &str, n: u32, start: u64, size512: u64) {
        let d = root.join("sys/devices/virtual/block").join(disk).join(name);
        fs::create_dir_all(d.join("holders")).unwrap();
        fs::write(d.join("dev"), format!("{devnum}\n")).unwrap();
        fs::write(d.join("partition"), format!("{n}\n")).unwrap();
        fs::write(d.join("start"), format!("{start}\n")).unwrap();
        fs::write(d.join("size"), format!("{size512}\n")).unwrap();
        fs::write(d.join("ro"), "0\n").unwrap();
        fs::write(d.join("uevent"), format!("DEVNAME={name}\nDEVTYPE=partition\n")).unwrap();
        link(root, name, &format!("../../devices/virtual/block/{disk}/{name}"), devnum);
    }

    /// A device-mapper device `dm-N` named `dm_name` with `uuid`, built on
    /// `slaves` (which list it as a holder), as the kernel shows one.
    pub fn dm(root: &Path, name: &str, devnum: &str, dm_name: &str, uuid: &str, slaves: &[&str]) {
        disk(root, name, devnum, 1 << 20, 512);
        let d = root.join("sys/devices/virtual/block").join(name);
        fs::create_dir_all(d.join("dm")).unwrap();
        fs::create_dir_all(d.join("slaves")).unwrap();
        fs::write(d.join("dm/name"), format!("{dm_name}\n")).unwrap();
        fs::write(d.join("dm/uuid"), format!("{uuid}\n")).unwrap();
        for s in slaves {
            let sd = root.join("sys/class/block").join(s);
            std::os::unix::fs::symlink(&sd, d.join("slaves").join(s)).unwrap();
            std::os::unix::fs::symlink(&d, sd.join("holders").join(name)).unwrap();
        }
    }

    fn link(root: &Path, name: &str, target: &str, devnum: &str) {
        let cb = root.join("sys/class/block");
        fs::create_dir_all(&cb).unwrap();
        std::os::unix::fs::symlink(target, cb.join(name)).unwrap();
        let db = root.join("sys/dev/block");
        fs::create_dir_all(&db).unwrap();
        std::os::unix::fs::symlink(format!("../.{target}"), db.join(devnum)).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> (tempfile::TempDir, Sys) {
        let t = tempfile::tempdir().unwrap();
        fake::disk(t.path(), "nvme0n1", "259:0", 2097152, 4096);
        fake::part(t.path(), "nvme0n1", "nvme0n1p1", "259:1", 1, 2048, 1024000);
        fake::part(t.path(), "nvme0n1", "nvme0n1p2", "259:2", 2, 1026048, 1000000);
        fake::disk(t.path(), "xvda", "202:0", 4194304, 512);
        fake::part(t.path(), "xvda", "xvda1", "202:1", 1, 2048, 4000000);
        let s = Sys::new(t.path().join("sys"), t.path().join("dev"));
        (t, s)
    }

    #[test]
    fn partition_maps_to_disk_and_number_through_sysfs() {
        let (_t, s) = tree();
        let b = s.block("nvme0n1p2").unwrap();
        assert_eq!(b.partition, Some(2));
        assert_eq!(b.disk, "nvme0n1");
        assert_eq!(b.start_512, Some(1026048));
        assert_eq!(b.size_bytes, 1000000 * 512);
        assert_eq!(b.logical_block_size, 4096);
        assert_eq!(b.node, s.dev.join("nvme0n1p2"));
        let x = s.block("xvda1").unwrap();
        assert_eq!(x.disk, "xvda");
        assert_eq!(x.logical_block_size, 512);
    }

    #[test]
    fn partition_by_number_searches_children_not_names() {
        let (_t, s) = tree();
        assert_eq!(s.partition_by_number("nvme0n1", 1).as_deref(), Some("nvme0n1p1"));
        assert_eq!(s.partition_by_number("xvda", 1).as_deref(), Some("xvda1"));
        assert_eq!(s.partition_by_number("xvda", 2), None);
        assert_eq!(s.partitions("nvme0n1").len(), 2);
    }

    #[test]
    fn devnum_lookup_and_disks() {
        let (_t, s) = tree();
        assert_eq!(s.name_for_devnum((259, 2)).unwrap(), "nvme0n1p2");
        assert!(s.name_for_devnum((9, 9)).is_err());
        assert_eq!(s.disks(), vec!["nvme0n1".to_string(), "xvda".to_string()]);
        let d = s.block("xvda").unwrap();
        assert!(!d.is_partition());
        assert_eq!(d.disk, "xvda");
    }

    #[test]
    fn wait_until_returns_at_once_when_true_and_gives_up_at_deadline() {
        let t = Instant::now();
        assert!(wait_until(Duration::from_secs(5), || true));
        assert!(t.elapsed() < Duration::from_millis(50));
        assert!(!wait_until(Duration::from_millis(30), || false));
    }

    #[test]
    fn parse_devnum_works() {
        assert_eq!(parse_devnum("7:1\n"), Some((7, 1)));
        assert_eq!(parse_devnum("x"), None);
    }
}
