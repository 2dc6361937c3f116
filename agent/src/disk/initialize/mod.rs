//! InitializeDisk: GPT label, one partition from 1 MiB to the end, a
//! filesystem, an fstab entry, a mount through that entry.
//!
//! Domain code: a typed [`InitializeRequest`] in, an [`InitializeReport`] or
//! a `Stopped` out (`crate::jobs::disk` adapts the job). The refusals that
//! need no command are pure functions of the request, sysfs and the mount
//! table ([`check_request`], [`whole_disk`], [`preflight`], in `check.rs`,
//! unit-tested on a fake `/sys`); the table and signature checks follow with probes and
//! decide a `Plan`, which [`apply`] carries out step by step.
//!
//! Everything that could make this destructive is checked first, while the
//! disk is untouched: a partition, `/` or `/boot`, holders, mounts, swap,
//! read-only, a table or any signature (also at the offset where the new
//! partition will start), the mount point, duplicates in fstab. Then each
//! step runs only if its result is not there yet, so the same job run again
//! answers `no_change`, and a run killed after any step finishes on the
//! rerun. "Ours" means: GPT with exactly one partition, starting at 1 MiB,
//! named [`PART_NAME`].
mod check;

pub use check::{
    check_mount_point, check_mount_point_on_disk, check_request, mount_options, preflight, whole_disk, Layout,
};

use super::fs;
use super::fstab::{self, Entry, Existing};
use super::lock;
use super::mount;
use super::sysfs::{is_block_node, wait_until, Block};
use super::table;
use super::{DiskError, Stopped, System};
use crate::failpoint;
use crate::runner::Runner;
use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use std::collections::BTreeSet;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// GPT partition name marking the partition as made by this agent.
pub const PART_NAME: &str = "xcp-vm-agent";

/// What to initialize, and how.
#[derive(Debug)]
pub struct InitializeRequest {
    /// The whole disk.
    pub device: String,
    /// `ext4` or `xfs`.
    pub filesystem: String,
    pub mount_point: String,
    pub label: Option<String>,
    pub mount_options: Option<String>,
    /// Overwrite what is on the disk (a table, signatures, another filesystem).
    pub force: bool,
}

/// What InitializeDisk found and did, as far as it got (also when it was
/// refused or failed). Absent fields were not reached and are left out of
/// its serialization (the job's `details`); the message and `changed` are
/// the result's own.
#[derive(Debug, Default, Serialize)]
pub struct InitializeReport {
    /// The outcome in one sentence.
    #[serde(skip)]
    pub message: String,
    /// Whether anything changed (`succeeded`) or not (`no_change`).
    #[serde(skip)]
    pub changed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    /// What `force` overwrote.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overwritten: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mount_point: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fstab_line: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fstab: Option<String>,
    /// Partition 1's node (`Some(None)`: the kernel does not show it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition: Option<Option<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filesystem_uuid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mount_method: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<Vec<&'static str>>,
}

/// A random (version 4) UUID.
pub fn random_uuid() -> Result<String> {
    let mut b = [0u8; 16];
    use std::io::Read;
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)).context("cannot read /dev/urandom")?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32]))
}

/// Name of partition 1 by the kernel's naming rule, for a dry-run plan and
/// the fstab duplicate check only (real runs read the name from sysfs).
fn predicted_part_node(disk: &Path) -> String {
    let d = disk.to_string_lossy();
    if d.ends_with(|c: char| c.is_ascii_digit()) {
        format!("{d}p1")
    } else {
        format!("{d}1")
    }
}

/// Run InitializeDisk: the report, or why it stopped with the report as
/// far as it got.
pub fn run(
    r: &Runner,
    system: &System,
    req: &InitializeRequest,
) -> Result<InitializeReport, Stopped<InitializeReport>> {
    let mut report = InitializeReport::default();
    match initialize(r, system, req, &mut report) {
        Ok(()) => Ok(report),
        Err(error) => Err(Stopped { error, report }),
    }
}

