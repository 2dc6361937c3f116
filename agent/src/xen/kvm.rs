//! KVM counterparts of the Xen lookups: virtio-serial ports by their name,
//! never by `vportNpM` enumeration order. (Disks by virtio serial,
//! `/dev/disk/by-id/virtio-<serial>`, belong to `crate::disk`.)
use std::path::{Path, PathBuf};

/// The device node of the virtio-serial port QEMU named `name`
/// (`-device virtserialport,name=NAME`): udev's `/dev/virtio-ports/NAME`
/// link, or, where udev is not running, the `vportNpM` node whose sysfs
/// `name` attribute matches.
pub fn virtio_port(name: &str) -> Option<PathBuf> {
    virtio_port_in(Path::new("/dev"), Path::new("/sys"), name)
}

/// [`virtio_port`] with the `/dev` and `/sys` roots given (for tests).
pub fn virtio_port_in(dev_root: &Path, sys_root: &Path, name: &str) -> Option<PathBuf> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return None;
    }
    let link = dev_root.join("virtio-ports").join(name);
    if link.exists() {
        return Some(link);
    }
    let entries = std::fs::read_dir(sys_root.join("class/virtio-ports")).ok()?;
    let mut found: Vec<String> = entries
        .flatten()
        .filter(|e| std::fs::read_to_string(e.path().join("name")).map(|n| n.trim() == name).unwrap_or(false))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    found.sort();
    let node = dev_root.join(found.first()?);
    node.exists().then_some(node)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_by_link_then_by_sysfs_name() {
        let d = tempfile::tempdir().unwrap();
        let (dev, sys) = (d.path().join("dev"), d.path().join("sys"));
        for (port, name) in [("vport1p1", "org.qemu.guest_agent.0"), ("vport1p2", "xcp-vm-agent.0")] {
            std::fs::create_dir_all(sys.join("class/virtio-ports").join(port)).unwrap();
            std::fs::write(sys.join("class/virtio-ports").join(port).join("name"), format!("{name}\n")).unwrap();
            std::fs::create_dir_all(&dev).unwrap();
            std::fs::write(dev.join(port), "").unwrap();
        }
        assert_eq!(virtio_port_in(&dev, &sys, "xcp-vm-agent.0"), Some(dev.join("vport1p2")));
        assert_eq!(virtio_port_in(&dev, &sys, "missing"), None);
        assert_eq!(virtio_port_in(&dev, &sys, "../etc"), None);
        std::fs::create_dir_all(dev.join("virtio-ports")).unwrap();
        std::os::unix::fs::symlink("../vport1p2", dev.join("virtio-ports/xcp-vm-agent.0")).unwrap();
        assert_eq!(virtio_port_in(&dev, &sys, "xcp-vm-agent.0"), Some(dev.join("virtio-ports/xcp-vm-agent.0")));
    }
}
