//! Disks addressed by their Xen VBD: `device/vbd/<number>` in xenstore, its
//! backend (`sectors`, `sector-size`, `dev`, `params`) and the guest block
//! device blkfront made for it, found through sysfs
//! (`/sys/block/X/device/nodename` = `device/vbd/<number>`), never by name
//! guessing. Blkfront disks have no serial and no `/dev/disk/by-id` entry, so
//! this is how a job's `{"xen_vbd": <number>}` target becomes `/dev/xvdb`,
//! after checking the guest sees the size the backend reports.
//!
//! `<number>` is the VBD's virtual-device number, the id under `device/vbd/`
//! (51728 for xvdb: 202 << 8 | disk << 4).
use super::xenstore::{Client, XsError};
use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One VBD as the inventory shows it. Fields are None when xenstore or sysfs
/// does not say.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Vbd {
    /// The virtual-device number: the id in `device/vbd/<number>`.
    pub number: u32,
    /// The name the number decodes to (`xvdb`), for orientation only.
    pub expected_name: Option<String>,
    /// Frontend `device-type`: `disk` or `cdrom`.
    pub device_type: Option<String>,
    /// Frontend `backend`: the backend's xenstore path.
    pub backend: Option<String>,
    /// Backend `dev`, the device name the toolstack gave the VBD.
    pub backend_dev: Option<String>,
    /// Backend `params` (the VDI's backing file or device in dom0).
    pub params: Option<String>,
    /// Backend `mode`: `w` or `r`.
    pub mode: Option<String>,
    /// Backend size: `sectors` (always 512-byte units) × 512.
    pub size_bytes: Option<u64>,
    /// Backend `sector-size`: the logical sector size.
    pub sector_size: Option<u32>,
    /// The guest block device (`/dev/xvdb`), found through sysfs.
    pub device: Option<PathBuf>,
    /// The size the guest kernel sees (`/sys/block/X/size` × 512).
    pub guest_size_bytes: Option<u64>,
}

/// The VBDs of this guest, through a fresh xenstore connection and the real
/// `/sys`. Not a Xen guest (no xenstore): an empty list.
pub fn list_vbds() -> Result<Vec<Vbd>> {
    let mut c = match Client::open() {
        Ok(c) => c,
        Err(XsError::NotAvailable { .. }) => return Ok(Vec::new()),
        Err(e) => return Err(e).context("cannot list Xen VBDs"),
    };
    list_vbds_in(&mut c, Path::new("/sys"), Path::new("/dev")).context("cannot list Xen VBDs")
}

/// Resolve `{"xen_vbd": number}` to the guest's block device, checking the
/// guest sees the size the backend reports. The hook for `crate::disk`.
pub fn resolve_vbd(number: u32) -> Result<PathBuf> {
    let mut c = Client::open().with_context(|| format!("cannot resolve Xen VBD {number}"))?;
    resolve_vbd_in(&mut c, Path::new("/sys"), Path::new("/dev"), number)
}

/// [`list_vbds`] with the client and the `/sys` and `/dev` roots given.
pub fn list_vbds_in(client: &mut Client, sys_root: &Path, dev_root: &Path) -> Result<Vec<Vbd>, XsError> {
    let block = blkfront_devices(sys_root);
    let mut ids: Vec<u32> = client.directory_opt("device/vbd")?.iter().filter_map(|s| s.parse().ok()).collect();
    ids.sort_unstable();
    let mut out = Vec::new();
    for number in ids {
        out.push(read_vbd(client, number, &block, sys_root, dev_root)?);
    }
    Ok(out)
}

/// [`resolve_vbd`] with the client and the `/sys` and `/dev` roots given.
pub fn resolve_vbd_in(client: &mut Client, sys_root: &Path, dev_root: &Path, number: u32) -> Result<PathBuf> {
    let fe = format!("device/vbd/{number}");
    let block = blkfront_devices(sys_root);
    let exists = client.read_opt(&format!("{fe}/backend")).with_context(|| format!("cannot read {fe}/backend"))?;
    if exists.is_none() {
        let known: Vec<String> = client.directory_opt("device/vbd").unwrap_or_default();
        bail!(
            "Xen VBD {number} does not exist: xenstore has no {fe} (this guest's VBDs: {})",
            if known.is_empty() { "none".to_string() } else { known.join(", ") }
        );
    }
    let vbd = read_vbd(client, number, &block, sys_root, dev_root).with_context(|| format!("cannot read {fe}"))?;
    let label = match &vbd.backend_dev {
        Some(d) => format!("Xen VBD {number} ({d})"),
        None => format!("Xen VBD {number}"),
    };
    if vbd.device_type.as_deref() == Some("cdrom") {
        bail!("{label} is a CD-ROM drive, not a disk");
    }
    let Some(device) = vbd.device.clone() else {
        bail!(
            "{label} has no block device in this guest: no /sys/block/*/device/nodename says {fe} \
             (is the blkfront driver loaded and the device connected?)"
        );
    };
    let Some(backend_size) = vbd.size_bytes else {
        bail!("{label}: the backend {} does not report its size (sectors)", vbd.backend.as_deref().unwrap_or("?"));
    };
    match vbd.guest_size_bytes {
        Some(g) if g == backend_size => {}
        Some(g) => bail!(
            "{label} is {} here but {backend_size} bytes according to its backend: refusing to use a \
             device whose size does not match (has the disk been resized without the guest seeing it?)",
            format_args!("{} ({g} bytes)", device.display())
        ),
        None => bail!("{label}: cannot read the size of {}", device.display()),
    }
    check_node(&device, sys_root, &vbd)?;
    Ok(device)
}

