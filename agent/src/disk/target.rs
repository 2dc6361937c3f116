//! Which block device a job means. ExtendPartition accepts a mount point, a
//! partition path, a disk path plus a partition number, a Xen VBD number or
//! a virtio serial; every form ends up as a [`Block`] found through sysfs.
//! A mount point on a linear LVM logical volume ends up as the volume's one
//! physical volume plus `vg/lv` ([`lvm_under`]: device-mapper's `dm/name`,
//! `dm/uuid` and `slaves/`); other device-mapper devices are refused.
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

/// Resolve a target to the block device to grow and, for a mount point on
/// an LVM logical volume, that volume as `vg/lv` (the device is then its
/// physical volume).
pub fn resolve_target(sys: &Sys, mounts: &[Mount], t: &Target) -> Result<(Block, Option<String>)> {
    let b = match t {
        Target::MountPoint(mp) => {
            let m = device_at_mount_point(mounts, mp).ok_or_else(|| anyhow!("nothing is mounted at {mp}"))?;
            let name = sys.name_for_devnum(m.devnum)?;
            if name.starts_with("dm-") {
                let (b, lv) = lvm_under(sys, mp, &name)?;
                return Ok((b, Some(lv)));
            }
            sys.block(&name)?
        }
        Target::Device(p, n) => {
            let b = sys.resolve_path(p, Duration::from_secs(2))?;
            pick_partition(sys, b, *n)?
        }
        Target::Serial(s, n) => pick_partition(sys, disk_by_serial(sys, s)?, *n)?,
        Target::XenVbd(v, n) => {
            let p = crate::xen::vbd::resolve_vbd(*v)?;
            let b = sys.resolve_path(Path::new(&p), Duration::from_secs(2))?;
            pick_partition(sys, b, *n)?
        }
    };
    Ok((b, None))
}

/// Mount point `mp` is on device-mapper device `dm`: when that is a plain
/// LVM logical volume on one device, that device (its physical volume: a
/// partition, or a whole disk) and `vg/lv`. Refused, naming what it is:
/// dm-crypt, multipath and other non-LVM mappings, LVM's hidden layers,
/// an LV on another device-mapper device (thin volumes, snapshots and their
/// origins, RAID, cache, LVM on LUKS), an LV on several devices.
fn lvm_under(sys: &Sys, mp: &str, dm: &str) -> Result<(Block, String)> {
    let (name, uuid) = sys.dm(dm);
    let sl = sys.slaves(dm);
    let plain = uuid.strip_prefix("LVM-").is_some_and(|v| !v.contains('-'));
    let why = match split_dm_name(&name).filter(|_| plain) {
        _ if uuid.starts_with("CRYPT-") => "a dm-crypt (LUKS) mapping",
        _ if uuid.starts_with("mpath-") => "a multipath device",
        None => "not a plain LVM logical volume",
        Some(_) if sl.iter().any(|s| s.starts_with("dm-")) => {
            "an LVM volume on another device-mapper device (a thin volume, a snapshot or its origin, RAID, cache, \
             or LVM on LUKS)"
        }
        Some(_) if sl.len() != 1 => "a logical volume on several devices",
        Some(vl) => return Ok((sys.block(&sl[0])?, vl)),
    };
    bail!(
        "{mp} is on {dm} ({name}, built on {sl:?}): {why}; growing it by mount point is not supported, nothing was \
         changed"
    )
}

