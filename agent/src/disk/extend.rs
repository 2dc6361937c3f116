//! ExtendPartition: grow a partition into the space after it, then its
//! filesystem (ext2/3/4, XFS) or LVM physical volume (and optionally one
//! logical volume and its filesystem). A mount point on a linear LVM
//! logical volume grows all four layers: partition, PV, LV, filesystem
//! (`target::resolve_target` finds the PV; here the VG must have only it).
//!
//! Domain code: a typed [`ExtendRequest`] in, an [`ExtendReport`] or a
//! `Stopped` out (`crate::jobs::disk` adapts the job).
//!
//! Order: resolve the target through sysfs; probe what is on it and refuse
//! what cannot be grown (LUKS, unknown) before touching anything; lock the
//! disk; read the table once (`sfdisk --json`, also rendered as the
//! `sfdisk --dump` kept in the details), refuse a partition in the way; growpart (NOCHANGE
//! is fine); tell the kernel about this one partition (`partx --update
//! --nr`, BLKPG, never a whole-table re-read) and check sysfs sees it; then
//! always the filesystem step, so a run killed between the two steps
//! finishes on the rerun. Every step is a failpoint in test builds.
use super::fs::{self, Growth};
use super::lock;
use super::mount::{self, Mount};
use super::sysfs::{wait_until, Block, Sys};
use super::table;
use super::target::{resolve_target, Target};
use super::{DiskError, Stopped, System};
use crate::failpoint;
use crate::runner::Runner;
use anyhow::{anyhow, Context, Result};
use serde::Serialize;
use std::time::Duration;

/// What to grow: the target, and optionally one logical volume (`vg/lv`)
/// to extend with its filesystem.
#[derive(Debug)]
pub struct ExtendRequest {
    pub target: Target,
    pub logical_volume: Option<String>,
}

/// What ExtendPartition found and did, as far as it got (also when it was
/// refused or failed). Absent fields were not reached and are left out of
/// its serialization (the job's `details`); the message and `changed` are
/// the result's own.
#[derive(Debug, Default, Serialize)]
pub struct ExtendReport {
    /// The outcome in one sentence.
    #[serde(skip)]
    pub message: String,
    /// Whether anything changed (`succeeded`) or not (`no_change`).
    #[serde(skip)]
    pub changed: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stale_temp_mounts_removed: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logical_sector_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition_bytes_before: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filesystem: Option<String>,
    /// Where the partition is mounted (`Some(None)`: not mounted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mount_point: Option<Option<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition_table: Option<String>,
    /// The table before any change, as `sfdisk --dump` text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub table_before: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition_growable_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition_bytes_after: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filesystem_bytes_before: Option<Option<u64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filesystem_bytes_after: Option<Option<u64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<Vec<Growth>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notes: Option<Vec<String>>,
}

/// Run ExtendPartition: the report, or why it stopped with the report as
/// far as it got.
pub fn run(r: &Runner, system: &System, req: &ExtendRequest) -> Result<ExtendReport, Stopped<ExtendReport>> {
    let mut report = ExtendReport::default();
    match extend(r, system, req, &mut report) {
        Ok(()) => Ok(report),
        Err(error) => Err(Stopped { error, report }),
    }
}

fn mount_of(mounts: &[Mount], b: &Block) -> Option<String> {
    mounts.iter().find(|m| m.devnum == b.devnum).map(|m| m.mount_point.clone())
}

fn s(p: &std::path::Path) -> String {
    p.to_string_lossy().into_owned()
}

fn valid_lv(lv: &str) -> Option<(&str, &str)> {
    let (vg, l) = lv.split_once('/')?;
    let ok = |x: &str| !x.is_empty() && x.chars().all(|c| c.is_ascii_alphanumeric() || "+_.-".contains(c));
    (ok(vg) && ok(l) && !vg.starts_with('-') && !l.starts_with('-')).then_some((vg, l))
}

