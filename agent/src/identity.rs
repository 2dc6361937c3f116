//! VM identity: the VM UUID and where it came from, plus hostname, OS, kernel
//! and hypervisor.
//!
//! Sources, in order: xenstore key `vm` (`/vm/<uuid>`), `/sys/hypervisor/uuid`,
//! DMI `/sys/class/dmi/id/product_uuid`, then `/etc/machine-id` as a last
//! resort (containers, micro-VMs) with a warning. Every source's value is
//! reported, and disagreement between them is a warning. All file reads go
//! through a root directory so tests feed a fake tree.
use serde::Serialize;
use std::path::{Path, PathBuf};

/// One identity source and what it answered.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SourceValue {
    pub source: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct OsInfo {
    pub id: String,
    pub name: String,
    pub version_id: String,
    pub pretty_name: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Identity {
    pub vm_uuid: String,
    /// Which source answered: `xenstore`, `sys-hypervisor`, `dmi`, `machine-id`.
    pub source: String,
    pub sources: Vec<SourceValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domid: Option<u32>,
    pub hostname: String,
    pub os: OsInfo,
    pub kernel: String,
    /// `xen`, `kvm`, `vmware`, ... or `none`/`unknown`.
    pub hypervisor: String,
    pub warnings: Vec<String>,
}

/// What xenstore said, gathered by the caller (native client or none).
#[derive(Debug, Clone, Default)]
pub struct XenFacts {
    /// Raw value of key `vm`, or the error text.
    pub vm: Option<Result<String, String>>,
    pub domid: Option<u32>,
}

/// Trim (whitespace and NULs), lower-case and check the 8-4-4-4-12 hex
/// shape; None when it is not a UUID. Placeholders pass: see
/// [`normalise_uuid`].
/// (The check itself is `xen::identity::normalise_uuid`: this module uses
/// `xen`, never the other way round.)
pub fn uuid_shape(s: &str) -> Option<String> {
    crate::xen::identity::normalise_uuid(s)
}

/// Normalise a UUID ([`uuid_shape`]) and reject the all-zero and all-F
/// placeholders firmware uses.
pub fn normalise_uuid(s: &str) -> Result<String, String> {
    let u = uuid_shape(s).ok_or_else(|| format!("{:?} is not a UUID", s.trim()))?;
    let hex = u.replace('-', "");
    if hex.bytes().all(|c| c == b'0') || hex.bytes().all(|c| c == b'f') {
        return Err(format!("{u} is a placeholder, not a real UUID"));
    }
    Ok(u)
}

/// `/etc/machine-id` (32 hex digits) written as a UUID.
pub fn machine_id_as_uuid(s: &str) -> Result<String, String> {
    let h = s.trim().to_ascii_lowercase();
    if h.len() != 32 || !h.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!("{:?} is not a machine id", s.trim()));
    }
    normalise_uuid(&format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32]))
}

fn read(root: &Path, p: &str) -> Result<String, String> {
    let path = root.join(p.trim_start_matches('/'));
    std::fs::read_to_string(&path).map(|s| s.trim().to_string()).map_err(|e| format!("{}: {e}", path.display()))
}

fn file_source(root: &Path, name: &str, p: &str, conv: fn(&str) -> Result<String, String>) -> SourceValue {
    match read(root, p).and_then(|s| conv(&s)) {
        Ok(v) => SourceValue { source: name.into(), value: Some(v), error: None },
        Err(e) => SourceValue { source: name.into(), value: None, error: Some(e) },
    }
}

