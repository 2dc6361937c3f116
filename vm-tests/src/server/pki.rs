//! `mgmt-server init-pki DIR`: a throw-away PKI for tests and the demo.
//!
//! Writes `ca.pem` (+ `ca-key.pem`), `server-cert.pem`/`server-key.pem` for
//! `localhost` and `127.0.0.1` (plus any extra names given, e.g. the name a
//! VM guest uses for the host), `agent-cert.pem`/`agent-key.pem` (a client
//! certificate signed by the same CA), and `other-ca.pem` with
//! `other-agent-cert.pem`/`other-agent-key.pem`: an unrelated CA and a client
//! certificate it signed, for wrong-CA tests. Private keys are mode 0600.
//!
//! The shared `agent-cert.pem` names no VM: it may speak for any VM and
//! exists for tests and the demo. `mgmt-server agent-cert` issues the
//! certificate for one VM ([`agent_cert`]): its UUID as the URI SAN
//! `urn:uuid:<uuid>`, which the server reads back with [`cert_vm_uuids`] and
//! holds the connection to.
use anyhow::{bail, Context, Result};
use rcgen::{
    date_time_ymd, string::Ia5String, BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

pub const CA: &str = "ca.pem";
pub const SERVER_CERT: &str = "server-cert.pem";
pub const SERVER_KEY: &str = "server-key.pem";
pub const AGENT_CERT: &str = "agent-cert.pem";
pub const AGENT_KEY: &str = "agent-key.pem";
pub const OTHER_CA: &str = "other-ca.pem";
pub const OTHER_AGENT_CERT: &str = "other-agent-cert.pem";
pub const OTHER_AGENT_KEY: &str = "other-agent-key.pem";

fn write_file(path: &Path, data: &str, mode: u32) -> Result<()> {
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    std::io::Write::write_all(&mut f, data.as_bytes()).with_context(|| format!("cannot write {}", path.display()))?;
    f.sync_all()?;
    Ok(())
}

const TEST_CA_NAME: &str = "xcp-vm-agent test CA";

/// The CA's parameters; the same name and key give the same issuer, which is
/// how [`agent_cert`] signs with a CA made by an earlier `init-pki`.
fn ca_params(name: &str) -> Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    p.distinguished_name.push(DnType::OrganizationName, "xcp-vm-agent test PKI");
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p.not_before = date_time_ymd(2020, 1, 1);
    p.not_after = date_time_ymd(2120, 1, 1);
    Ok(p)
}

fn ca(name: &str) -> Result<(String, KeyPair, CertificateParams)> {
    let p = ca_params(name)?;
    let key = KeyPair::generate()?;
    let cert = p.self_signed(&key)?;
    Ok((cert.pem(), key, p))
}

fn leaf(cn: &str, sans: Vec<String>, server: bool, issuer: &Issuer<'_, KeyPair>) -> Result<(String, String)> {
    leaf_with(CertificateParams::new(sans)?, cn, server, issuer)
}

