//! Which block device a job means. ExtendPartition accepts a mount point, a
//! partition path, a disk path plus a partition number, a Xen VBD number or
//! a virtio serial; every form ends up as a [`Block`] found through sysfs.
//!
//! To add a form: add a variant to [`Target`], accept it in
//! [`Target::from_params`], and resolve it to a disk in [`resolve_target`].
//! Xen VBDs go through `crate::xen::vbd::resolve_vbd` (the Xen module's
//! hook, which also checks the size the backend reports).
use super::mount::Mount;
use super::sysfs::{Block, Sys};
use anyhow::{anyhow, bail, Result};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    MountPoint(String),
    /// A partition path, or a disk path (with `partition` or alone).
    Device(PathBuf, Option<u32>),
    XenVbd(u32, Option<u32>),
    Serial(String, Option<u32>),
}

impl Target {
    /// Build from the job's fields; exactly one way of naming the target.
    pub fn from_fields(
        mount_point: Option<String>,
        device: Option<String>,
        partition: Option<u32>,
        xen_vbd: Option<u32>,
        serial: Option<String>,
    ) -> Result<Target, String> {
        let n = [mount_point.is_some(), device.is_some(), xen_vbd.is_some(), serial.is_some()]
            .iter()
            .filter(|x| **x)
            .count();
        if n != 1 {
            return Err("give exactly one of mount_point, device, xen_vbd, serial".into());
        }
        if let Some(mp) = mount_point {
            if partition.is_some() {
                return Err("partition goes with device, xen_vbd or serial, not mount_point".into());
            }
            if !mp.starts_with('/') {
                return Err(format!("mount_point {mp:?} is not an absolute path"));
            }
            return Ok(Target::MountPoint(mp));
        }
        if let Some(d) = device {
            if !d.starts_with('/') {
                return Err(format!("device {d:?} is not an absolute path"));
            }
            return Ok(Target::Device(PathBuf::from(d), partition));
        }
        if let Some(v) = xen_vbd {
            return Ok(Target::XenVbd(v, partition));
        }
        let s = serial.unwrap_or_default();
        if s.is_empty() || s.contains('/') {
            return Err(format!("serial {s:?} is not a valid serial"));
        }
        Ok(Target::Serial(s, partition))
    }
}

fn norm(p: &str) -> &str {
    let t = p.trim_end_matches('/');
    if t.is_empty() {
        "/"
    } else {
        t
    }
}

/// The device mounted at `mp` (the top one when mounts are stacked).
pub fn device_at_mount_point<'a>(mounts: &'a [Mount], mp: &str) -> Option<&'a Mount> {
    mounts.iter().rev().find(|m| norm(&m.mount_point) == norm(mp))
}

/// The disk with this serial: `/dev/disk/by-id/virtio-SERIAL`, else a
/// sysfs `serial` file.
pub fn disk_by_serial(sys: &Sys, serial: &str) -> Result<Block> {
    let link = sys.dev.join("disk/by-id").join(format!("virtio-{serial}"));
    if link.exists() {
        return sys.resolve_path(&link, Duration::ZERO);
    }
    for d in sys.disks() {
        if sys.serial(&d).as_deref() == Some(serial) {
            return sys.block(&d);
        }
    }
    bail!("no disk with serial {serial:?} (no {} and no sysfs serial file matches)", link.display())
}

/// From a disk and an optional partition number to the device to grow: the
/// numbered partition; without a number, the only partition, or the disk
/// itself when it holds a filesystem directly (no partitions).
pub fn pick_partition(sys: &Sys, disk: Block, partition: Option<u32>) -> Result<Block> {
    if disk.is_partition() {
        if partition.is_some() {
            bail!("{} is a partition; give partition only with a whole disk", disk.node.display());
        }
        return Ok(disk);
    }
    let parts = sys.partitions(&disk.name);
    match partition {
        Some(n) => {
            let name = sys.partition_by_number(&disk.name, n).ok_or_else(|| {
                anyhow!(
                    "{} has no partition {n} that the kernel knows (it knows: {})",
                    disk.node.display(),
                    if parts.is_empty() {
                        "none".to_string()
                    } else {
                        parts.iter().map(|(k, _)| k.to_string()).collect::<Vec<_>>().join(", ")
                    }
                )
            })?;
            sys.block(&name)
        }
        None if parts.is_empty() => Ok(disk),
        None if parts.len() == 1 => sys.block(&parts[0].1),
        None => bail!("{} has {} partitions; say which with \"partition\"", disk.node.display(), parts.len()),
    }
}

/// For targets naming a disk and a partition number: the disk and the
/// number (to re-add a partition the kernel dropped).
pub fn disk_and_number(sys: &Sys, t: &Target) -> Result<Option<(Block, u32)>> {
    let (disk, n) = match t {
        Target::Device(p, Some(n)) => (sys.resolve_path(p, Duration::ZERO)?, *n),
        Target::Serial(s, Some(n)) => (disk_by_serial(sys, s)?, *n),
        Target::XenVbd(v, Some(n)) => (sys.resolve_path(&crate::xen::vbd::resolve_vbd(*v)?, Duration::ZERO)?, *n),
        _ => return Ok(None),
    };
    Ok((!disk.is_partition()).then_some((disk, n)))
}