/// Gather identity from the tree at `root` (`/` in production) and the
/// xenstore facts the caller read.
pub fn collect(root: &Path, xen: &XenFacts) -> Identity {
    let mut sources = Vec::new();
    let xs = match &xen.vm {
        Some(Ok(v)) => match normalise_uuid(v.trim().trim_start_matches("/vm/")) {
            Ok(u) => SourceValue { source: "xenstore".into(), value: Some(u), error: None },
            Err(e) => SourceValue { source: "xenstore".into(), value: None, error: Some(e) },
        },
        Some(Err(e)) => SourceValue { source: "xenstore".into(), value: None, error: Some(e.clone()) },
        None => SourceValue { source: "xenstore".into(), value: None, error: Some("no xenstore".into()) },
    };
    sources.push(xs);
    sources.push(file_source(root, "sys-hypervisor", "/sys/hypervisor/uuid", normalise_uuid));
    sources.push(file_source(root, "dmi", "/sys/class/dmi/id/product_uuid", normalise_uuid));
    sources.push(file_source(root, "machine-id", "/etc/machine-id", machine_id_as_uuid));

    let mut warnings = Vec::new();
    let hv: Vec<&SourceValue> = sources[..3].iter().filter(|s| s.value.is_some()).collect();
    let (vm_uuid, source) = if let Some(first) = hv.first() {
        let pairs: Vec<(&str, Option<&str>)> = hv.iter().map(|s| (s.source.as_str(), s.value.as_deref())).collect();
        for w in crate::xen::cross_check(&pairs) {
            warnings.push(format!("identity sources disagree: {w}; using {}", first.source));
        }
        (first.value.clone().expect("filtered on is_some"), first.source.clone())
    } else if let Some(m) = &sources[3].value {
        warnings.push(
            "no hypervisor identity (xenstore, /sys/hypervisor/uuid, DMI); using /etc/machine-id, which the \
             hypervisor does not know"
                .into(),
        );
        (m.clone(), "machine-id".into())
    } else {
        warnings.push("no identity source answered; VM UUID unknown".into());
        ("00000000-0000-0000-0000-000000000000".into(), "none".into())
    };

    Identity {
        vm_uuid,
        source,
        sources,
        domid: xen.domid,
        hostname: hostname(root),
        os: os_release(root),
        kernel: kernel(root),
        hypervisor: hypervisor(root),
        warnings,
    }
}

fn hostname(root: &Path) -> String {
    if root == Path::new("/") {
        if let Ok(h) = nix::unistd::gethostname() {
            return h.to_string_lossy().into_owned();
        }
    }
    read(root, "/proc/sys/kernel/hostname").or_else(|_| read(root, "/etc/hostname")).unwrap_or_default()
}

fn kernel(root: &Path) -> String {
    let rel = read(root, "/proc/sys/kernel/osrelease").unwrap_or_default();
    let ver = read(root, "/proc/sys/kernel/version").unwrap_or_default();
    format!("Linux {rel} {ver}").trim().to_string()
}

/// Parse `/etc/os-release` (falling back to `/usr/lib/os-release`).
pub fn os_release(root: &Path) -> OsInfo {
    let text = read(root, "/etc/os-release").or_else(|_| read(root, "/usr/lib/os-release")).unwrap_or_default();
    parse_os_release(&text)
}

pub fn parse_os_release(text: &str) -> OsInfo {
    let mut o = OsInfo::default();
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else { continue };
        let v = v.trim().trim_matches('"').trim_matches('\'').to_string();
        match k.trim() {
            "ID" => o.id = v,
            "NAME" => o.name = v,
            "VERSION_ID" => o.version_id = v,
            "PRETTY_NAME" => o.pretty_name = v,
            _ => {}
        }
    }
    o
}

/// `xen` from /sys/hypervisor/type, else guessed from DMI vendor strings.
pub fn hypervisor(root: &Path) -> String {
    if let Ok(t) = read(root, "/sys/hypervisor/type") {
        if !t.is_empty() {
            return t;
        }
    }
    let dmi: String = ["sys_vendor", "product_name", "bios_vendor"]
        .iter()
        .filter_map(|f| read(root, &format!("/sys/class/dmi/id/{f}")).ok())
        .collect::<Vec<_>>()
        .join(" ")
        .to_ascii_lowercase();
    for (needle, name) in [
        ("xen", "xen"),
        ("qemu", "kvm"),
        ("kvm", "kvm"),
        ("vmware", "vmware"),
        ("virtualbox", "virtualbox"),
        ("microsoft", "hyperv"),
        ("amazon ec2", "kvm"),
    ] {
        if dmi.contains(needle) {
            return name.into();
        }
    }
    if dmi.is_empty() {
        "unknown".into()
    } else {
        "none".into()
    }
}

/// The root for identity reads: `/`, or `XCP_AGENT_SYSROOT` (tests).
pub fn sys_root() -> PathBuf {
    std::env::var_os("XCP_AGENT_SYSROOT").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/"))
}