/// Make sure the `/dev` node is the block device sysfs describes.
fn check_node(device: &Path, sys_root: &Path, vbd: &Vbd) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    use std::os::unix::fs::MetadataExt;
    let name = device.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let meta = std::fs::metadata(device)
        .with_context(|| format!("Xen VBD {}: {} does not exist", vbd.number, device.display()))?;
    if !meta.file_type().is_block_device() {
        bail!("Xen VBD {}: {} is not a block device", vbd.number, device.display());
    }
    if let Ok(dev) = std::fs::read_to_string(sys_root.join("block").join(&name).join("dev")) {
        let (maj, min) = dev.trim().split_once(':').ok_or_else(|| anyhow!("bad dev {dev:?} for {name}"))?;
        let want = (maj.parse::<u64>()?, min.parse::<u64>()?);
        let rdev = meta.rdev();
        let got = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
        if got != want {
            bail!(
                "Xen VBD {}: {} is device {}:{} but sysfs says {name} is {}:{}",
                vbd.number,
                device.display(),
                got.0,
                got.1,
                want.0,
                want.1
            );
        }
    }
    Ok(())
}

fn read_vbd(
    client: &mut Client,
    number: u32,
    block: &BTreeMap<String, String>,
    sys_root: &Path,
    dev_root: &Path,
) -> Result<Vbd, XsError> {
    let fe = format!("device/vbd/{number}");
    let mut v = Vbd { number, expected_name: vbd_name(number), ..Default::default() };
    v.device_type = client.read_opt(&format!("{fe}/device-type"))?;
    v.backend = client.read_opt(&format!("{fe}/backend"))?;
    if let Some(be) = v.backend.clone() {
        let mut opt = |key: &str| -> Result<Option<String>, XsError> {
            match client.read_opt(&format!("{be}/{key}")) {
                Err(e) if e.is_permission_denied() => Ok(None),
                r => r,
            }
        };
        v.size_bytes = opt("sectors")?.and_then(|s| s.trim().parse::<u64>().ok()).map(|s| s * 512);
        v.sector_size = opt("sector-size")?.and_then(|s| s.trim().parse().ok());
        v.backend_dev = opt("dev")?;
        v.params = opt("params")?;
        v.mode = opt("mode")?;
    }
    if let Some(name) = block.get(&fe) {
        v.device = Some(dev_root.join(name));
        v.guest_size_bytes = std::fs::read_to_string(sys_root.join("block").join(name).join("size"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(|s| s * 512);
    }
    Ok(v)
}

/// Map `device/vbd/<n>` → block device name, from `/sys/block/*/device/nodename`.
pub fn blkfront_devices(sys_root: &Path) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(sys_root.join("block")) else { return map };
    for e in entries.flatten() {
        if let Ok(node) = std::fs::read_to_string(e.path().join("device/nodename")) {
            map.insert(node.trim().to_string(), e.file_name().to_string_lossy().into_owned());
        }
    }
    map
}

/// The xvd name a virtual-device number stands for (xen-vbd-interface(7)):
/// `202 << 8 | disk << 4 | partition` or `1 << 28 | disk << 8 | partition`.
/// Only whole disks of the xvd kinds are named; others give None.
pub fn vbd_name(number: u32) -> Option<String> {
    let (disk, part) = if number & (1 << 28) != 0 {
        ((number >> 8) & 0xfffff, number & 0xff)
    } else if number >> 8 == 202 {
        ((number & 0xff) >> 4, number & 0xf)
    } else {
        return None;
    };
    if part != 0 {
        return None;
    }
    Some(format!("xvd{}", disk_letters(disk)))
}

fn disk_letters(mut n: u32) -> String {
    let mut s = Vec::new();
    loop {
        s.push(b'a' + (n % 26) as u8);
        if n < 26 {
            break;
        }
        n = n / 26 - 1;
    }
    s.reverse();
    String::from_utf8(s).expect("ascii")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_decode_to_xvd_names() {
        assert_eq!(vbd_name(51712).as_deref(), Some("xvda"));
        assert_eq!(vbd_name(51728).as_deref(), Some("xvdb"));
        assert_eq!(vbd_name(51713), None);
        assert_eq!(vbd_name((1 << 28) | (26 << 8)).as_deref(), Some("xvdaa"));
        assert_eq!(vbd_name(768), None);
    }

    #[test]
    fn blkfront_devices_come_from_nodename() {
        let d = tempfile::tempdir().unwrap();
        for (name, node) in [("xvda", "device/vbd/51712"), ("xvdb", "device/vbd/51728")] {
            std::fs::create_dir_all(d.path().join("block").join(name).join("device")).unwrap();
            std::fs::write(d.path().join("block").join(name).join("device/nodename"), format!("{node}\n")).unwrap();
        }
        std::fs::create_dir_all(d.path().join("block/loop0")).unwrap();
        let m = blkfront_devices(d.path());
        assert_eq!(m.len(), 2);
        assert_eq!(m["device/vbd/51728"], "xvdb");
    }
}