fn leaf_with(
    mut p: CertificateParams,
    cn: &str,
    server: bool,
    issuer: &Issuer<'_, KeyPair>,
) -> Result<(String, String)> {
    p.distinguished_name.push(DnType::CommonName, cn);
    p.use_authority_key_identifier_extension = true;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages =
        vec![if server { ExtendedKeyUsagePurpose::ServerAuth } else { ExtendedKeyUsagePurpose::ClientAuth }];
    p.not_before = date_time_ymd(2020, 1, 1);
    p.not_after = date_time_ymd(2120, 1, 1);
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Create the PKI in `dir` (created if missing; existing files are replaced).
pub fn init_pki(dir: &Path) -> Result<()> {
    init_pki_with_sans(dir, &[])
}

/// [`init_pki`] whose server certificate also names `extra_sans` (DNS names
/// or IP addresses) besides `localhost` and `127.0.0.1`.
pub fn init_pki_with_sans(dir: &Path, extra_sans: &[String]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (ca_pem, ca_key, ca_params) = ca(TEST_CA_NAME)?;
    write_file(&dir.join(CA), &ca_pem, 0o644)?;
    write_file(&dir.join("ca-key.pem"), &ca_key.serialize_pem(), 0o600)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let mut sans: Vec<String> = vec!["localhost".into(), "127.0.0.1".into()];
    sans.extend(extra_sans.iter().cloned());
    let (c, k) = leaf("localhost", sans, true, &issuer)?;
    write_file(&dir.join(SERVER_CERT), &c, 0o644)?;
    write_file(&dir.join(SERVER_KEY), &k, 0o600)?;
    let (c, k) = leaf("xcp-vm-agent test agent", vec!["agent.invalid".into()], false, &issuer)?;
    write_file(&dir.join(AGENT_CERT), &c, 0o644)?;
    write_file(&dir.join(AGENT_KEY), &k, 0o600)?;

    let (other_pem, other_key, other_params) = ca("unrelated test CA")?;
    write_file(&dir.join(OTHER_CA), &other_pem, 0o644)?;
    let other = Issuer::new(other_params, other_key);
    let (c, k) = leaf("agent of the unrelated CA", vec!["agent.invalid".into()], false, &other)?;
    write_file(&dir.join(OTHER_AGENT_CERT), &c, 0o644)?;
    write_file(&dir.join(OTHER_AGENT_KEY), &k, 0o600)?;
    Ok(())
}

/// `mgmt-server agent-cert`: a client certificate for the VM `vm_uuid`,
/// signed by the CA of `pki_dir` (made by `init-pki`), carrying the URI SAN
/// `urn:uuid:<vm_uuid>`. Writes `agent-cert.pem`, `agent-key.pem` (0600) and
/// a copy of `ca.pem` into `out`.
pub fn agent_cert(pki_dir: &Path, vm_uuid: &str, out: &Path) -> Result<()> {
    let Some(uuid) = xcp_vm_agent::identity::uuid_shape(vm_uuid).filter(|_| vm_uuid.trim() == vm_uuid) else {
        bail!("--vm-uuid {vm_uuid:?} is not a UUID (8-4-4-4-12 hex digits)");
    };
    let key_path = pki_dir.join("ca-key.pem");
    let key_pem =
        std::fs::read_to_string(&key_path).with_context(|| format!("cannot read the CA key {}", key_path.display()))?;
    let key = KeyPair::from_pem(&key_pem).with_context(|| format!("{} is not a private key", key_path.display()))?;
    let ca_path = pki_dir.join(CA);
    let ca_pem = std::fs::read_to_string(&ca_path).with_context(|| format!("cannot read {}", ca_path.display()))?;
    // The CA certificate must hold this key's public key, or what we sign
    // would not chain to it.
    let ca_der = rustls_pemfile::certs(&mut ca_pem.as_bytes())
        .next()
        .with_context(|| format!("no certificate in {}", ca_path.display()))?
        .with_context(|| format!("invalid PEM in {}", ca_path.display()))?;
    let pk = key.public_key_raw();
    if !ca_der.windows(pk.len()).any(|w| w == pk) {
        bail!("{} does not belong to the CA certificate {}", key_path.display(), ca_path.display());
    }
    let issuer = Issuer::new(ca_params(TEST_CA_NAME)?, key);
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.subject_alt_names = vec![SanType::URI(Ia5String::try_from(format!("urn:uuid:{uuid}"))?)];
    let (c, k) = leaf_with(p, &format!("xcp-vm-agent {uuid}"), false, &issuer)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    write_file(&out.join(AGENT_CERT), &c, 0o644)?;
    write_file(&out.join(AGENT_KEY), &k, 0o600)?;
    write_file(&out.join(CA), &ca_pem, 0o644)?;
    Ok(())
}

/// The VM UUIDs a certificate (DER) names as `urn:uuid:` URI SANs, lower
/// case. Empty for a certificate that names no VM (the shared test one).
pub fn cert_vm_uuids(der: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    for uri in san_uris(der).unwrap_or_default() {
        if let Some(u) = uri.get(..9).filter(|p| p.eq_ignore_ascii_case("urn:uuid:")).map(|_| &uri[9..]) {
            out.push(u.to_ascii_lowercase());
        }
    }
    out
}

/// One DER element at the start of `b`: (tag, contents, rest).
fn der(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, b) = b.split_first()?;
    let (&l, mut b) = b.split_first()?;
    let len = if l < 0x80 {
        l as usize
    } else {
        let n = (l & 0x7f) as usize;
        if n == 0 || n > 4 || b.len() < n {
            return None;
        }
        let v = b[..n].iter().fold(0usize, |a, &x| a << 8 | x as usize);
        b = &b[n..];
        v
    };
    (b.len() >= len).then(|| (tag, &b[..len], &b[len..]))
}

/// The URI entries of the subjectAltName extension (OID 2.5.29.17).
fn san_uris(cert: &[u8]) -> Option<Vec<String>> {
    let (_, cert, _) = der(cert)?; // Certificate SEQUENCE
    let (_, mut tbs, _) = der(cert)?; // TBSCertificate SEQUENCE
    while !tbs.is_empty() {
        let (tag, body, rest) = der(tbs)?;
        tbs = rest;
        if tag != 0xa3 {
            continue; // [3] extensions
        }
        let (_, mut exts, _) = der(body)?;
        while !exts.is_empty() {
            let (_, ext, rest) = der(exts)?;
            exts = rest;
            let (_, oid, mut ext) = der(ext)?;
            if oid != [0x55, 0x1d, 0x11] {
                continue;
            }
            let (mut tag, mut val, r) = der(ext)?;
            if tag == 0x01 {
                ext = r; // critical flag
                (tag, val, _) = der(ext)?;
            }
            if tag != 0x04 {
                return None;
            }
            let (_, mut names, _) = der(val)?;
            let mut uris = Vec::new();
            while !names.is_empty() {
                let (tag, v, rest) = der(names)?;
                names = rest;
                if tag == 0x86 {
                    uris.push(String::from_utf8_lossy(v).into_owned());
                }
            }
            return Some(uris);
        }
    }
    Some(Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_vm_certificates_carry_their_uuid() {
        let d = tempfile::tempdir().unwrap();
        init_pki(d.path()).unwrap();
        let u = "6A1E4C2B-0D3F-4E5A-9B8C-7D6E5F4A3B2C";
        agent_cert(d.path(), u, &d.path().join("vm")).unwrap();
        let pem = std::fs::read(d.path().join("vm").join(AGENT_CERT)).unwrap();
        let c = rustls_pemfile::certs(&mut &pem[..]).next().unwrap().unwrap();
        assert_eq!(cert_vm_uuids(&c), vec![u.to_ascii_lowercase()]);
        // The shared test certificate names no VM.
        let pem = std::fs::read(d.path().join(AGENT_CERT)).unwrap();
        let c = rustls_pemfile::certs(&mut &pem[..]).next().unwrap().unwrap();
        assert!(cert_vm_uuids(&c).is_empty());
        assert!(agent_cert(d.path(), "not-a-uuid", &d.path().join("x")).is_err());
        // Garbage never panics.
        for n in 0..c.len() {
            let _ = cert_vm_uuids(&c[..n]);
        }
    }
}