fn devnum_of(path: &str) -> Option<(u64, u64)> {
    let md = std::fs::metadata(path).ok()?;
    md.file_type().is_block_device().then(|| (nix::sys::stat::major(md.rdev()), nix::sys::stat::minor(md.rdev())))
}

/// `findmnt --verify` output as a set of "target: problem" lines (errors only).
fn findmnt_errors(out: &str) -> BTreeSet<String> {
    let mut cur = String::new();
    let mut v = BTreeSet::new();
    for l in out.lines() {
        if !l.starts_with(' ') {
            cur = l.to_string();
        } else if l.trim_start().starts_with("[E]") {
            v.insert(format!("{cur}: {}", l.trim()));
        }
    }
    v
}

/// Errors `findmnt --verify` finds in the new fstab that the old one did not
/// have. `pending_mount_point`: a mount point systemd will create when it
/// mounts the entry, whose errors (it does not exist yet) do not count.
fn added_errors<'a>(
    new: &'a BTreeSet<String>,
    old: &'a BTreeSet<String>,
    pending_mount_point: Option<&str>,
) -> Vec<&'a String> {
    let pending = pending_mount_point.map(|m| format!("{m}: "));
    new.difference(old).filter(|e| !pending.as_deref().is_some_and(|p| e.starts_with(p))).collect()
}