/// Identity of this machine.
pub fn current() -> Identity {
    collect(&sys_root(), &xen_facts())
}

/// Read `vm` and `domid` from xenstore with the native client.
fn xen_facts() -> XenFacts {
    let x = crate::xen::xenstore_identity();
    let vm = match (x.vm_path, x.location, x.error) {
        (Some(v), _, _) => Some(Ok(v)),
        // xenstore is there but could not be read: say why.
        (None, Some(_), Some(e)) => Some(Err(e)),
        // Not a Xen guest.
        _ => None,
    };
    XenFacts { vm, domid: x.domid }
}
#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (p, c) in files {
            let path = d.path().join(p.trim_start_matches('/'));
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, c).unwrap();
        }
        d
    }

    const U: &str = "3F2504E0-4F89-11D3-9A0C-0305E82C3301";
    const MID: &str = "0123456789abcdef0123456789abcdef\n";

    #[test]
    fn normalise_rejects_placeholders_and_garbage() {
        assert_eq!(normalise_uuid(U).unwrap(), U.to_lowercase());
        assert!(normalise_uuid("00000000-0000-0000-0000-000000000000").is_err());
        assert!(normalise_uuid("FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF").is_err());
        assert!(normalise_uuid("not-a-uuid").is_err());
        assert!(normalise_uuid("3f2504e0-4f89-11d3-9a0c-0305e82c330").is_err());
    }

    #[test]
    fn xenstore_wins_and_is_stripped() {
        let d = tree(&[("/sys/hypervisor/uuid", U), ("/etc/machine-id", MID)]);
        let x = XenFacts { vm: Some(Ok(format!("/vm/{U}"))), domid: Some(7) };
        let id = collect(d.path(), &x);
        assert_eq!(id.source, "xenstore");
        assert_eq!(id.vm_uuid, U.to_lowercase());
        assert_eq!(id.domid, Some(7));
        assert!(id.warnings.is_empty(), "{:?}", id.warnings);
    }

    #[test]
    fn sys_hypervisor_then_dmi() {
        let d = tree(&[("/sys/class/dmi/id/product_uuid", U), ("/etc/machine-id", MID)]);
        let id = collect(d.path(), &XenFacts::default());
        assert_eq!(id.source, "dmi");
        let d2 = tree(&[("/sys/hypervisor/uuid", U), ("/sys/class/dmi/id/product_uuid", U)]);
        assert_eq!(collect(d2.path(), &XenFacts::default()).source, "sys-hypervisor");
    }

    #[test]
    fn placeholder_dmi_falls_through_to_machine_id_with_warning() {
        let d = tree(&[
            ("/sys/class/dmi/id/product_uuid", "00000000-0000-0000-0000-000000000000"),
            ("/etc/machine-id", MID),
        ]);
        let id = collect(d.path(), &XenFacts::default());
        assert_eq!(id.source, "machine-id");
        assert_eq!(id.vm_uuid, "01234567-89ab-cdef-0123-456789abcdef");
        assert!(id.warnings[0].contains("machine-id"));
        assert!(id.sources[2].error.as_ref().unwrap().contains("placeholder"));
    }

    #[test]
    fn disagreement_is_a_warning() {
        let other = "11111111-2222-3333-4444-555555555555";
        let d = tree(&[("/sys/hypervisor/uuid", U), ("/sys/class/dmi/id/product_uuid", other)]);
        let id = collect(d.path(), &XenFacts::default());
        assert_eq!(id.source, "sys-hypervisor");
        assert_eq!(id.warnings.len(), 1);
        assert!(id.warnings[0].contains("disagree") && id.warnings[0].contains(other));
    }

    #[test]
    fn os_release_and_hypervisor() {
        let d = tree(&[
            ("/etc/os-release", "NAME=\"Debian GNU/Linux\"\nID=debian\nVERSION_ID=\"12\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n"),
            ("/sys/class/dmi/id/sys_vendor", "QEMU"),
        ]);
        let id = collect(d.path(), &XenFacts::default());
        assert_eq!(id.os.id, "debian");
        assert_eq!(id.os.version_id, "12");
        assert_eq!(id.hypervisor, "kvm");
        let d2 = tree(&[("/sys/hypervisor/type", "xen")]);
        assert_eq!(hypervisor(d2.path()), "xen");
    }
}
