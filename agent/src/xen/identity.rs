//! The VM's identity as xenstore reports it (`vm`, `domid`, `name`), and the
//! cross-check of every identity source (xenstore, `/sys/hypervisor/uuid`,
//! DMI `product_uuid`) that turns disagreements into warnings.
//!
//! Reading `/sys/hypervisor/uuid` and DMI belongs to `crate::identity`; this
//! module only compares the values it is given (and owns the UUID shape
//! check `crate::identity` uses), and imports nothing from it.
use super::xenstore::{Client, XsError};
use serde::Serialize;

/// What xenstore says about this domain. Every field is None when it could
/// not be read; `error` says why.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct XenstoreIdentity {
    /// The socket or device used, or None when xenstore is not available.
    pub location: Option<String>,
    /// The raw `vm` key, `/vm/<uuid>`.
    pub vm_path: Option<String>,
    /// The UUID from `vm`, lower case.
    pub vm_uuid: Option<String>,
    /// The `domid` key.
    pub domid: Option<u32>,
    /// The `name` key (the VM's name label in XAPI), when readable.
    pub name: Option<String>,
    /// Why something is missing: "not available" on a non-Xen machine, or
    /// the xenstore error.
    pub error: Option<String>,
}

/// Read the identity keys through a fresh connection. Never fails: a machine
/// without xenstore gives `error: "xenstore not available: ..."`.
pub fn xenstore_identity() -> XenstoreIdentity {
    match Client::open() {
        Ok(mut c) => xenstore_identity_with(&mut c),
        Err(e @ XsError::NotAvailable { .. }) => {
            XenstoreIdentity { error: Some(format!("not available: {e}")), ..Default::default() }
        }
        Err(e) => XenstoreIdentity {
            location: Client::location().map(|p| p.display().to_string()),
            error: Some(e.to_string()),
            ..Default::default()
        },
    }
}

/// Read `vm`, `domid` and `name` (relative to the guest's home path) with an
/// open client.
pub fn xenstore_identity_with(client: &mut Client) -> XenstoreIdentity {
    let mut id = XenstoreIdentity { location: Some(client.path().display().to_string()), ..Default::default() };
    let mut errors = Vec::new();
    match client.read("vm") {
        Ok(v) => {
            match v.strip_prefix("/vm/").and_then(normalise_uuid) {
                Some(u) => id.vm_uuid = Some(u),
                None => errors.push(format!("xenstore key vm is {v:?}, not /vm/<uuid>")),
            }
            id.vm_path = Some(v);
        }
        Err(e) => errors.push(e.to_string()),
    }
    match client.read("domid") {
        Ok(v) => match v.trim().parse::<u32>() {
            Ok(d) => id.domid = Some(d),
            Err(_) => errors.push(format!("xenstore key domid is {v:?}, not a number")),
        },
        // After a timeout the client refuses further requests; one message is enough.
        Err(XsError::Broken { .. }) => {}
        Err(e) => errors.push(e.to_string()),
    }
    match client.read_opt("name") {
        Ok(n) => id.name = n,
        Err(XsError::Broken { .. }) => {}
        Err(e) if e.is_permission_denied() => {}
        Err(e) => errors.push(e.to_string()),
    }
    if !errors.is_empty() {
        id.error = Some(errors.join("; "));
    }
    id
}

/// Lower-case a UUID and check its shape (8-4-4-4-12 hex digits); None when
/// it is not a UUID. Surrounding whitespace and NULs are ignored.
pub fn normalise_uuid(s: &str) -> Option<String> {
    let u = s.trim().trim_matches('\0').to_ascii_lowercase();
    let parts: Vec<&str> = u.split('-').collect();
    let ok = parts.len() == 5
        && parts.iter().zip([8, 4, 4, 4, 12]).all(|(p, n)| p.len() == n && p.bytes().all(|b| b.is_ascii_hexdigit()));
    ok.then_some(u)
}