fn initialize(r: &Runner, system: &System, p: &InitializeRequest, d: &mut InitializeReport) -> Result<(), DiskError> {
    let refuse = |m: String| Err(DiskError::Refused(m));
    let opts = check_request(p)?;
    let mp = p.mount_point.as_str();
    let sys = &system.sys;
    let fstab_path = &system.fstab;
    let disk = match sys.resolve_path(Path::new(&p.device), Duration::from_secs(2)) {
        Ok(b) => b,
        Err(e) => return refuse(format!("{e:#}")),
    };
    let disk_node = disk.node.to_string_lossy().into_owned();
    d.disk = Some(disk_node.clone());
    whole_disk(&p.device, &disk)?;
    // Lock before looking: every check below must still hold when the disk
    // is written, and another tool following the flock convention may be
    // changing it right now.
    let _lock = lock::lock(&disk.node, Duration::from_secs(30))?;
    let mounts = mount::mounts()?;
    let swaps: Vec<(String, (u64, u64))> =
        mount::swaps().into_iter().filter_map(|sw| devnum_of(&sw).map(|dn| (sw, dn))).collect();
    let Layout { kparts, devnums, first, last } = preflight(sys, &disk, &mounts, &swaps)?;
    let name_of = |dn: (u64, u64)| devnums.iter().find(|(_, x)| *x == dn).map(|(n, _)| n.clone());
    let lbs = disk.logical_block_size;
    let tab = table::read(r, &disk_node)?;
    let ours = tab.as_ref().and_then(|t| {
        (t.label == "gpt"
            && t.partitions.len() == 1
            && t.partitions[0].number == 1
            && t.partitions[0].start == first
            && t.partitions[0].name.as_deref() == Some(PART_NAME))
        .then(|| t.partitions[0].clone())
    });
    let kernel_p1 = sys.partition_by_number(&disk.name, 1).and_then(|n| sys.block(&n).ok());
    let our_devnum = if ours.is_some() { kernel_p1.as_ref().map(|b| b.devnum) } else { None };

    // Mounted anywhere (other than our own partition at the mount point).
    let mut mounted_ok = false;
    for m in &mounts {
        if let Some(n) = name_of(m.devnum) {
            if Some(m.devnum) == our_devnum && m.mount_point == mp {
                mounted_ok = true;
                continue;
            }
            return refuse(format!("{n} is mounted at {}; refusing to touch {disk_node}", m.mount_point));
        }
    }
    // The mount point itself.
    if !mounted_ok {
        if mounts.iter().any(|m| m.mount_point == mp) {
            return refuse(format!("{mp} is already a mount point (of another device)"));
        }
        if let Err(e) = check_mount_point_on_disk(mp) {
            return refuse(e);
        }
    }

    // What is on the disk.
    let part_size_bytes = (last - first + 1) * lbs;
    let mut wipe_disk = false;
    let mut need_mkfs = true;
    let mut fs_uuid = random_uuid()?;
    let mut part_guid = random_uuid()?;
    if let Some(tp) = &ours {
        part_guid = tp.uuid.clone().unwrap_or(part_guid).to_lowercase();
        let pr = match &kernel_p1 {
            Some(b) if b.start_512.map(|s| s * 512) == Some(first * lbs) => fs::probe(r, &b.node.to_string_lossy())?,
            _ => fs::probe_at(r, &disk_node, tp.start * lbs, tp.size * lbs)?,
        };
        match (&pr.fstype, pr.ambivalent) {
            (None, false) => {}
            (Some(t), false)
                if t == &p.filesystem && (p.label.is_none() || pr.label == p.label) && pr.uuid.is_some() =>
            {
                need_mkfs = false;
                fs_uuid = pr.uuid.clone().unwrap_or_default();
            }
            _ if p.force => {}
            _ => {
                return refuse(format!(
                    "{disk_node} already has this agent's partition, holding {}; the job asks for {}{}. Use force \
                     to reformat it",
                    pr.describe(),
                    p.filesystem,
                    p.label.as_ref().map(|l| format!(" labelled {l:?}")).unwrap_or_default()
                ))
            }
        }
    } else {
        let sigs = fs::signatures(r, &disk_node)?;
        let whole = fs::probe(r, &disk_node)?;
        let what = if let Some(t) = &tab {
            Some(format!("a partition table ({}, {} partitions)", t.label, t.partitions.len()))
        } else if !whole.is_empty() || !sigs.is_empty() {
            Some(if sigs.is_empty() { whole.describe() } else { format!("signatures: {}", sigs.join(", ")) })
        } else {
            let at = fs::probe_at(r, &disk_node, first * lbs, part_size_bytes)?;
            (!at.is_empty()).then(|| format!("a leftover {} at the new partition's offset (1 MiB)", at.describe()))
        };
        if let Some(w) = what {
            if !p.force {
                return refuse(format!(
                    "{disk_node} is not empty: it has {w}. Nothing was changed; use force to overwrite it"
                ));
            }
            d.overwritten = Some(w);
            wipe_disk = true;
        }
    }

    // fstab, checked before anything changes.
    let pass = if p.filesystem == "xfs" { "0" } else { "2" };
    let entry = Entry {
        spec: format!("UUID={fs_uuid}"),
        file: mp.to_string(),
        vfstype: p.filesystem.clone(),
        mntops: opts.clone(),
        freq: "0".into(),
        passno: pass.into(),
    };
    let fstab_text = fstab::read(fstab_path)?;
    let lines = fstab::parse(&fstab_text);
    let mut paths = vec![PathBuf::from(&disk_node)];
    if let Some(b) = &kernel_p1 {
        paths.push(b.node.clone());
    }
    // The name partition 1 will get when the kernel does not know it yet:
    // a stale line naming it by path would mount the new filesystem twice.
    paths.push(PathBuf::from(predicted_part_node(&disk.node)));
    let ids = fstab::DeviceIds {
        uuid: Some(fs_uuid.clone()),
        label: p.label.clone(),
        partuuid: Some(part_guid.clone()),
        partlabel: None,
        paths,
    };
    let resolve = |s: &str| std::fs::canonicalize(s).ok();
    let existing = fstab::find_existing(&lines, &entry, &ids, &resolve);
    if let Existing::Conflict(why) = &existing {
        return refuse(format!("{}: {why}; nothing was changed", fstab_path.display()));
    }
    let line = fstab::render(&entry);
    d.mount_point = Some(mp.to_string());
    d.fstab_line = Some(line.clone());
    d.fstab = Some(fstab_path.to_string_lossy().into_owned());

    let fstab_done = matches!(existing, Existing::Identical(_));
    if ours.is_some() && !need_mkfs && fstab_done && mounted_ok {
        d.partition = Some(kernel_p1.as_ref().map(|b| b.node.to_string_lossy().into_owned()));
        d.filesystem_uuid = Some(fs_uuid);
        d.message = format!(
            "{disk_node} is already initialized: {} on partition 1, in fstab and mounted at {mp}",
            p.filesystem
        );
        return Ok(());
    }

    let plan = Plan {
        ours: ours.is_some(),
        kernel_p1,
        wipe_disk,
        need_mkfs,
        fs_uuid,
        part_guid,
        fstab_text,
        line,
        fstab_done,
        mounted_ok,
    };
    let layout = Layout { kparts, devnums, first, last };
    apply(r, system, p, &disk, &layout, plan, _lock, d)
}

