//! Filesystems and other signatures: probing (`blkid -p`, `wipefs`), sizes
//! (the ext superblock read directly, `xfs_info`, `pvs`) and growing (`resize2fs`, `e2fsck`,
//! `xfs_growfs`, `pvresize`). Output parsing is pure and unit tested.
use super::mount::TempMount;
use crate::failpoint;
use crate::runner::Runner;
use anyhow::{bail, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

/// What `blkid -p` found on a device or at an offset.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Probe {
    pub fstype: Option<String>,
    pub uuid: Option<String>,
    pub label: Option<String>,
    pub usage: Option<String>,
    pub pttype: Option<String>,
    /// blkid found more than one signature and would not choose.
    pub ambivalent: bool,
}

impl Probe {
    pub fn is_empty(&self) -> bool {
        self.fstype.is_none() && self.pttype.is_none() && !self.ambivalent
    }
    /// A human description: "ext4 (UUID ...)", "partition table gpt".
    pub fn describe(&self) -> String {
        if self.ambivalent {
            return "several conflicting signatures (blkid cannot decide)".into();
        }
        match (&self.fstype, &self.pttype) {
            (Some(t), _) => match &self.uuid {
                Some(u) => format!("{t} signature (UUID {u})"),
                None => format!("{t} signature"),
            },
            (None, Some(p)) => format!("partition table ({p})"),
            _ => "nothing".into(),
        }
    }
}

