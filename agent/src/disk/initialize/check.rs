//! InitializeDisk's refusals that need no command and change nothing:
//! the request alone ([`check_request`]: filesystem, mount point spelling,
//! label, mount options), what is at the mount point
//! ([`check_mount_point_on_disk`]), the disk as a whole ([`whole_disk`])
//! and what holds it ([`preflight`], pure over sysfs and the mount table,
//! unit-tested on a fake `/sys`). The probes and the steps are `mod.rs`'s.
use std::path::Path;

use super::super::mount::Mount;
use super::super::sysfs::{Block, Sys};
use super::super::table;
use super::super::DiskError;
use super::InitializeRequest;

/// Directories a data disk must never be mounted on (or under, for the
/// second list).
const SYSTEM_DIRS: &[&str] = &[
    "/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32", "/media", "/mnt", "/opt",
    "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var",
];
const SYSTEM_TREES: &[&str] = &["/boot", "/dev", "/etc", "/proc", "/run", "/sys", "/usr", "/var/lib", "/var/log"];

/// Check a mount point's spelling; the reason when it is unacceptable.
pub fn check_mount_point(mp: &str) -> Result<(), String> {
    if !mp.starts_with('/') {
        return Err(format!("mount_point {mp:?} is not an absolute path"));
    }
    if mp.chars().any(|c| c.is_control()) {
        return Err(format!("mount_point {mp:?} contains control characters"));
    }
    if mp.len() > 1 && (mp.ends_with('/') || mp.contains("//") || mp.split('/').any(|c| c == "." || c == "..")) {
        return Err(format!("mount_point {mp:?} is not normalised (no trailing /, //, . or ..)"));
    }
    if SYSTEM_DIRS.contains(&mp) {
        return Err(format!("mount_point {mp} is a system directory"));
    }
    if let Some(t) = SYSTEM_TREES.iter().find(|t| Path::new(mp).starts_with(t)) {
        return Err(format!("mount_point {mp} is inside the system directory {t}"));
    }
    Ok(())
}

/// Check what is at the mount point: a missing or empty directory, reached
/// without symbolic links. The reason when it is unacceptable.
pub fn check_mount_point_on_disk(mp: &str) -> Result<(), String> {
    match std::fs::symlink_metadata(mp) {
        Ok(md) if md.file_type().is_symlink() => return Err(format!("mount_point {mp} is a symbolic link")),
        Ok(md) if !md.is_dir() => return Err(format!("mount_point {mp} exists and is not a directory")),
        Ok(_) => {
            if std::fs::read_dir(mp).map(|mut x| x.next().is_some()).unwrap_or(true) {
                return Err(format!("mount_point {mp} is not an empty directory"));
            }
        }
        Err(_) => {}
    }
    // The deepest ancestor that exists: directories created below it are
    // created where it really is, so it must not go through a link either.
    if let Some(anc) = Path::new(mp).ancestors().skip(1).find(|a| std::fs::symlink_metadata(a).is_ok()) {
        if let Ok(c) = std::fs::canonicalize(anc) {
            if c != anc {
                return Err(format!(
                    "mount_point {mp} goes through a symbolic link ({} is {})",
                    anc.display(),
                    c.display()
                ));
            }
        }
    }
    Ok(())
}

/// Mount options with `nofail` and a device timeout added when missing.
pub fn mount_options(given: Option<&str>) -> Result<String, String> {
    let base = given.unwrap_or("defaults").trim();
    if base.is_empty() || base.chars().any(|c| c.is_whitespace() || c == '#') || base.split(',').any(str::is_empty) {
        return Err(format!("mount_options {base:?} is not a comma-separated option list"));
    }
    let mut opts: Vec<String> = base.split(',').map(str::to_string).collect();
    if !opts.iter().any(|o| o == "nofail") {
        opts.push("nofail".into());
    }
    // No `x-systemd.device-timeout=`: with `nofail` the boot does not wait
    // for the device anyway, and a short timeout (it was 30 s) gave up on a
    // disk that WAS there when udev was slow to announce it (VM matrix,
    // reboot-remount: "Timed out waiting for device", /data left unmounted).
    Ok(opts.join(","))
}