/// What the inspection decided, for [`apply`]: each step runs only if its
/// result is not there yet.
struct Plan {
    /// The disk already has this agent's partition (no partitioning).
    ours: bool,
    /// Partition 1 as the kernel shows it, if it does.
    kernel_p1: Option<Block>,
    /// `force` given on a disk that is not empty: wipe it first.
    wipe_disk: bool,
    need_mkfs: bool,
    fs_uuid: String,
    part_guid: String,
    /// The fstab as read, and the line this job adds (unless `fstab_done`).
    fstab_text: String,
    line: String,
    fstab_done: bool,
    /// Partition 1 is mounted at the mount point already.
    mounted_ok: bool,
}

/// The steps that change the disk, each only when needed: table, kernel
/// view, mkfs (the lock released after it), mount point, fstab, mount.
#[allow(clippy::too_many_arguments)] // the run's context, its layout and plan, the lock it hands over
fn apply(
    r: &Runner,
    system: &System,
    p: &InitializeRequest,
    disk: &Block,
    layout: &Layout,
    plan: Plan,
    _lock: lock::DiskLock,
    d: &mut InitializeReport,
) -> Result<(), DiskError> {
    let refuse = |m: String| Err(DiskError::Refused(m));
    let Plan { ours, kernel_p1, wipe_disk, need_mkfs, fs_uuid, part_guid, fstab_text, line, fstab_done, mounted_ok } =
        plan;
    let Layout { kparts, first, last, .. } = layout;
    let (first, last) = (*first, *last);
    let (sys, fstab_path, mp) = (&system.sys, &system.fstab, p.mount_point.as_str());
    let disk_node = disk.node.to_string_lossy().into_owned();
    let lbs = disk.logical_block_size;
    let part_size_bytes = (last - first + 1) * lbs;
    let mut steps: Vec<&str> = Vec::new();
    if !ours {
        if wipe_disk {
            for (_, n) in kparts {
                r.run_ok("wipefs", &["--all", &format!("/dev/{n}")])?;
            }
            r.run_ok("wipefs", &["--all", &disk_node])?;
        }
        r.run_ok(
            "sgdisk",
            &[
                "--clear".to_string(),
                format!("--new=1:{first}:{last}"),
                "--typecode=1:8300".to_string(),
                format!("--change-name=1:{PART_NAME}"),
                format!("--partition-guid=1:{part_guid}"),
                disk_node.clone(),
            ],
        )?;
        failpoint::hit("initialize.after_partition");
        steps.push("partitioned");
    }
    // The kernel must know partition 1 as the table has it. Some kernels
    // re-read on sgdisk's request, some (without table parsers, or with a
    // partition busy) do not: tell it through BLKPG when needed.
    let part_node = if r.dry_run() {
        if !ours || kernel_p1.is_none() {
            r.run_ok("partx", &["--update", &disk_node])?;
        }
        kernel_p1
            .as_ref()
            .map(|b| b.node.to_string_lossy().into_owned())
            .unwrap_or_else(|| predicted_part_node(&disk.node))
    } else {
        let right = || {
            sys.partition_by_number(&disk.name, 1)
                .and_then(|n| sys.block(&n).ok())
                .map(|b| b.start_512 == Some(first * lbs / 512) && b.size_bytes == part_size_bytes)
                .unwrap_or(false)
        };
        let extra = sys.partitions(&disk.name).len() > 1;
        if !right() || extra {
            r.run_ok("partx", &["--update", &disk_node])?;
        }
        if !wait_until(Duration::from_secs(10), right) {
            return Err(anyhow!(
                "the kernel does not show partition 1 of {disk_node} 10 s after the table was written"
            )
            .into());
        }
        let b = sys.block(&sys.partition_by_number(&disk.name, 1).unwrap_or_default())?;
        if !wait_until(Duration::from_secs(10), || is_block_node(&b.node)) {
            return Err(anyhow!("{} did not appear within 10 s", b.node.display()).into());
        }
        b.node.to_string_lossy().into_owned()
    };
    d.partition = Some(Some(part_node.clone()));

    if need_mkfs {
        if !r.dry_run() {
            let pr = fs::probe(r, &part_node)?;
            if !pr.is_empty() {
                if !p.force {
                    return refuse(format!(
                        "the new partition {part_node} shows a leftover {}; use force to overwrite it",
                        pr.describe()
                    ));
                }
                r.run_ok("wipefs", &["--all", &part_node])?;
            }
        }
        let mut args: Vec<String> = Vec::new();
        let prog = if p.filesystem == "xfs" {
            args.extend(["-f".into(), "-q".into(), "-m".into(), format!("uuid={fs_uuid}")]);
            "mkfs.xfs"
        } else {
            args.extend(["-F".into(), "-q".into(), "-U".into(), fs_uuid.clone()]);
            "mkfs.ext4"
        };
        if let Some(l) = &p.label {
            args.extend(["-L".into(), l.clone()]);
        }
        args.push(part_node.clone());
        r.run_ok(prog, &args)?;
        failpoint::hit("initialize.after_mkfs");
        steps.push("formatted");
        if !r.dry_run() {
            let pr = fs::probe(r, &part_node)?;
            if pr.fstype.as_deref() != Some(p.filesystem.as_str()) || pr.uuid.as_deref() != Some(fs_uuid.as_str()) {
                return Err(anyhow!(
                    "after {prog}, {part_node} shows {} instead of {} with UUID {fs_uuid}",
                    pr.describe(),
                    p.filesystem
                )
                .into());
            }
        }
    }
    d.filesystem_uuid = Some(fs_uuid.clone());
    drop(_lock);
    if !r.dry_run() {
        udev_reprobe(r, &part_node, &fs_uuid);
    }

    // Under systemd the mount unit creates a missing mount point, in the
    // host's namespace; the service's own sandbox may see `/` read-only
    // (ProtectSystem=strict), so the agent must not try. Found by the
    // booted-VM test (docs/vm-tests.md).
    let systemd_makes_mp = mount::mounts_through_systemd(fstab_path) && !Path::new(mp).exists();
    if !Path::new(mp).exists() {
        if systemd_makes_mp {
            r.note(format!("{mp} does not exist: systemd creates it when it starts the mount unit"));
        } else if r.dry_run() {
            r.note(format!("mkdir -p {mp}"));
        } else {
            std::fs::create_dir_all(mp).with_context(|| format!("cannot create {mp}"))?;
        }
    }
    if !fstab_done {
        let new_text = fstab::append(&fstab_text, &line);
        if r.dry_run() {
            r.note(format!("write {} atomically, adding: {line}", fstab_path.display()));
        } else {
            let fp = fstab_path.clone();
            fstab::write_atomic(fstab_path, &new_text, |tmp| {
                let o = r.probe("findmnt", &["--verify", "--tab-file", &tmp.to_string_lossy()])?;
                if o.code == 0 {
                    return Ok(());
                }
                let new_errs = findmnt_errors(&o.stdout);
                let old_errs = if fp.exists() {
                    let o2 = r.probe("findmnt", &["--verify", "--tab-file", &fp.to_string_lossy()])?;
                    findmnt_errors(&o2.stdout)
                } else {
                    BTreeSet::new()
                };
                let added = added_errors(&new_errs, &old_errs, systemd_makes_mp.then_some(mp));
                if added.is_empty() && !new_errs.is_empty() {
                    return Ok(()); // only errors the old file had already
                }
                bail!("findmnt --verify rejects the new fstab, so it was not written: {}", o.stdout.trim())
            })?;
            failpoint::hit("initialize.after_fstab");
        }
        steps.push("added to fstab");
    }
    if !mounted_ok {
        let how = mount::mount_via_fstab(r, fstab_path, mp)?;
        d.mount_method = Some(how);
        if !r.dry_run() {
            let dn = sys.block(&sys.partition_by_number(&disk.name, 1).unwrap_or_default())?.devnum;
            let ok = wait_until(Duration::from_secs(10), || {
                mount::mounts().map(|ms| ms.iter().any(|m| m.devnum == dn && m.mount_point == mp)).unwrap_or(false)
            });
            if !ok {
                return Err(anyhow!("{part_node} is not mounted at {mp} after mounting it through fstab").into());
            }
        }
        steps.push("mounted");
    }
    d.changed = true;
    d.message = if r.dry_run() {
        format!("dry run: plan to initialize {disk_node} computed")
    } else {
        let resumed = if ours { " (finishing an earlier, interrupted run)" } else { "" };
        format!(
            "{disk_node} initialized{resumed}: {} on {part_node} (UUID {fs_uuid}), in {} and mounted at {mp}; steps: {}",
            p.filesystem,
            fstab_path.display(),
            steps.join(", ")
        )
    };
    d.steps = Some(steps);
    Ok(())
}