/// The same UUID with its first three fields byte-swapped: how SMBIOS
/// before 2.6 and some firmware store it.
fn byte_swapped(u: &str) -> String {
    let g: Vec<&str> = u.split('-').collect();
    let swap = |h: &str| -> String {
        let bytes: Vec<&str> = (0..h.len()).step_by(2).map(|i| &h[i..i + 2]).collect();
        bytes.into_iter().rev().collect()
    };
    format!("{}-{}-{}-{}-{}", swap(g[0]), swap(g[1]), swap(g[2]), g[3], g[4])
}

/// Compare every identity source and return one warning per problem: a value
/// that is not a UUID, the nil UUID, or a value that disagrees with the first
/// source that has one. Sources without a value (PV guests have no DMI, KVM
/// has no xenstore) are not a problem.
///
/// `sources` are (name, raw value) pairs, for example
/// `[("xenstore", xs.vm_uuid), ("sys_hypervisor_uuid", ..), ("dmi_product_uuid", ..)]`.
pub fn cross_check(sources: &[(&str, Option<&str>)]) -> Vec<String> {
    let mut warnings = Vec::new();
    let mut reference: Option<(&str, String)> = None;
    for (name, raw) in sources {
        let Some(raw) = raw else { continue };
        let Some(u) = normalise_uuid(raw) else {
            warnings.push(format!("{name} reports {:?}, which is not a UUID", raw.trim()));
            continue;
        };
        if u == "00000000-0000-0000-0000-000000000000" {
            warnings.push(format!("{name} reports the nil UUID"));
            continue;
        }
        match &reference {
            None => reference = Some((name, u)),
            Some((rname, r)) if *r != u => {
                let hint = if byte_swapped(&u) == *r {
                    " (the same UUID with its first three fields byte-swapped: firmware stored it in the other byte order)"
                } else {
                    ""
                };
                warnings.push(format!("{name} reports VM UUID {u} but {rname} reports {r}{hint}"));
            }
            Some(_) => {}
        }
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;

    const U: &str = "4b1c7e3a-2f4d-4c5e-9a8b-1234567890ab";

    #[test]
    fn normalises_case_and_space() {
        assert_eq!(normalise_uuid(" 4B1C7E3A-2F4D-4C5E-9A8B-1234567890AB\n").as_deref(), Some(U));
        assert_eq!(normalise_uuid("Not Settable"), None);
        assert_eq!(normalise_uuid("4b1c7e3a2f4d4c5e9a8b1234567890ab"), None);
    }

    #[test]
    fn agreement_gives_no_warning() {
        let up = U.to_uppercase();
        assert!(cross_check(&[("xenstore", Some(U)), ("sys_hypervisor_uuid", Some(&up)), ("dmi", None)]).is_empty());
    }

    #[test]
    fn disagreement_names_both_sources() {
        let other = "11111111-2222-3333-4444-555555555555";
        let w = cross_check(&[("xenstore", Some(U)), ("dmi_product_uuid", Some(other))]);
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("dmi_product_uuid") && w[0].contains("xenstore") && w[0].contains(other), "{w:?}");
    }

    #[test]
    fn byte_swapped_dmi_is_explained() {
        let swapped = byte_swapped(U);
        assert_eq!(swapped, "3a7e1c4b-4d2f-5e4c-9a8b-1234567890ab");
        let w = cross_check(&[("xenstore", Some(U)), ("dmi_product_uuid", Some(&swapped))]);
        assert!(w[0].contains("byte-swapped"), "{w:?}");
    }

    #[test]
    fn garbage_and_nil_are_reported() {
        let w = cross_check(&[
            ("dmi_product_uuid", Some("Not Settable")),
            ("sys_hypervisor_uuid", Some("00000000-0000-0000-0000-000000000000")),
        ]);
        assert_eq!(w.len(), 2, "{w:?}");
    }
}
