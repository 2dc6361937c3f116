//! The disk inventory: every disk with size, logical sector size, serial,
//! partitions, filesystems, mount points and how many bytes each
//! filesystem could grow by (free space right after its partition plus
//! unused space inside it). The check-in carries it, so a server sees
//! "disk grown, filesystem not"; `xcp-vm-agent inventory [--json]` prints it.
use super::fs;
use super::mount::{self, Mount};
use super::sysfs::{Block, Sys};
use super::table::{self, FUDGE_BYTES};
use crate::runner::Runner;
use anyhow::Result;
use serde_json::{json, Value};

fn skip_disk(name: &str) -> bool {
    name.starts_with("ram") || name.starts_with("zram") || name.starts_with("sr")
}

fn fs_info(r: &Runner, b: &Block, mounts: &[Mount], room_after: u64) -> Value {
    let node = b.node.to_string_lossy().into_owned();
    let mps: Vec<String> = mounts.iter().filter(|m| m.devnum == b.devnum).map(|m| m.mount_point.clone()).collect();
    let p = fs::probe(r, &node).unwrap_or_default();
    let Some(t) = p.fstype.clone() else {
        return json!({"type": null, "mount_points": mps, "growable_bytes": room_after});
    };
    let size = fs::fs_size(r, &node, &t, mps.first().map(String::as_str)).ok().flatten();
    let inside = size.map(|s| b.size_bytes.saturating_sub(s)).unwrap_or(0);
    let inside = if inside < FUDGE_BYTES { 0 } else { inside };
    json!({
        "type": t,
        "uuid": p.uuid,
        "label": p.label,
        "size_bytes": size,
        "mount_points": mps,
        "growable_bytes": room_after + inside,
    })
}

/// The inventory of this machine's disks, as JSON, with each disk's Xen
/// VBD number where the guest is on Xen (and every VBD under `xen_vbds`).
/// The check-in adds `filesystems` to it (`guest::fsreport::inventory`).
pub fn inventory() -> Result<Value> {
    let mut inv = inventory_with(&Sys::default(), &Runner::new(false))?;
    let vbds = crate::xen::list_vbds().unwrap_or_else(|e| {
        tracing::warn!("inventory without Xen VBDs: {e:#}");
        Vec::new()
    });
    attach_vbds(&mut inv, &vbds);
    Ok(inv)
}

/// Mark each disk with the VBD number whose guest device it is.
pub fn attach_vbds(inv: &mut Value, vbds: &[crate::xen::vbd::Vbd]) {
    if let Some(disks) = inv["disks"].as_array_mut() {
        for d in disks {
            let dev = d["device"].as_str().unwrap_or("").to_string();
            let n = vbds.iter().find(|v| v.device.as_deref().is_some_and(|p| p.to_string_lossy() == dev));
            d["xen_vbd"] = n.map(|v| Value::from(v.number)).unwrap_or(Value::Null);
        }
    }
    if !vbds.is_empty() {
        inv["xen_vbds"] = serde_json::to_value(vbds).unwrap_or(Value::Null);
    }
}

pub fn inventory_with(sys: &Sys, r: &Runner) -> Result<Value> {
    let mounts = mount::mounts().unwrap_or_default();
    let mut disks = Vec::new();
    for name in sys.disks() {
        if skip_disk(&name) {
            continue;
        }
        let Ok(b) = sys.block(&name) else { continue };
        if b.size_bytes == 0 {
            continue;
        }
        let node = b.node.to_string_lossy().into_owned();
        let lbs = b.logical_block_size;
        let tab = table::read(r, &node).ok().flatten();
        let mut parts = Vec::new();
        let mut filesystem = Value::Null;
        match &tab {
            Some(t) => {
                for tp in &t.partitions {
                    let kname = sys.partition_by_number(&name, tp.number);
                    let kb = kname.as_deref().and_then(|n| sys.block(n).ok());
                    let after =
                        table::grow_limit(t, tp.number, b.size_bytes / lbs, lbs).map(|g| g.growable_bytes).unwrap_or(0);
                    let after = if table::is_extended(&tp.type_) { 0 } else { after };
                    let fsv = match &kb {
                        Some(kb) if !table::is_extended(&tp.type_) => fs_info(r, kb, &mounts, after),
                        _ => Value::Null,
                    };
                    parts.push(json!({
                        "number": tp.number,
                        "device": kb.as_ref().map(|k| k.node.to_string_lossy().into_owned()),
                        "kernel_knows": kb.is_some(),
                        "start_bytes": tp.start * lbs,
                        "size_bytes": tp.size * lbs,
                        "type": tp.type_,
                        "partuuid": tp.uuid,
                        "name": tp.name,
                        "free_bytes_after": after,
                        "filesystem": fsv,
                    }));
                }
            }
            None => {
                let f = fs_info(r, &b, &mounts, 0);
                if !f["type"].is_null() {
                    filesystem = f;
                }
            }
        }
        disks.push(json!({
            "name": name,
            "device": node,
            "size_bytes": b.size_bytes,
            "logical_sector_size": lbs,
            "serial": sys.serial(&name),
            "read_only": b.read_only,
            "partition_table": tab.as_ref().map(|t| t.label.clone()),
            "partitions": parts,
            "filesystem": filesystem,
        }));
    }
    Ok(json!({ "disks": disks }))
}

