//! Partition tables as `sfdisk --json` shows them, and the size arithmetic
//! of growing one partition: where it may end, what is in the way, the MBR
//! 2 TiB cap. Parsing and arithmetic are pure; only [`read`] runs a tool.
use crate::runner::Runner;
use anyhow::{anyhow, Result};
use serde::Serialize;
use serde_json::Value;

/// GPT keeps a backup header and entry array at the end of the disk;
/// growpart leaves 33 sectors plus one for it, whatever the sector size.
pub const GPT_TAIL_SECTORS: u64 = 34;
/// MBR start and size fields are 32-bit sector counts.
pub const MBR_MAX_SECTORS: u64 = 1 << 32;
/// growpart's default fudge: growth below 1 MiB is no growth.
pub const FUDGE_BYTES: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TablePart {
    pub number: u32,
    pub node: String,
    /// In logical sectors.
    pub start: u64,
    /// In logical sectors.
    pub size: u64,
    #[serde(rename = "type")]
    pub type_: String,
    pub uuid: Option<String>,
    pub name: Option<String>,
}

impl TablePart {
    pub fn end(&self) -> u64 {
        self.start + self.size - 1
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Table {
    /// `gpt` or `dos`.
    pub label: String,
    pub partitions: Vec<TablePart>,
}

/// Parse `sfdisk --json DISK` output. Partition numbers come from the node
/// sfdisk printed: the disk path, an optional `p`, the number.
pub fn parse_sfdisk_json(text: &str, disk_path: &str) -> Result<Table> {
    let v: Value = serde_json::from_str(text).map_err(|e| anyhow!("cannot parse sfdisk --json output: {e}"))?;
    let pt = v.get("partitiontable").ok_or_else(|| anyhow!("sfdisk --json output has no partitiontable"))?;
    let label = pt.get("label").and_then(Value::as_str).unwrap_or("").to_string();
    let mut partitions = Vec::new();
    for p in pt.get("partitions").and_then(Value::as_array).into_iter().flatten() {
        let node = p.get("node").and_then(Value::as_str).unwrap_or("").to_string();
        let rest = node.strip_prefix(disk_path).unwrap_or(&node);
        let rest = rest.strip_prefix('p').unwrap_or(rest);
        let digits: String = rest.chars().rev().take_while(|c| c.is_ascii_digit()).collect();
        let digits: String = digits.chars().rev().collect();
        let number = digits.parse().map_err(|_| anyhow!("cannot tell the partition number of {node}"))?;
        let num = |k: &str| p.get(k).and_then(Value::as_u64).unwrap_or(0);
        let s = |k: &str| p.get(k).and_then(Value::as_str).map(str::to_string);
        partitions.push(TablePart {
            number,
            node,
            start: num("start"),
            size: num("size"),
            type_: s("type").unwrap_or_default(),
            uuid: s("uuid"),
            name: s("name"),
        });
    }
    Ok(Table { label, partitions })
}

/// Escape a dump string value as sfdisk does: quote, backslash and
/// anything not printable as `\xNN`.
fn dump_quote(s: &str) -> String {
    let mut o = String::from("\"");
    for b in s.bytes() {
        if b == b'"' || b == b'\\' || !(0x20..0x7f).contains(&b) {
            o.push_str(&format!("\\x{b:02x}"));
        } else {
            o.push(b as char);
        }
    }
    o.push('"');
    o
}

/// Render `sfdisk --json` output as `sfdisk --dump` text: the same table in
/// the form `sfdisk DISK < dump` restores, without running sfdisk twice.
pub fn render_dump(text: &str) -> Result<String> {
    let v: Value = serde_json::from_str(text).map_err(|e| anyhow!("cannot parse sfdisk --json output: {e}"))?;
    let pt = v.get("partitiontable").ok_or_else(|| anyhow!("sfdisk --json output has no partitiontable"))?;
    let field = |k: &str| -> Option<String> {
        match pt.get(k)? {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    };
    let mut o = String::new();
    for (k, name) in [
        ("label", "label"),
        ("id", "label-id"),
        ("device", "device"),
        ("unit", "unit"),
        ("firstlba", "first-lba"),
        ("lastlba", "last-lba"),
        ("sectorsize", "sector-size"),
    ] {
        if let Some(x) = field(k) {
            o.push_str(&format!("{name}: {x}\n"));
        }
    }
    o.push('\n');
    for p in pt.get("partitions").and_then(Value::as_array).into_iter().flatten() {
        let num = |k: &str| p.get(k).and_then(Value::as_u64).unwrap_or(0);
        let st = |k: &str| p.get(k).and_then(Value::as_str);
        o.push_str(&format!(
            "{} : start={:>12}, size={:>12}, type={}",
            st("node").unwrap_or(""),
            num("start"),
            num("size"),
            st("type").unwrap_or("")
        ));
        if let Some(u) = st("uuid") {
            o.push_str(&format!(", uuid={u}"));
        }
        if let Some(n) = st("name") {
            o.push_str(&format!(", name={}", dump_quote(n)));
        }
        if let Some(a) = st("attrs") {
            o.push_str(&format!(", attrs={}", dump_quote(a)));
        }
        if p.get("bootable").and_then(Value::as_bool) == Some(true) {
            o.push_str(", bootable");
        }
        o.push('\n');
    }
    Ok(o)
}

/// The table on `disk_path` and its `sfdisk --dump` form (rendered from the
/// same one `sfdisk --json` run), or None when it has none.
pub fn read_with_dump(runner: &Runner, disk_path: &str) -> Result<Option<(Table, String)>> {
    let out = runner.probe("sfdisk", &["--json", disk_path])?;
    if out.code != 0 {
        if out.stderr.contains("does not contain a recognized partition table") {
            return Ok(None);
        }
        return Err(anyhow!("`sfdisk --json {disk_path}` exited with {}: {}", out.code, out.stderr.trim()));
    }
    let table = parse_sfdisk_json(&out.stdout, disk_path)?;
    let dump = render_dump(&out.stdout)?;
    Ok(Some((table, dump)))
}

/// The table on `disk_path`, or None when it has none.
pub fn read(runner: &Runner, disk_path: &str) -> Result<Option<Table>> {
    Ok(read_with_dump(runner, disk_path)?.map(|(t, _)| t))
}

/// The new size in logical sectors from growpart's `CHANGED: partition=N
/// start=S old: size=A end=B new: size=C end=D` line, when its start is
/// `start` (a sanity check on the parse).
pub fn parse_growpart_new_size(stdout: &str, start: u64) -> Option<u64> {
    let line = stdout.lines().find(|l| l.trim_start().starts_with("CHANGED:"))?;
    let num = |after: &str, key: &str| -> Option<u64> {
        let rest = &line[line.find(after)? + after.len()..];
        let w = rest.split_whitespace().find_map(|w| w.strip_prefix(key))?;
        w.parse().ok()
    };
    (num("CHANGED:", "start=")? == start).then_some(())?;
    num("new:", "size=")
}

/// MBR extended-container types.
pub fn is_extended(type_: &str) -> bool {
    matches!(type_.to_ascii_lowercase().as_str(), "5" | "f" | "85")
}

/// How far one partition can grow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GrowLimit {
    /// Last sector the partition could end at.
    pub max_end: u64,
    /// Bytes it could grow by (0 below the 1 MiB fudge).
    pub growable_bytes: u64,
    /// A partition starting right after it that blocks growth while free
    /// space exists further on: (number, node).
    pub blocker: Option<(u32, String)>,
    /// Free bytes beyond the blocker (what the user hoped to get).
    pub free_beyond_blocker: u64,
    /// The MBR 2^32-sector limit cut the growth short by this many bytes.
    pub mbr_capped_bytes: u64,
}

/// Where partition `number` of `table` may end on a disk of `disk_sectors`
/// logical sectors of `lbs` bytes; mirrors growpart's arithmetic.
pub fn grow_limit(table: &Table, number: u32, disk_sectors: u64, lbs: u64) -> Option<GrowLimit> {
    let p = table.partitions.iter().find(|p| p.number == number)?;
    let tail_limit = disk_sectors.saturating_sub(GPT_TAIL_SECTORS);
    let mut limit = tail_limit;
    let mut mbr_capped_bytes = 0;
    if table.label == "dos" && limit > MBR_MAX_SECTORS - 1 {
        mbr_capped_bytes = (limit - (MBR_MAX_SECTORS - 1)) * lbs;
        limit = MBR_MAX_SECTORS - 1;
    }
    let next = table.partitions.iter().filter(|q| q.number != number && q.start > p.start).min_by_key(|q| q.start);
    let max_end = match next {
        Some(q) if q.start <= limit => q.start - 1,
        _ => limit,
    };
    let bytes = |sectors: u64| sectors * lbs;
    let raw = bytes(max_end.saturating_sub(p.end()));
    let growable_bytes = if raw < FUDGE_BYTES { 0 } else { raw };
    let mut blocker = None;
    let mut free_beyond_blocker = 0;
    if growable_bytes == 0 {
        if let Some(q) = next {
            let last_end = table.partitions.iter().map(|x| x.end()).max().unwrap_or(0);
            let free = bytes(limit.saturating_sub(last_end));
            if free >= FUDGE_BYTES {
                blocker = Some((q.number, q.node.clone()));
                free_beyond_blocker = free;
            }
        }
    }
    if max_end < limit {
        mbr_capped_bytes = 0;
    }
    Some(GrowLimit { max_end, growable_bytes, blocker, free_beyond_blocker, mbr_capped_bytes })
}

/// The single partition InitializeDisk creates: first and last sector, from
/// 1 MiB to the end of the usable area, its size a multiple of 1 MiB.
pub fn init_partition_range(disk_bytes: u64, lbs: u64) -> Option<(u64, u64)> {
    let mib = 1u64 << 20;
    let disk_sectors = disk_bytes / lbs;
    let first = mib / lbs;
    let last_usable = disk_sectors.checked_sub(GPT_TAIL_SECTORS)?;
    let end_bytes = ((last_usable + 1) * lbs) / mib * mib;
    if end_bytes <= mib {
        return None;
    }
    Some((first, end_bytes / lbs - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GPT: &str = r#"{"partitiontable": {"label":"gpt","id":"X","device":"/dev/loop0","unit":"sectors",
      "firstlba":2048,"lastlba":204766,"sectorsize":512,"partitions":[
      {"node":"/dev/loop0p1","start":2048,"size":102400,"type":"0FC63DAF-8483-4772-8E79-3D69D8477DE4","uuid":"U1","name":"root"},
      {"node":"/dev/loop0p2","start":104448,"size":20480,"type":"0657FD6D-A4AB-43C4-84E5-0933C84B4F4F","uuid":"U2"}]}}"#;

    fn t() -> Table {
        parse_sfdisk_json(GPT, "/dev/loop0").unwrap()
    }

    #[test]
    fn dump_is_rendered_from_the_json() {
        let gpt = r#"{"partitiontable": {"label": "gpt", "id": "6F43", "device": "/dev/loop1", "unit": "sectors",
          "firstlba": 34, "lastlba": 131038, "sectorsize": 512, "partitions": [
          {"node": "/dev/loop1p1", "start": 2048, "size": 8192, "type": "0FC6", "uuid": "09A0",
           "name": "my \"q\" name", "attrs": "LegacyBIOSBootable GUID:60"},
          {"node": "/dev/loop1p2", "start": 10240, "size": 8192, "type": "0FC6", "uuid": "18C2"}]}}"#;
        assert_eq!(
            render_dump(gpt).unwrap(),
            "label: gpt\nlabel-id: 6F43\ndevice: /dev/loop1\nunit: sectors\nfirst-lba: 34\nlast-lba: 131038\n\
             sector-size: 512\n\n\
             /dev/loop1p1 : start=        2048, size=        8192, type=0FC6, uuid=09A0, name=\"my \\x22q\\x22 name\", \
             attrs=\"LegacyBIOSBootable GUID:60\"\n\
             /dev/loop1p2 : start=       10240, size=        8192, type=0FC6, uuid=18C2\n"
        );
        let dos = r#"{"partitiontable": {"label": "dos", "id": "0x9a5c0606", "device": "/dev/loop1",
          "unit": "sectors", "sectorsize": 512, "partitions": [
          {"node": "/dev/loop1p1", "start": 2048, "size": 20480, "type": "83", "bootable": true}]}}"#;
        assert_eq!(
            render_dump(dos).unwrap(),
            "label: dos\nlabel-id: 0x9a5c0606\ndevice: /dev/loop1\nunit: sectors\nsector-size: 512\n\n\
             /dev/loop1p1 : start=        2048, size=       20480, type=83, bootable\n"
        );
    }

    #[test]
    fn growpart_changed_line_gives_the_new_size() {
        let out = "CHANGED: partition=1 start=2048 old: size=1048576 end=1050623 new: size=2095071 end=2097118\n";
        assert_eq!(parse_growpart_new_size(out, 2048), Some(2095071));
        assert_eq!(parse_growpart_new_size(out, 4096), None);
        assert_eq!(parse_growpart_new_size("NOCHANGE: partition 1 is size 10. it cannot be grown\n", 2048), None);
    }

    #[test]
    fn parses_numbers_from_nodes() {
        let t = t();
        assert_eq!(t.label, "gpt");
        assert_eq!(t.partitions[0].number, 1);
        assert_eq!(t.partitions[1].number, 2);
        assert_eq!(t.partitions[0].name.as_deref(), Some("root"));
        let x = parse_sfdisk_json(
            r#"{"partitiontable":{"label":"dos","partitions":[{"node":"/dev/xvda12","start":1,"size":2,"type":"83"}]}}"#,
            "/dev/xvda",
        )
        .unwrap();
        assert_eq!(x.partitions[0].number, 12);
    }

    #[test]
    fn swap_after_root_is_the_blocker_when_the_disk_grew() {
        let t = t();
        // disk grown to 400000 sectors: p1 is followed directly by p2.
        let g = grow_limit(&t, 1, 400000, 512).unwrap();
        assert_eq!(g.growable_bytes, 0);
        assert_eq!(g.blocker, Some((2, "/dev/loop0p2".into())));
        assert!(g.free_beyond_blocker > 0);
        // the last partition can grow to the end minus the GPT tail.
        let g2 = grow_limit(&t, 2, 400000, 512).unwrap();
        assert_eq!(g2.max_end, 400000 - 34);
        assert_eq!(g2.growable_bytes, (400000 - 34 - (104448 + 20480 - 1)) * 512);
    }

    #[test]
    fn no_growth_and_no_blocker_when_the_disk_did_not_grow() {
        let t = t();
        let g = grow_limit(&t, 2, 124928 + 34, 512).unwrap();
        assert_eq!(g.growable_bytes, 0);
        assert_eq!(g.blocker, None);
    }

    #[test]
    fn below_fudge_is_no_growth() {
        let t = t();
        let g = grow_limit(&t, 2, 124928 + 34 + 1000, 512).unwrap();
        assert_eq!(g.growable_bytes, 0);
    }

    #[test]
    fn mbr_is_capped_at_2_tib() {
        let t = Table {
            label: "dos".into(),
            partitions: vec![TablePart {
                number: 1,
                node: "/dev/sda1".into(),
                start: 2048,
                size: 1 << 20,
                type_: "83".into(),
                uuid: None,
                name: None,
            }],
        };
        let disk = 3u64 << 31; // 3 TiB in 512-byte sectors
        let g = grow_limit(&t, 1, disk, 512).unwrap();
        assert_eq!(g.max_end, MBR_MAX_SECTORS - 1);
        assert_eq!(g.mbr_capped_bytes, (disk - 34 - (MBR_MAX_SECTORS - 1)) * 512);
        let gpt = Table { label: "gpt".into(), ..t };
        assert_eq!(grow_limit(&gpt, 1, disk, 512).unwrap().mbr_capped_bytes, 0);
    }

    #[test]
    fn four_k_sectors_count_in_logical_sectors() {
        let t = Table {
            label: "gpt".into(),
            partitions: vec![TablePart {
                number: 1,
                node: "/dev/loop1p1".into(),
                start: 256,
                size: 256,
                type_: "x".into(),
                uuid: None,
                name: None,
            }],
        };
        let g = grow_limit(&t, 1, 65536, 4096).unwrap();
        assert_eq!(g.max_end, 65536 - 34);
        assert_eq!(g.growable_bytes, (65536 - 34 - 511) * 4096);
    }

    #[test]
    fn init_range_is_mib_aligned() {
        let (a, b) = init_partition_range(1 << 30, 512).unwrap();
        assert_eq!(a, 2048);
        assert_eq!((b + 1) * 512 % (1 << 20), 0);
        assert!(b < (1 << 30) / 512 - 34);
        let (a, b) = init_partition_range(1 << 30, 4096).unwrap();
        assert_eq!(a, 256);
        assert_eq!((b + 1) * 4096 % (1 << 20), 0);
        assert!(init_partition_range(1 << 20, 512).is_none());
    }

    #[test]
    fn sfdisk_json_errors_are_named() {
        assert!(parse_sfdisk_json("{", "/dev/x").unwrap_err().to_string().contains("cannot parse sfdisk --json"));
        assert!(parse_sfdisk_json("{}", "/dev/x").unwrap_err().to_string().contains("no partitiontable"));
        let e = parse_sfdisk_json(r#"{"partitiontable":{"partitions":[{"node":"/dev/xp"}]}}"#, "/dev/x").unwrap_err();
        assert!(e.to_string().contains("cannot tell the partition number of /dev/xp"), "{e}");
        assert!(render_dump("[").unwrap_err().to_string().contains("cannot parse sfdisk --json"));
        assert!(render_dump("{}").unwrap_err().to_string().contains("no partitiontable"));
        // A partition without start or size reads as 0, not an error.
        let t = parse_sfdisk_json(r#"{"partitiontable":{"partitions":[{"node":"/dev/nvme0n1p3"}]}}"#, "/dev/nvme0n1");
        let p = &t.unwrap().partitions[0];
        assert_eq!((p.number, p.start, p.size, p.type_.as_str(), p.uuid.as_deref()), (3, 0, 0, "", None));
    }

    #[test]
    fn dump_quotes_backslash_and_unprintable_bytes() {
        assert_eq!(dump_quote("a b~"), "\"a b~\"");
        assert_eq!(dump_quote("\\\"\u{7f}\u{1f}é"), "\"\\x5c\\x22\\x7f\\x1f\\xc3\\xa9\"");
    }

    #[test]
    fn extended_container_types() {
        for t in ["5", "f", "F", "85"] {
            assert!(is_extended(t), "{t}");
        }
        for t in ["83", "82", "8e", "ee", "", "0FC63DAF-8483-4772-8E79-3D69D8477DE4"] {
            assert!(!is_extended(t), "{t}");
        }
    }

    #[test]
    fn blocker_bounds_are_exact() {
        let t = t();
        let g = grow_limit(&t, 1, 400000, 512).unwrap();
        // p1 ends where p2 starts, p2 ends at 124927.
        assert_eq!(g.max_end, 104447);
        assert_eq!(g.free_beyond_blocker, (400000 - 34 - 124927) * 512);
        assert_eq!(g.mbr_capped_bytes, 0);
        // Exactly 1 MiB free beyond the last partition is worth naming the
        // blocker; one sector less is not.
        let g = grow_limit(&t, 1, 124927 + 34 + 2048, 512).unwrap();
        assert_eq!(g.blocker, Some((2, "/dev/loop0p2".into())));
        assert_eq!(g.free_beyond_blocker, 1 << 20);
        let g = grow_limit(&t, 1, 124927 + 34 + 2047, 512).unwrap();
        assert_eq!((g.blocker, g.free_beyond_blocker), (None, 0));
        assert_eq!(grow_limit(&t, 3, 400000, 512), None, "no partition 3");
    }

    #[test]
    fn growth_of_exactly_one_mib_counts() {
        let t = t();
        // p2 ends at 124927: a disk of 124927 + 2048 + 34 sectors leaves
        // exactly 2048 sectors (1 MiB) to grow by.
        let g = grow_limit(&t, 2, 124927 + 2048 + 34, 512).unwrap();
        assert_eq!((g.max_end, g.growable_bytes), (124927 + 2048, 1 << 20));
        let g = grow_limit(&t, 2, 124927 + 2047 + 34, 512).unwrap();
        assert_eq!((g.max_end, g.growable_bytes), (124927 + 2047, 0));
    }

    #[test]
    fn a_partition_at_the_last_usable_sector_still_blocks() {
        let mut t = t();
        t.partitions[1].start = 200000 - 34;
        t.partitions[1].size = 1;
        let g = grow_limit(&t, 1, 200000, 512).unwrap();
        assert_eq!(g.max_end, 200000 - 34 - 1);
        assert_eq!(g.growable_bytes, (200000 - 35 - 104447) * 512);
    }

    #[test]
    fn mbr_cap_is_not_reported_when_a_partition_blocks_first() {
        let p = |number: u32, start: u64, size: u64| TablePart {
            number,
            node: format!("/dev/sda{number}"),
            start,
            size,
            type_: "83".into(),
            uuid: None,
            name: None,
        };
        let t = Table { label: "dos".into(), partitions: vec![p(1, 2048, 1 << 20), p(2, 1 << 22, 1 << 20)] };
        let disk = 3u64 << 31;
        let g = grow_limit(&t, 1, disk, 512).unwrap();
        assert_eq!((g.max_end, g.mbr_capped_bytes), ((1 << 22) - 1, 0));
        assert_eq!(g.growable_bytes, ((1 << 22) - 1 - (2048 + (1 << 20) - 1)) * 512);
        // The last one meets the cap.
        let g = grow_limit(&t, 2, disk, 512).unwrap();
        assert_eq!(g.max_end, MBR_MAX_SECTORS - 1);
        assert_eq!(g.growable_bytes, (MBR_MAX_SECTORS - 1 - ((1 << 22) + (1 << 20) - 1)) * 512);
    }

    #[test]
    fn init_range_exact_ends() {
        // 1 GiB of 512-byte sectors: the last usable sector is 2097118, so
        // the partition ends at the last whole MiB below it.
        assert_eq!(init_partition_range(1 << 30, 512), Some((2048, 1023 * 2048 - 1)));
        assert_eq!(init_partition_range(1 << 30, 4096), Some((256, 1023 * 256 - 1)));
        // Room for exactly 1 MiB of area in all is too small: the partition
        // would be empty.
        assert_eq!(init_partition_range((2048 + 33) * 512, 512), None);
        assert_eq!(init_partition_range((4096 + 33) * 512, 512), Some((2048, 4095)));
        assert_eq!(init_partition_range(33 * 512, 512), None);
    }

    #[test]
    fn reads_a_real_table_with_sfdisk() {
        // sfdisk works on an image file as on a disk (no root needed).
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        std::fs::File::create(&img).unwrap().set_len(16 << 20).unwrap();
        let img = img.to_str().unwrap();
        let runner = Runner::new(false);
        assert_eq!(read(&runner, img).unwrap(), None, "a blank disk has no table");
        let o = runner.run_input("sfdisk", &["-q", img], "label: gpt\nstart=2048, size=8192\n", &[0]).unwrap();
        assert_eq!(o.code, 0);
        let (t, dump) = read_with_dump(&runner, img).unwrap().unwrap();
        assert_eq!(t.label, "gpt");
        assert_eq!((t.partitions.len(), t.partitions[0].number, t.partitions[0].start), (1, 1, 2048));
        assert_eq!(t.partitions[0].size, 8192);
        assert!(dump.starts_with("label: gpt\n"), "{dump}");
        assert_eq!(read(&runner, img).unwrap(), Some(t));
        let e = read(&runner, "/nonexistent/disk").unwrap_err().to_string();
        assert!(e.contains("`sfdisk --json /nonexistent/disk` exited with"), "{e}");
    }

    fn dos(parts: &[(u32, u64, u64)]) -> Table {
        let partitions = parts
            .iter()
            .map(|&(number, start, size)| TablePart {
                number,
                node: format!("/dev/sda{number}"),
                start,
                size,
                type_: "83".into(),
                uuid: None,
                name: None,
            })
            .collect();
        Table { label: "dos".into(), partitions }
    }

    #[test]
    fn mbr_cap_starts_one_sector_past_the_32_bit_limit() {
        let t = dos(&[(1, 2048, 1 << 20)]);
        // The usable area ends at sector 2^32: one sector too many for MBR.
        let g = grow_limit(&t, 1, MBR_MAX_SECTORS + 34, 512).unwrap();
        assert_eq!((g.max_end, g.mbr_capped_bytes), (MBR_MAX_SECTORS - 1, 512));
        // Ending at 2^32 - 1 fits: nothing capped.
        let g = grow_limit(&t, 1, MBR_MAX_SECTORS - 1 + 34, 512).unwrap();
        assert_eq!((g.max_end, g.mbr_capped_bytes), (MBR_MAX_SECTORS - 1, 0));
    }

    #[test]
    fn a_partition_inside_the_tail_does_not_move_the_limit() {
        // MBR keeps no backup at the end, so a small partition can sit in
        // the last 34 sectors; growpart's limit stays 34 sectors before the
        // end, and the partition before it grows to that limit, not to it.
        let disk = 1u64 << 21;
        let t = dos(&[(1, 2048, 1 << 20), (2, disk - 10, 8)]);
        let g = grow_limit(&t, 1, disk, 512).unwrap();
        assert_eq!(g.max_end, disk - 34);
        assert_eq!(g.growable_bytes, (disk - 34 - (2048 + (1 << 20) - 1)) * 512);
    }
}