fn check_label(fs: &str, label: &str) -> Result<(), String> {
    let max = if fs == "xfs" { 12 } else { 16 };
    if label.is_empty() || label.len() > max || label.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!("label {label:?} is not valid for {fs} (1 to {max} bytes, no spaces)"));
    }
    Ok(())
}

/// The checks of the request alone (no disk looked at): the filesystem, the
/// mount point's spelling, the label; the mount options to use.
pub fn check_request(p: &InitializeRequest) -> Result<String, DiskError> {
    if p.filesystem != "ext4" && p.filesystem != "xfs" {
        return Err(DiskError::Refused(format!("filesystem {:?} is not supported (ext4 or xfs)", p.filesystem)));
    }
    check_mount_point(&p.mount_point).map_err(DiskError::Refused)?;
    if let Some(l) = &p.label {
        check_label(&p.filesystem, l).map_err(DiskError::Refused)?;
    }
    mount_options(p.mount_options.as_deref()).map_err(DiskError::Refused)
}

/// `device` (as the job named it) resolved to `disk` must be a whole,
/// writable disk. Checked before the disk lock is taken.
pub fn whole_disk(device: &str, disk: &Block) -> Result<(), DiskError> {
    if let Some(n) = disk.partition {
        return Err(DiskError::Refused(format!(
            "{device} is partition {n} of /dev/{}; InitializeDisk takes a whole disk",
            disk.disk
        )));
    }
    if disk.read_only {
        return Err(DiskError::Refused(format!("{} is read-only", disk.node.display())));
    }
    Ok(())
}

/// What the preflight found on a disk that may be initialized.
#[derive(Debug, PartialEq, Eq)]
pub struct Layout {
    /// The partitions the kernel knows on it: (number, name).
    pub kparts: Vec<(u32, String)>,
    /// The disk's and each partition's kernel name and device number.
    pub devnums: Vec<(String, (u64, u64))>,
    /// The sectors partition 1 will span (from 1 MiB to the end).
    pub first: u64,
    pub last: u64,
}