/// A device-mapper name `VG-LV` (a `-` inside either name is doubled) as
/// `vg/lv`; None for anything else (LVM's hidden
/// layers add a third part: `vg-lv-real`).
pub fn split_dm_name(n: &str) -> Option<String> {
    let t = n.replace("--", "\u{1}");
    let (vg, lv) = t.split_once('-')?;
    let ok = |x: &str| !x.is_empty() && !x.contains('-');
    (ok(vg) && ok(lv)).then(|| format!("{vg}/{lv}").replace('\u{1}', "-"))
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

    /// A fake tree of LVM layouts: `/` on vmvg/root (PV vda1), `/w` on a
    /// whole-disk PV, and the device-mapper devices that must be refused.
    fn lvm_tree() -> (tempfile::TempDir, Sys, Vec<Mount>) {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        let lvm = |s: &str| format!("LVM-{}{s}", "x".repeat(64));
        for (i, d) in ["vda", "vdb", "vdc", "vdd", "vde", "vdf", "vdg"].iter().enumerate() {
            fake::disk(r, d, &format!("253:{}", i * 16), 1 << 21, 512);
            fake::part(r, d, &format!("{d}1"), &format!("253:{}", i * 16 + 1), 1, 2048, 1 << 20);
        }
        fake::dm(r, "dm-0", "254:0", "vmvg-root", &lvm(""), &["vda1"]);
        fake::dm(r, "dm-1", "254:1", "my--vg-lv--data", &lvm(""), &["vdb"]);
        fake::dm(r, "dm-2", "254:2", "bigvg-lv", &lvm(""), &["vdc1", "vdd1"]);
        fake::dm(r, "dm-3", "254:3", "luks-1", "CRYPT-LUKS2-0123-luks-1", &["vde1"]);
        fake::dm(r, "dm-4", "254:4", "mpatha", "mpath-3600", &["vdf"]);
        fake::dm(r, "dm-5", "254:5", "tvg-pool-tpool", &lvm("-tpool"), &["vdf1"]);
        fake::dm(r, "dm-6", "254:6", "tvg-thin", &lvm(""), &["dm-5"]);
        fake::dm(r, "dm-7", "254:7", "svg-lv-real", &lvm("-real"), &["vdg1"]);
        fake::dm(r, "dm-8", "254:8", "svg-snap-cow", &lvm("-cow"), &["vdg1"]);
        fake::dm(r, "dm-9", "254:9", "svg-snap", &lvm(""), &["dm-7", "dm-8"]);
        fake::dm(r, "dm-10", "254:10", "svg-lv", &lvm(""), &["dm-7"]);
        fake::dm(r, "dm-11", "254:11", "cvg-lv", &lvm(""), &["dm-3"]);
        fake::dm(r, "dm-12", "254:12", "vmvg-root-x", &lvm(""), &["vda1"]);
        let mps = ["/", "/w", "/span", "/crypt", "/mpath", "/tpool", "/thin", "/real", "/cow", "/snap", "/origin"];
        let mut ms: Vec<Mount> = mps
            .iter()
            .enumerate()
            .map(|(i, p)| Mount {
                devnum: (254, i as u64),
                mount_point: p.to_string(),
                fstype: "xfs".into(),
                source: format!("/dev/dm-{i}"),
            })
            .collect();
        ms.push(Mount { devnum: (254, 11), mount_point: "/oncrypt".into(), fstype: "ext4".into(), source: "x".into() });
        ms.push(Mount { devnum: (254, 12), mount_point: "/odd".into(), fstype: "ext4".into(), source: "x".into() });
        ms.push(Mount { devnum: (253, 17), mount_point: "/plain".into(), fstype: "ext4".into(), source: "x".into() });
        let s = Sys::new(r.join("sys"), r.join("dev"));
        (t, s, ms)
    }

    #[test]
    fn a_mount_point_on_a_linear_lv_resolves_to_its_pv_and_the_lv() {
        let (_t, s, ms) = lvm_tree();
        let got = |mp: &str| {
            let (b, lv) = resolve_target(&s, &ms, &Target::MountPoint(mp.into())).unwrap();
            (b.name, lv)
        };
        assert_eq!(got("/"), ("vda1".into(), Some("vmvg/root".into())));
        // '-' inside a name is doubled in the dm name; a whole-disk PV is the disk.
        assert_eq!(got("/w"), ("vdb".into(), Some("my-vg/lv-data".into())));
        assert_eq!(got("/plain"), ("vdb1".into(), None));
    }

    #[test]
    fn a_mount_point_on_other_device_mapper_devices_is_refused_naming_why() {
        let (_t, s, ms) = lvm_tree();
        let err = |mp: &str| resolve_target(&s, &ms, &Target::MountPoint(mp.into())).unwrap_err().to_string();
        for (mp, want) in [
            ("/span", r#"built on ["vdc1", "vdd1"]): a logical volume on several"#),
            ("/crypt", "dm-crypt"),
            ("/mpath", "multipath"),
            ("/tpool", "not a plain"),
            ("/thin", "thin"),
            ("/real", "not a plain"),
            ("/cow", "not a plain"),
            ("/snap", "snapshot"),
            ("/origin", "snapshot"),
            ("/oncrypt", r#"built on ["dm-3"]): an LVM volume on another"#),
            ("/odd", r#"(vmvg-root-x, built on ["vda1"]): not a plain"#),
        ] {
            let e = err(mp);
            assert!(e.contains(want), "{mp}: {e}");
            assert!(e.contains(mp) && e.contains("nothing was changed"), "{mp}: {e}");
        }
    }

    #[test]
    fn dm_names_split_into_vg_and_lv() {
        assert_eq!(split_dm_name("vmvg-root").as_deref(), Some("vmvg/root"));
        assert_eq!(split_dm_name("a--b-c--d--e").as_deref(), Some("a-b/c-d-e"));
        assert_eq!(split_dm_name("vg-lv-real"), None);
        assert_eq!(split_dm_name("vg"), None);
        assert_eq!(split_dm_name("-lv"), None);
        assert_eq!(split_dm_name("vg-"), None);
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