/// udev leaves a disk alone while someone holds its lock, as this job did
/// from the table to mkfs: systemd < 250 (Debian 11's 247, RHEL 8's 239)
/// drops those events, so the new filesystem's `/dev/disk/by-uuid` link
/// never appears and the `UUID=` mount unit fails after 90 s "Timed out
/// waiting for device" (found by the VM matrix on debian-11). Now that the
/// lock is released, ask udev to probe the partition again and give it a
/// moment to make the link (only where a udev daemon runs).
fn udev_reprobe(r: &crate::runner::Runner, part_node: &str, uuid: &str) {
    if r.run("udevadm", &["trigger", "--action=change", part_node], &[0]).is_err() {
        return;
    }
    if Path::new("/run/udev/control").exists() {
        let link = format!("/dev/disk/by-uuid/{uuid}");
        wait_until(Duration::from_secs(30), || Path::new(&link).exists());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mount_point_systemd_will_create_is_not_an_fstab_error() {
        let out = "/data\n   [E] unreachable on boot required target: No such file or directory\n\
                   /srv/x\n   [E] unreachable on boot required target: No such file or directory\n";
        let new = findmnt_errors(out);
        let old = BTreeSet::new();
        // Without systemd both are new errors; with systemd creating /data,
        // only /srv/x still counts.
        assert_eq!(added_errors(&new, &old, None).len(), 2);
        let left = added_errors(&new, &old, Some("/data"));
        assert_eq!(left.len(), 1);
        assert!(left[0].starts_with("/srv/x: "), "{left:?}");
        // A prefix of another path is not the same mount point.
        assert_eq!(added_errors(&new, &old, Some("/srv")).len(), 2);
    }

    #[test]
    fn findmnt_errors_are_keyed_by_target() {
        let out = "/nonexist\n   [E] unreachable on boot required target: No such file or directory\n   [W] x\n/ok\n";
        let e = findmnt_errors(out);
        assert_eq!(e.len(), 1);
        assert!(e.iter().next().unwrap().starts_with("/nonexist: [E]"));
    }

    #[test]
    fn predicted_names() {
        assert_eq!(predicted_part_node(Path::new("/dev/loop0")), "/dev/loop0p1");
        assert_eq!(predicted_part_node(Path::new("/dev/xvdb")), "/dev/xvdb1");
    }
}