pub fn parse_export(text: &str) -> BTreeMap<String, String> {
    text.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn probe_cmd(runner: &Runner, args: &[String]) -> Result<Probe> {
    let out = runner.probe("blkid", args)?;
    match out.code {
        0 => {
            let m = parse_export(&out.stdout);
            Ok(Probe {
                fstype: m.get("TYPE").cloned(),
                uuid: m.get("UUID").cloned(),
                label: m.get("LABEL").cloned(),
                usage: m.get("USAGE").cloned(),
                pttype: m.get("PTTYPE").cloned(),
                ambivalent: false,
            })
        }
        2 => Ok(Probe::default()),
        8 => Ok(Probe { ambivalent: true, ..Default::default() }),
        c => bail!("`blkid {}` exited with {c}: {}", args.join(" "), out.stderr.trim()),
    }
}

/// Low-level probe of a whole device (bypasses the blkid cache).
pub fn probe(runner: &Runner, dev: &str) -> Result<Probe> {
    probe_cmd(runner, &["-p".into(), "-o".into(), "export".into(), dev.into()])
}

/// Low-level probe of `size` bytes at `offset` of `dev`: what a partition
/// created there would show.
pub fn probe_at(runner: &Runner, dev: &str, offset: u64, size: u64) -> Result<Probe> {
    probe_cmd(
        runner,
        &[
            "-p".into(),
            "-O".into(),
            offset.to_string(),
            "-S".into(),
            size.to_string(),
            "-o".into(),
            "export".into(),
            dev.into(),
        ],
    )
}

/// Every signature wipefs sees ("ext4 at 0x438"), partition tables included.
pub fn signatures(runner: &Runner, dev: &str) -> Result<Vec<String>> {
    let out = runner.probe("wipefs", &["--json", dev])?;
    if out.code != 0 {
        bail!("`wipefs --json {dev}` exited with {}: {}", out.code, out.stderr.trim());
    }
    Ok(parse_wipefs_json(&out.stdout))
}

pub fn parse_wipefs_json(text: &str) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
    v.get("signatures")
        .and_then(|s| s.as_array())
        .map(|a| {
            a.iter()
                .map(|s| {
                    let t = s.get("type").and_then(|x| x.as_str()).unwrap_or("?");
                    let o = s.get("offset").and_then(|x| x.as_str()).unwrap_or("?");
                    format!("{t} at {o}")
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Filesystems the agent can grow.
pub fn is_ext(t: &str) -> bool {
    matches!(t, "ext2" | "ext3" | "ext4")
}

/// Block count × block size from `dumpe2fs -h` output.
pub fn parse_dumpe2fs(text: &str) -> Option<u64> {
    let get = |k: &str| text.lines().find_map(|l| l.strip_prefix(k).map(|v| v.trim().parse::<u64>().ok())).flatten();
    Some(get("Block count:")? * get("Block size:")?)
}

/// Block count × block size from an ext2/3/4 superblock (the 1024 bytes
/// at offset 1024 of the device): what `dumpe2fs -h` prints as "Block
/// count" and "Block size", without running a process. None unless the
/// magic is there.
pub fn parse_ext_superblock(sb: &[u8]) -> Option<u64> {
    let u32_at = |o: usize| sb.get(o..o + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u64);
    let magic = sb.get(56..58).map(|b| u16::from_le_bytes([b[0], b[1]]))?;
    if magic != 0xEF53 {
        return None;
    }
    let log_block_size = u32_at(24)?;
    if log_block_size > 6 {
        return None;
    }
    let incompat = u32_at(96)?;
    let mut blocks = u32_at(4)?;
    // INCOMPAT_64BIT: the high half of the block count is at 0x150.
    if incompat & 0x80 != 0 {
        blocks |= u32_at(0x150)? << 32;
    }
    Some(blocks * (1024 << log_block_size))
}

/// The ext filesystem size from the superblock on `dev`.
pub fn ext_size(dev: &str) -> Option<u64> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(dev).ok()?;
    f.seek(SeekFrom::Start(1024)).ok()?;
    let mut sb = [0u8; 1024];
    f.read_exact(&mut sb).ok()?;
    parse_ext_superblock(&sb)
}

/// Data blocks × block size from `xfs_info` output.
pub fn parse_xfs_info(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.trim_start().starts_with("data "))?;
    let field = |k: &str| {
        line.split(|c: char| c.is_whitespace() || c == ',')
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some(field("bsize=")? * field("blocks=")?)
}

/// Size of the filesystem in bytes, where the agent knows how to read it.
pub fn fs_size(runner: &Runner, dev: &str, fstype: &str, mount_point: Option<&str>) -> Result<Option<u64>> {
    if is_ext(fstype) {
        // A 1 KiB read of the superblock; dumpe2fs only when that fails.
        if let Some(n) = ext_size(dev) {
            return Ok(Some(n));
        }
        let o = runner.probe("dumpe2fs", &["-h", dev])?;
        return Ok(parse_dumpe2fs(&o.stdout));
    }
    if fstype == "xfs" {
        let target = mount_point.unwrap_or(dev);
        let o = runner.probe("xfs_info", &[target])?;
        return Ok(parse_xfs_info(&o.stdout));
    }
    if fstype == "LVM2_member" {
        return pv_size(runner, dev);
    }
    Ok(None)
}

/// PV size in bytes (`pvs pv_size`).
pub fn pv_size(runner: &Runner, dev: &str) -> Result<Option<u64>> {
    let o = runner.probe("pvs", &["--noheadings", "--units", "b", "--nosuffix", "-o", "pv_size", dev])?;
    Ok(o.stdout.trim().parse().ok())
}

/// What growing one filesystem did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Growth {
    pub device: String,
    pub fstype: String,
    pub before_bytes: Option<u64>,
    pub after_bytes: Option<u64>,
    pub changed: bool,
    pub how: String,
}

/// Grow the ext or XFS filesystem on `dev` to fill `target_bytes`.
/// `assume_grows` (dry run) plans the commands even though the device has
/// not grown yet.
pub fn grow(
    runner: &Runner,
    state_dir: &Path,
    dev: &str,
    fstype: &str,
    mount_point: Option<&str>,
    target_bytes: u64,
    assume_grows: bool,
) -> Result<Growth> {
    let before = fs_size(runner, dev, fstype, mount_point)?;
    let mut g = Growth {
        device: dev.to_string(),
        fstype: fstype.to_string(),
        before_bytes: before,
        after_bytes: before,
        ..Default::default()
    };
    let needs = match before {
        Some(b) => b + super::table::FUDGE_BYTES <= target_bytes || assume_grows,
        None => true,
    };
    if !needs {
        g.how = "filesystem already fills its device".into();
        return Ok(g);
    }
    if is_ext(fstype) {
        match mount_point {
            Some(mp) => g.how = format!("resize2fs online (mounted at {mp})"),
            None => {
                runner.run("e2fsck", &["-f", "-p", dev], &[0, 1])?;
                failpoint::hit("extend.after_e2fsck");
                g.how = "e2fsck -f -p, then resize2fs offline".into();
            }
        }
        runner.run_ok("resize2fs", &[dev])?;
        failpoint::hit("extend.after_resize2fs");
    } else if fstype == "xfs" {
        match mount_point {
            Some(mp) => {
                runner.run_ok("xfs_growfs", &["-d", mp])?;
                g.how = format!("xfs_growfs on its mount point {mp}");
            }
            None => {
                let tm = TempMount::new(runner, state_dir, Path::new(dev), "xfs")?;
                failpoint::hit("extend.after_temp_mount");
                runner.run_ok("xfs_growfs", &["-d", &tm.path()])?;
                failpoint::hit("extend.after_xfs_growfs");
                tm.finish(runner)?;
                g.how = "xfs_growfs in a private temporary mount".into();
            }
        }
    } else {
        bail!("cannot grow a {fstype} filesystem");
    }
    if !runner.dry_run() {
        g.after_bytes = fs_size(runner, dev, fstype, mount_point)?;
    }
    g.changed = g.after_bytes != g.before_bytes;
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dumpe2fs_size() {
        let t = "Filesystem volume name:   <none>\nBlock count:              25600\nReserved block count:     1280\nBlock size:               4096\n";
        assert_eq!(parse_dumpe2fs(t), Some(25600 * 4096));
        assert_eq!(parse_dumpe2fs("nothing"), None);
    }

    #[test]
    fn ext_superblock_size() {
        let mut sb = vec![0u8; 1024];
        sb[4..8].copy_from_slice(&25600u32.to_le_bytes());
        sb[24..28].copy_from_slice(&2u32.to_le_bytes()); // 4096-byte blocks
        assert_eq!(parse_ext_superblock(&sb), None, "no magic");
        sb[56..58].copy_from_slice(&0xEF53u16.to_le_bytes());
        assert_eq!(parse_ext_superblock(&sb), Some(25600 * 4096));
        sb[0x150..0x154].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(parse_ext_superblock(&sb), Some(25600 * 4096), "high half ignored without 64bit");
        sb[96..100].copy_from_slice(&0x80u32.to_le_bytes());
        assert_eq!(parse_ext_superblock(&sb), Some(((1u64 << 32) + 25600) * 4096));
        assert_eq!(parse_ext_superblock(&sb[..100]), None, "short");
    }

    #[test]
    fn ext_superblock_matches_dumpe2fs_on_a_real_image() {
        // mkfs.ext4 on an image file (e2fsprogs: `cargo xtask setup`
        // installs it; a missing tool is a failure, not a skip).
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("x.img");
        std::fs::File::create(&img).unwrap().set_len(40 << 20).unwrap();
        let img = img.to_str().unwrap();
        let o = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", img])
            .output()
            .expect("mkfs.ext4 (e2fsprogs; cargo xtask setup installs it)");
        assert!(o.status.success(), "mkfs.ext4: {}", String::from_utf8_lossy(&o.stderr));
        let d = std::process::Command::new("dumpe2fs").args(["-h", img]).output().unwrap();
        let want = parse_dumpe2fs(&String::from_utf8_lossy(&d.stdout));
        assert!(want.is_some());
        assert_eq!(ext_size(img), want);
    }

    #[test]
    fn xfs_info_size() {
        let t = "meta-data=/dev/loop0p1           isize=512    agcount=4, agsize=6400 blks\n\
                 data     =                       bsize=4096   blocks=25600, imaxpct=25\n\
                 naming   =version 2              bsize=4096   ascii-ci=0, ftype=1\n";
        assert_eq!(parse_xfs_info(t), Some(25600 * 4096));
    }

    #[test]
    fn wipefs_json_lists_signatures() {
        let t = r#"{"signatures": [{"device":"loop0","offset":"0x438","type":"ext4","uuid":"u","label":null},
                   {"device":"loop0","offset":"0x200","type":"gpt","uuid":null,"label":null}]}"#;
        assert_eq!(parse_wipefs_json(t), vec!["ext4 at 0x438".to_string(), "gpt at 0x200".to_string()]);
        assert!(parse_wipefs_json("").is_empty());
    }

    #[test]
    fn export_parse_and_describe() {
        let m = parse_export("DEVNAME=/dev/x\nUUID=abc\nTYPE=xfs\n");
        assert_eq!(m.get("TYPE").map(String::as_str), Some("xfs"));
        let p = Probe { fstype: Some("xfs".into()), uuid: Some("abc".into()), ..Default::default() };
        assert_eq!(p.describe(), "xfs signature (UUID abc)");
        assert!(Probe::default().is_empty());
    }
}
