//! `mgmt-server init-pki DIR`: a throw-away PKI for tests and the demo.
//!
//! Writes `ca.pem` (+ `ca-key.pem`), `server-cert.pem`/`server-key.pem` for
//! `localhost` and `127.0.0.1` (plus any extra names given, e.g. the name a
//! VM guest uses for the host), `agent-cert.pem`/`agent-key.pem` (a client
//! certificate signed by the same CA), and `other-ca.pem` with
//! `other-agent-cert.pem`/`other-agent-key.pem`: an unrelated CA and a client
//! certificate it signed, for wrong-CA tests. Private keys are mode 0600.
use anyhow::{Context, Result};
use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
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

fn ca(name: &str) -> Result<(String, KeyPair, CertificateParams)> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    p.distinguished_name.push(DnType::OrganizationName, "xcp-vm-agent test PKI");
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p.not_before = date_time_ymd(2020, 1, 1);
    p.not_after = date_time_ymd(2120, 1, 1);
    let key = KeyPair::generate()?;
    let cert = p.self_signed(&key)?;
    Ok((cert.pem(), key, p))
}

fn leaf(cn: &str, sans: Vec<String>, server: bool, issuer: &Issuer<'_, KeyPair>) -> Result<(String, String)> {
    let mut p = CertificateParams::new(sans)?;
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
    let (ca_pem, ca_key, ca_params) = ca("xcp-vm-agent test CA")?;
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