/// Resolve a target to the block device whose filesystem is to grow.
pub fn resolve_target(sys: &Sys, mounts: &[Mount], t: &Target) -> Result<Block> {
    match t {
        Target::MountPoint(mp) => {
            let m = device_at_mount_point(mounts, mp).ok_or_else(|| anyhow!("nothing is mounted at {mp}"))?;
            let name = sys.name_for_devnum(m.devnum)?;
            if name.starts_with("dm-") {
                bail!(
                    "{mp} is on device-mapper device {name} ({}); give the partition under it as \"device\" \
                     and the volume as \"logical_volume\"",
                    m.source
                );
            }
            sys.block(&name)
        }
        Target::Device(p, n) => {
            let b = sys.resolve_path(p, Duration::from_secs(2))?;
            pick_partition(sys, b, *n)
        }
        Target::Serial(s, n) => pick_partition(sys, disk_by_serial(sys, s)?, *n),
        Target::XenVbd(v, n) => {
            let p = crate::xen::vbd::resolve_vbd(*v)?;
            let b = sys.resolve_path(Path::new(&p), Duration::from_secs(2))?;
            pick_partition(sys, b, *n)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::sysfs::fake;
    use super::*;

    #[test]
    fn exactly_one_target_form() {
        assert!(Target::from_fields(None, None, None, None, None).is_err());
        assert!(Target::from_fields(Some("/a".into()), Some("/dev/x".into()), None, None, None).is_err());
        assert!(Target::from_fields(Some("a".into()), None, None, None, None).is_err());
        assert!(Target::from_fields(Some("/a".into()), None, Some(1), None, None).is_err());
        assert_eq!(
            Target::from_fields(None, Some("/dev/xvdb".into()), Some(1), None, None).unwrap(),
            Target::Device("/dev/xvdb".into(), Some(1))
        );
        assert_eq!(Target::from_fields(None, None, None, Some(51728), None).unwrap(), Target::XenVbd(51728, None));
        assert!(Target::from_fields(None, None, None, None, Some("../x".into())).is_err());
    }

    #[test]
    fn mount_point_lookup_takes_the_top_mount() {
        let m = |d: (u64, u64), p: &str| Mount {
            devnum: d,
            mount_point: p.into(),
            fstype: "ext4".into(),
            source: "x".into(),
        };
        let ms = vec![m((1, 1), "/data"), m((2, 2), "/"), m((3, 3), "/data")];
        assert_eq!(device_at_mount_point(&ms, "/data/").unwrap().devnum, (3, 3));
        assert!(device_at_mount_point(&ms, "/nope").is_none());
    }

    #[test]
    fn pick_partition_by_number_only_or_whole_disk() {
        let t = tempfile::tempdir().unwrap();
        fake::disk(t.path(), "vda", "253:0", 1 << 21, 512);
        fake::part(t.path(), "vda", "vda1", "253:1", 1, 2048, 1000);
        fake::part(t.path(), "vda", "vda2", "253:2", 2, 4096, 1000);
        fake::disk(t.path(), "vdb", "253:16", 1 << 21, 512);
        fake::part(t.path(), "vdb", "vdb1", "253:17", 1, 2048, 1000);
        fake::disk(t.path(), "vdc", "253:32", 1 << 21, 512);
        std::fs::write(t.path().join("sys/devices/virtual/block/vdc/serial"), "DATA1\n").unwrap();
        let s = Sys::new(t.path().join("sys"), t.path().join("dev"));
        assert_eq!(pick_partition(&s, s.block("vda").unwrap(), Some(2)).unwrap().name, "vda2");
        let e = pick_partition(&s, s.block("vda").unwrap(), None).unwrap_err().to_string();
        assert!(e.contains("2 partitions"), "{e}");
        let e = pick_partition(&s, s.block("vda").unwrap(), Some(3)).unwrap_err().to_string();
        assert!(e.contains("knows: 1, 2"), "{e}");
        assert_eq!(pick_partition(&s, s.block("vdb").unwrap(), None).unwrap().name, "vdb1");
        assert_eq!(pick_partition(&s, s.block("vdc").unwrap(), None).unwrap().name, "vdc");
        assert!(pick_partition(&s, s.block("vdb1").unwrap(), Some(1)).is_err());
        assert_eq!(disk_by_serial(&s, "DATA1").unwrap().name, "vdc");
        assert!(disk_by_serial(&s, "NOPE").is_err());
    }

    #[test]
    fn disk_and_number_only_for_a_disk_with_a_number() {
        let t = tempfile::tempdir().unwrap();
        fake::disk(t.path(), "vda", "253:0", 1 << 21, 512);
        fake::part(t.path(), "vda", "vda1", "253:1", 1, 2048, 1000);
        std::fs::write(t.path().join("sys/devices/virtual/block/vda/serial"), "DATA1\n").unwrap();
        let s = Sys::new(t.path().join("sys"), t.path().join("dev"));
        let got = |tg: Target| disk_and_number(&s, &tg).unwrap().map(|(b, n)| (b.name, n));
        assert_eq!(got(Target::Serial("DATA1".into(), Some(1))), Some(("vda".into(), 1)));
        assert_eq!(got(Target::Serial("DATA1".into(), None)), None);
        assert_eq!(got(Target::MountPoint("/".into())), None);
    }
}