/// The checks of the disk that change nothing and run no command, made
/// while its lock is held: nothing of it holds `/` or `/boot`, is held by
/// device-mapper, LVM or RAID, or is in use as swap (`swaps`: each swap's
/// path and device number), and it is big enough for a partition. Pure over
/// sysfs (`sys`) and the given mount table, so a fake `/sys` tests it; the
/// table and what is on the disk are looked at next, with probes.
pub fn preflight(
    sys: &Sys,
    disk: &Block,
    mounts: &[Mount],
    swaps: &[(String, (u64, u64))],
) -> Result<Layout, DiskError> {
    let refuse = |m: String| Err(DiskError::Refused(m));
    let disk_node = disk.node.display();
    let kparts = sys.partitions(&disk.name);
    let mut names: Vec<String> = vec![disk.name.clone()];
    names.extend(kparts.iter().map(|(_, n)| n.clone()));
    let mut devnums = Vec::new();
    for n in &names {
        devnums.push((n.clone(), sys.block(n)?.devnum));
    }
    let name_of = |dn: (u64, u64)| devnums.iter().find(|(_, x)| *x == dn).map(|(n, _)| n.clone());
    for m in mounts {
        if let Some(n) = name_of(m.devnum) {
            if m.mount_point == "/" || m.mount_point == "/boot" {
                return refuse(format!("{disk_node} holds {} (on {n}); refusing to touch it", m.mount_point));
            }
        }
    }
    for n in &names {
        let h = sys.holders(n);
        if !h.is_empty() {
            return refuse(format!(
                "{n} is in use by {} (device-mapper, LVM or RAID holds it); refusing to touch it",
                h.join(", ")
            ));
        }
    }
    for (sw, dn) in swaps {
        if let Some(n) = name_of(*dn) {
            return refuse(format!("{n} is in use as swap ({sw}); refusing to touch it"));
        }
    }
    let Some((first, last)) = table::init_partition_range(disk.size_bytes, disk.logical_block_size) else {
        return refuse(format!("{disk_node} is too small ({} bytes) for a partition", disk.size_bytes));
    };
    Ok(Layout { kparts, devnums, first, last })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::initialize::random_uuid;

    #[test]
    fn mount_point_rules() {
        assert!(check_mount_point("/data").is_ok());
        assert!(check_mount_point("/srv/data").is_ok());
        assert!(check_mount_point("/tmp/x/y").is_ok());
        for bad in [
            "data", "/data/", "/a//b", "/a/./b", "/a/../b", "/", "/etc", "/usr", "/var", "/boot", "/etc/x", "/proc/1",
            "/run/x", "/tmp", "/a\nb",
        ] {
            assert!(check_mount_point(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn mount_point_through_a_symlinked_ancestor_is_refused() {
        // `base/link` -> `base/real`; `base/link/new/sub` does not exist
        // yet, so its parent cannot be canonicalised, but creating it
        // would follow the link (e.g. `/lib/x/y` landing in `/usr/lib`).
        let t = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(t.path()).unwrap();
        std::fs::create_dir(base.join("real")).unwrap();
        std::os::unix::fs::symlink(base.join("real"), base.join("link")).unwrap();
        let mp = base.join("link/new/sub");
        let e = check_mount_point_on_disk(mp.to_str().unwrap()).unwrap_err();
        assert!(e.contains("symbolic link"), "{e}");
        assert!(check_mount_point_on_disk(base.join("link/x").to_str().unwrap()).is_err());
        assert!(check_mount_point_on_disk(base.join("link").to_str().unwrap()).is_err());
        assert!(check_mount_point_on_disk(base.join("real/new/sub").to_str().unwrap()).is_ok());
        std::fs::write(base.join("real/f"), "x").unwrap();
        assert!(check_mount_point_on_disk(base.join("real/f").to_str().unwrap()).unwrap_err().contains("not a dir"));
        assert!(check_mount_point_on_disk(base.join("real").to_str().unwrap()).unwrap_err().contains("not an empty"));
    }

    #[test]
    fn mount_options_always_get_nofail_and_no_short_device_timeout() {
        assert_eq!(mount_options(None).unwrap(), "defaults,nofail");
        assert_eq!(mount_options(Some("noatime,nofail")).unwrap(), "noatime,nofail");
        assert_eq!(
            mount_options(Some("defaults,x-systemd.device-timeout=5s")).unwrap(),
            "defaults,x-systemd.device-timeout=5s,nofail"
        );
        assert!(mount_options(Some("a b")).is_err());
        assert!(mount_options(Some("a,,b")).is_err());
    }

    #[test]
    fn labels_and_uuids() {
        assert!(check_label("xfs", "twelve_chars").is_ok());
        assert!(check_label("xfs", "thirteen_char").is_err());
        assert!(check_label("ext4", "sixteen_chars_ok").is_ok());
        assert!(check_label("ext4", "a b").is_err());
        let u = random_uuid().unwrap();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert_ne!(u, random_uuid().unwrap());
    }

    fn req(mp: &str, fs: &str) -> InitializeRequest {
        InitializeRequest {
            device: "/dev/xvdb".into(),
            filesystem: fs.into(),
            mount_point: mp.into(),
            label: None,
            mount_options: None,
            force: false,
        }
    }

    fn refusal<T: std::fmt::Debug>(r: Result<T, DiskError>) -> String {
        match r {
            Err(DiskError::Refused(m)) => m,
            other => panic!("not a refusal: {other:?}"),
        }
    }

    #[test]
    fn preflight_on_a_fake_sys_refuses_what_is_in_use_and_plans_partition_1() {
        use crate::disk::sysfs::fake;
        let t = tempfile::tempdir().unwrap();
        // xvdb: 1 GiB, partition 1 at 1 MiB; xvdc: 1 MiB, too small; dm-0 on xvdd1.
        fake::disk(t.path(), "xvdb", "202:16", 2097152, 512);
        fake::part(t.path(), "xvdb", "xvdb1", "202:17", 1, 2048, 2095104);
        fake::disk(t.path(), "xvdc", "202:32", 2048, 512);
        fake::disk(t.path(), "xvdd", "202:48", 2097152, 512);
        fake::part(t.path(), "xvdd", "xvdd1", "202:49", 1, 2048, 2095104);
        fake::dm(t.path(), "dm-0", "253:0", "vg-lv", "LVM-x", &["xvdd1"]);
        let sys = Sys::new(t.path().join("sys"), t.path().join("dev"));
        let xvdb = sys.block("xvdb").unwrap();
        let mount = |dn: (u64, u64), mp: &str| Mount {
            devnum: dn,
            mount_point: mp.into(),
            fstype: "ext4".into(),
            source: "/dev/x".into(),
        };

        // Free: the plan is partition 1 from 1 MiB to the last usable sector
        // (GPT keeps 33 sectors at the end), and the names to check.
        let l = preflight(&sys, &xvdb, &[mount((8, 1), "/")], &[("/dev/sda2".into(), (8, 2))]).unwrap();
        assert_eq!(l.kparts, [(1, "xvdb1".to_string())]);
        assert_eq!(l.devnums, [("xvdb".to_string(), (202, 16)), ("xvdb1".to_string(), (202, 17))]);
        assert_eq!((l.first, l.last), table::init_partition_range(1 << 30, 512).unwrap());
        assert_eq!(l.first, 2048);

        // `/` or `/boot` on it, a holder, swap, too small.
        let m = refusal(preflight(&sys, &xvdb, &[mount((202, 17), "/boot")], &[]));
        assert_eq!(m, format!("{} holds /boot (on xvdb1); refusing to touch it", xvdb.node.display()));
        let m = refusal(preflight(&sys, &xvdb, &[], &[("/swapfile".into(), (202, 17))]));
        assert_eq!(m, "xvdb1 is in use as swap (/swapfile); refusing to touch it");
        let xvdd = sys.block("xvdd").unwrap();
        let m = refusal(preflight(&sys, &xvdd, &[], &[]));
        assert_eq!(m, "xvdd1 is in use by dm-0 (device-mapper, LVM or RAID holds it); refusing to touch it");
        let xvdc = sys.block("xvdc").unwrap();
        let m = refusal(preflight(&sys, &xvdc, &[], &[]));
        assert!(m.ends_with("is too small (1048576 bytes) for a partition"), "{m}");
        // Another mount of the disk is not the preflight's to refuse: it may
        // be this job's own partition at its mount point (checked with the table).
        assert!(preflight(&sys, &xvdb, &[mount((202, 17), "/data")], &[]).is_ok());

        // A partition or a read-only disk is refused before the lock.
        let m = refusal(whole_disk("/dev/xvdb1", &sys.block("xvdb1").unwrap()));
        assert_eq!(m, "/dev/xvdb1 is partition 1 of /dev/xvdb; InitializeDisk takes a whole disk");
        std::fs::write(t.path().join("sys/devices/virtual/block/xvdb/ro"), "1\n").unwrap();
        let m = refusal(whole_disk("/dev/xvdb", &sys.block("xvdb").unwrap()));
        assert_eq!(m, format!("{} is read-only", xvdb.node.display()));
        assert!(whole_disk("/dev/xvdc", &xvdc).is_ok());

        // The request alone.
        assert_eq!(check_request(&req("/data", "xfs")).unwrap(), "defaults,nofail");
        assert!(refusal(check_request(&req("/data", "btrfs"))).contains("btrfs"));
        assert!(refusal(check_request(&req("/etc", "ext4"))).contains("system directory"));
    }
}