fn human(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", units[i])
    }
}

/// Render the inventory as a table for people.
pub fn render_table(inv: &Value) -> String {
    let mut rows: Vec<[String; 7]> =
        vec![["DEVICE", "SIZE", "SECTOR", "TYPE", "UUID/LABEL", "MOUNTED ON", "CAN GROW BY"].map(String::from)];
    let fsrow = |f: &Value| -> (String, String, String, String) {
        if f.is_null() || f["type"].is_null() {
            return ("-".into(), "".into(), "".into(), "".into());
        }
        let id = match (f["uuid"].as_str(), f["label"].as_str()) {
            (Some(u), Some(l)) => format!("{u} ({l})"),
            (Some(u), None) => u.to_string(),
            _ => String::new(),
        };
        let mps: Vec<&str> = f["mount_points"].as_array().into_iter().flatten().filter_map(|v| v.as_str()).collect();
        let g = f["growable_bytes"].as_u64().unwrap_or(0);
        (f["type"].as_str().unwrap_or("").to_string(), id, mps.join(","), if g > 0 { human(g) } else { "-".into() })
    };
    for d in inv["disks"].as_array().into_iter().flatten() {
        let (t, id, mp, g) = fsrow(&d["filesystem"]);
        let ty = d["partition_table"].as_str().map(str::to_string).unwrap_or(t);
        rows.push([
            d["device"].as_str().unwrap_or("").into(),
            human(d["size_bytes"].as_u64().unwrap_or(0)),
            d["logical_sector_size"].to_string(),
            ty,
            match d["serial"].as_str() {
                Some(s) if id.is_empty() => format!("serial {s}"),
                _ => id,
            },
            mp,
            g,
        ]);
        for p in d["partitions"].as_array().into_iter().flatten() {
            let (t, id, mp, g) = fsrow(&p["filesystem"]);
            let dev =
                p["device"].as_str().map(str::to_string).unwrap_or_else(|| format!("(partition {})", p["number"]));
            rows.push([format!("  {dev}"), human(p["size_bytes"].as_u64().unwrap_or(0)), String::new(), t, id, mp, g]);
        }
    }
    let mut w = [0usize; 7];
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r.iter().enumerate().map(|(i, c)| format!("{c:<width$}", width = w[i])).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `xcp-vm-agent inventory [--json]`: `inv` as JSON or as a table.
pub fn print_inventory(inv: &Value, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(inv)?);
    } else {
        print!("{}", render_table(inv));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_rendering_shows_growable_space() {
        let inv = json!({"disks": [{
            "device": "/dev/xvdb", "size_bytes": 2147483648u64, "logical_sector_size": 512, "serial": null,
            "partition_table": "gpt", "filesystem": null,
            "partitions": [{"number": 1, "device": "/dev/xvdb1", "size_bytes": 1073741824u64,
              "filesystem": {"type": "ext4", "uuid": "u-1", "label": null, "mount_points": ["/data"],
                             "growable_bytes": 1073741824u64}}]}]});
        let t = render_table(&inv);
        assert!(t.contains("/dev/xvdb1"), "{t}");
        assert!(t.contains("1.0 GiB"), "{t}");
        assert!(t.contains("/data"), "{t}");
        assert_eq!(t.lines().count(), 3);
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.5 KiB");
    }
}