/// A disk + number target whose partition is in the table but unknown to
/// the kernel (dropped by a rescan, for example after a run was killed):
/// tell the kernel about it (BLKPG) and wait for it. Returns whether it did.
fn readd_partition(r: &Runner, sys: &Sys, target: &Target) -> Result<bool> {
    let Ok(Some((disk, n))) = super::target::disk_and_number(sys, target) else { return Ok(false) };
    if sys.partition_by_number(&disk.name, n).is_some() || r.dry_run() {
        return Ok(false);
    }
    let node = s(&disk.node);
    let Some(tab) = table::read(r, &node)? else { return Ok(false) };
    if !tab.partitions.iter().any(|p| p.number == n) {
        return Ok(false);
    }
    let _l = lock::lock(&disk.node, Duration::from_secs(30))?;
    r.run_ok("partx", &["--update", "--nr", &n.to_string(), &node])?;
    let ok = wait_until(Duration::from_secs(5), || {
        sys.partition_by_number(&disk.name, n)
            .and_then(|name| sys.block(&name).ok())
            .map(|b| super::sysfs::is_block_node(&b.node))
            .unwrap_or(false)
    });
    Ok(ok)
}

fn extend(r: &Runner, system: &System, p: &ExtendRequest, d: &mut ExtendReport) -> Result<(), DiskError> {
    let sys = &system.sys;
    let target = &p.target;
    d.stale_temp_mounts_removed = mount::clean_stale_temp_mounts(r, &system.state_dir)?;
    let mounts = mount::mounts()?;
    let (part, auto_lv) = match resolve_target(sys, &mounts, target) {
        Ok(b) => b,
        Err(e) => match readd_partition(r, sys, target)? {
            true => match resolve_target(sys, &mounts, target) {
                Ok(b) => b,
                Err(e) => return Err(DiskError::Refused(format!("{e:#}"))),
            },
            false => return Err(DiskError::Refused(format!("{e:#}"))),
        },
    };
    let disk = sys.block(&part.disk)?;
    let lbs = disk.logical_block_size;
    let disk_node = s(&disk.node);
    let part_node = s(&part.node);
    d.device = Some(part_node.clone());
    d.disk = Some(disk_node.clone());
    d.disk_bytes = Some(disk.size_bytes);
    d.logical_sector_size = Some(lbs);
    d.partition_bytes_before = Some(part.size_bytes);

    // What is on it decides whether we may touch anything at all.
    let probe = fs::probe(r, &part_node)?;
    let fstype = match (&probe.fstype, probe.ambivalent) {
        (_, true) => return Err(DiskError::Refused(format!("{part_node}: {}", probe.describe()))),
        (None, _) => {
            return Err(DiskError::Refused(format!(
                "{part_node} holds no filesystem or LVM physical volume that blkid recognises; nothing to grow"
            )))
        }
        (Some(t), _) => t.clone(),
    };
    d.filesystem = Some(fstype.clone());
    match fstype.as_str() {
        "ext2" | "ext3" | "ext4" | "xfs" | "LVM2_member" => {}
        "crypto_LUKS" => {
            return Err(DiskError::Refused(format!(
                "{part_node} is a LUKS container: growing it needs `cryptsetup resize` with its key, which this \
                 agent is not given; nothing was changed"
            )))
        }
        other => {
            return Err(DiskError::Refused(format!(
                "{part_node} holds {other}, which this agent cannot grow (ext2, ext3, ext4, xfs and LVM physical \
                 volumes only); nothing was changed"
            )))
        }
    }
    // A mount point on an LV names it; an explicit logical_volume wins.
    let lv_name = p.logical_volume.clone().or(auto_lv.clone());
    let lv = match &lv_name {
        None => None,
        Some(_) if fstype != "LVM2_member" => {
            return Err(DiskError::Refused(format!(
                "logical_volume given, but {part_node} holds {fstype}, not an LVM physical volume"
            )))
        }
        Some(lv) => match valid_lv(lv) {
            Some(x) => Some(x),
            None => return Err(DiskError::Refused(format!("logical_volume {lv:?} is not of the form vg/lv"))),
        },
    };
    if let Some((vg, l)) = lv {
        // The PV's VG, and how many PVs that VG has: by mount point only a
        // VG on this one PV (lvextend would also take the others' space).
        let o = r.probe("pvs", &["--noheadings", "-o", "pv_count,vg_name", &part_node])?;
        let mut f = o.stdout.split_whitespace();
        let (n, pv_vg) = (f.next(), f.next().unwrap_or("none"));
        if pv_vg != vg {
            return Err(DiskError::Refused(format!(
                "logical volume {vg}/{l} is not in the volume group of {part_node} ({pv_vg})"
            )));
        }
        if auto_lv.is_some() && n != Some("1") {
            return Err(DiskError::Refused(format!(
                "volume group {vg} has other physical volumes than {part_node}: give the partition as \"device\" \
                 and the volume as \"logical_volume\"; nothing was changed"
            )));
        }
        let o = r.probe("lvs", &["--noheadings", "-o", "lv_name", &format!("{vg}/{l}")])?;
        if o.code != 0 {
            return Err(DiskError::Refused(format!("no logical volume {vg}/{l}: {}", o.stderr.trim())));
        }
    }
    let mp = mount_of(&mounts, &part);
    d.mount_point = Some(mp.clone());

    let mut notes: Vec<String> = Vec::new();
    let mut part_changed = false;
    let mut target_bytes = part.size_bytes;
    let mut assume_grows = false;
    if let Some(n) = part.partition {
        let mut guard = Some(lock::lock(&disk.node, Duration::from_secs(30))?);
        failpoint::hit("extend.after_lock");
        // One `sfdisk --json` gives both the table and, rendered from it,
        // the `sfdisk --dump` text kept to restore it by hand.
        let (tab, dump) =
            table::read_with_dump(r, &disk_node)?.ok_or_else(|| anyhow!("{disk_node} has no partition table"))?;
        d.partition_table = Some(tab.label.clone());
        d.table_before = Some(dump);
        let tp = tab
            .partitions
            .iter()
            .find(|x| x.number == n)
            .ok_or_else(|| anyhow!("partition {n} is not in the table of {disk_node}"))?
            .clone();
        if tab.label == "dos" && n >= 5 {
            return Err(DiskError::Refused(format!(
                "{part_node} is a logical partition inside an MBR extended partition; growing it is not supported"
            )));
        }
        // What the table says partition n should be once the kernel agrees:
        // as read, or what growpart/sfdisk just wrote (no second table read).
        let mut want_sectors = Some(tp.size);
        let disk_sectors = disk.size_bytes / lbs;
        let lim = table::grow_limit(&tab, n, disk_sectors, lbs).ok_or_else(|| anyhow!("partition {n} vanished"))?;
        d.partition_growable_bytes = Some(lim.growable_bytes);
        if let Some((bn, bnode)) = &lim.blocker {
            return Err(DiskError::Refused(format!(
                "{part_node} cannot grow in place: partition {bn} ({bnode}) follows it directly, and the {} free \
                 bytes are after that partition; move or remove {bnode} first. Nothing was changed",
                lim.free_beyond_blocker
            )));
        }
        if lim.growable_bytes > 0 {
            // growpart (cloud-utils >= 0.33) takes this very lock itself:
            // release ours for its run, or both would wait forever.
            if lim.mbr_capped_bytes > 0 {
                // growpart 0.33 sets the end one sector past the MBR limit
                // and fails; write the capped size ourselves, keeping the
                // start, type and flags (sfdisk -N changes only the size).
                let size = lim.max_end - tp.start + 1;
                r.run_input(
                    "sfdisk",
                    &["--no-reread", "--no-tell-kernel", "--force", "-N", &n.to_string(), &disk_node],
                    &format!(", {size}\n"),
                    &[0],
                )?;
                failpoint::hit("extend.after_growpart");
                want_sectors = Some(size);
            } else {
                // growpart (cloud-utils >= 0.33) takes this very lock itself:
                // release ours for its run, or both would wait forever.
                guard.take();
                let out = r.run("growpart", &["--update", "off", &disk_node, &n.to_string()], &[0, 1])?;
                failpoint::hit("extend.after_growpart");
                if out.code == 1 {
                    notes.push(format!("growpart: {}", out.stdout.trim()));
                } else {
                    // Its CHANGED line has the new size; should it ever not
                    // parse, the table is read again below.
                    want_sectors = table::parse_growpart_new_size(&out.stdout, tp.start);
                }
            }
            if guard.is_none() {
                guard = Some(lock::lock(&disk.node, Duration::from_secs(30))?);
            }
            if r.dry_run() {
                r.run_ok("partx", &["--update", "--nr", &n.to_string(), &disk_node])?;
                target_bytes = (lim.max_end - tp.start + 1) * lbs;
                assume_grows = true;
            }
            if lim.mbr_capped_bytes > 0 {
                notes.push(format!(
                    "MBR partition table: grown to the {} TiB limit of MBR; {} bytes past it stay unused (convert \
                     the disk to GPT to use them)",
                    (table::MBR_MAX_SECTORS * lbs) >> 40,
                    lim.mbr_capped_bytes
                ));
            }
        }
        if !r.dry_run() {
            // Make the kernel see this partition's size from the table (also
            // finishes a run killed between growpart and partx).
            let want = match want_sectors {
                Some(w) => w * lbs,
                None => {
                    let tab =
                        table::read(r, &disk_node)?.ok_or_else(|| anyhow!("{disk_node} lost its partition table"))?;
                    tab.partitions.iter().find(|x| x.number == n).map(|x| x.size * lbs).unwrap_or(0)
                }
            };
            // The kernel's view of partition n (None: it dropped it, as a
            // kernel without table parsers does after a capacity change).
            let kernel_size =
                || sys.partition_by_number(&disk.name, n).and_then(|name| sys.block(&name).ok()).map(|b| b.size_bytes);
            if kernel_size() != Some(want) {
                r.run_ok("partx", &["--update", "--nr", &n.to_string(), &disk_node])?;
                failpoint::hit("extend.after_partx");
                if !wait_until(Duration::from_secs(5), || kernel_size() == Some(want)) {
                    return Err(anyhow!(
                        "the kernel sees {part_node} as {:?} bytes after partx --update; the table says {want}",
                        kernel_size()
                    )
                    .into());
                }
                let node = sys.block(&sys.partition_by_number(&disk.name, n).unwrap_or_default())?.node;
                if !wait_until(Duration::from_secs(5), || super::sysfs::is_block_node(&node)) {
                    return Err(anyhow!("{} did not reappear within 5 s", node.display()).into());
                }
            }
            target_bytes = kernel_size().unwrap_or(want);
            part_changed = target_bytes != part.size_bytes;
        }
        if lim.growable_bytes == 0 && !part_changed && lim.mbr_capped_bytes > 0 {
            // The disk did grow: MBR cannot address the rest.
            notes.insert(
                0,
                format!(
                    "{part_node} already ends at the {} TiB limit of MBR; the disk is {} bytes and {} bytes past \
                     the limit stay unused (convert the disk to GPT to use them)",
                    (table::MBR_MAX_SECTORS * lbs) >> 40,
                    disk.size_bytes,
                    lim.mbr_capped_bytes
                ),
            );
        } else if lim.growable_bytes == 0 && !part_changed {
            notes.insert(
                0,
                format!("disk has not grown (still {} bytes): {part_node} already ends where it can", disk.size_bytes),
            );
        }
        drop(guard);
    } else {
        notes.push(format!("{part_node} is a whole disk without partitions: no partition to grow"));
    }
    d.partition_bytes_after = Some(target_bytes);

    // The filesystem step, always.
    let mut growths: Vec<Growth> = Vec::new();
    if fstype == "LVM2_member" {
        let before = fs::pv_size(r, &part_node)?;
        r.run_ok("pvresize", &[&part_node])?;
        failpoint::hit("extend.after_pvresize");
        let after = if r.dry_run() { before } else { fs::pv_size(r, &part_node)? };
        growths.push(Growth {
            device: part_node.clone(),
            fstype: fstype.clone(),
            before_bytes: before,
            after_bytes: after,
            changed: before != after,
            how: "pvresize".into(),
        });
        if let Some((vg, l)) = lv {
            let vgl = format!("{vg}/{l}");
            let q = |args: &[&str]| -> Result<Option<u64>> {
                let o = r.probe(args[0], &args[1..])?;
                Ok(o.stdout.trim().parse().ok())
            };
            let lv_before = q(&["lvs", "--noheadings", "--units", "b", "--nosuffix", "-o", "lv_size", &vgl])?;
            let free = q(&["vgs", "--noheadings", "--units", "b", "--nosuffix", "-o", "vg_free", vg])?.unwrap_or(0);
            // A dry run plans it always: the PV has not grown yet.
            if free > 0 || r.dry_run() {
                r.run_ok("lvextend", &["-l", "+100%FREE", &vgl])?;
                failpoint::hit("extend.after_lvextend");
            }
            let lv_after = q(&["lvs", "--noheadings", "--units", "b", "--nosuffix", "-o", "lv_size", &vgl])?;
            growths.push(Growth {
                device: vgl.clone(),
                fstype: "lvm_logical_volume".into(),
                before_bytes: lv_before,
                after_bytes: lv_after,
                changed: lv_before != lv_after,
                how: "lvextend -l +100%FREE".into(),
            });
            let lv_path = std::path::PathBuf::from(format!("/dev/{vg}/{l}"));
            if super::sysfs::is_block_node(&lv_path) {
                let lvb = sys.resolve_path(&lv_path, Duration::ZERO)?;
                let lvp = fs::probe(r, &s(&lv_path))?;
                match lvp.fstype.as_deref() {
                    Some(t) if fs::is_ext(t) || t == "xfs" => {
                        let lmp = mount_of(&mounts, &lvb);
                        let g = fs::grow(r, &system.state_dir, &s(&lv_path), t, lmp.as_deref(), lvb.size_bytes, true)
                            .with_context(|| format!("growing the filesystem on {vgl}"))?;
                        growths.push(g);
                    }
                    other => notes.push(format!(
                        "{vgl} holds {}, which this agent does not grow",
                        other.unwrap_or("no recognised filesystem")
                    )),
                }
            } else {
                notes.push(format!("{vgl} is not active (no {}): its filesystem was not grown", lv_path.display()));
            }
        }
    } else {
        let g = fs::grow(r, &system.state_dir, &part_node, &fstype, mp.as_deref(), target_bytes, assume_grows)?;
        growths.push(g);
    }
    if let Some(g) = growths.first() {
        d.filesystem_bytes_before = Some(g.before_bytes);
        d.filesystem_bytes_after = Some(g.after_bytes);
    }
    let fs_changed = growths.iter().any(|g| g.changed);
    let what = growths
        .iter()
        .map(|g| match (g.before_bytes, g.after_bytes) {
            (Some(a), Some(b)) if a != b => format!("{} {} grown from {a} to {b} bytes", g.fstype, g.device),
            (Some(a), _) => format!("{} {} is {a} bytes ({})", g.fstype, g.device, g.how),
            _ => format!("{} {} ({})", g.fstype, g.device, g.how),
        })
        .collect::<Vec<_>>()
        .join("; ");
    let tail = if notes.is_empty() { String::new() } else { format!(". {}", notes.join(". ")) };
    d.steps = Some(growths);
    d.notes = Some(notes);
    d.changed = true;
    d.message = if r.dry_run() {
        format!("dry run: plan for {part_node} ({fstype}) computed{tail}")
    } else if part_changed {
        format!("{part_node} grown from {} to {target_bytes} bytes; {what}{tail}", part.size_bytes)
    } else if fs_changed {
        // A rerun finishing the filesystem step of an earlier run.
        format!("{what}; {part_node} was already {target_bytes} bytes{tail}")
    } else {
        d.changed = false;
        format!("nothing to grow: {what}{tail}")
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lv_names() {
        assert_eq!(valid_lv("vg0/data"), Some(("vg0", "data")));
        assert_eq!(valid_lv("vg0/da ta"), None);
        assert_eq!(valid_lv("vg0"), None);
        assert_eq!(valid_lv("-x/y"), None);
    }
}
