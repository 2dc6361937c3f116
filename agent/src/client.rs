//! The HTTPS client for protocol v1: TLS setup (server CA or the system
//! roots, optional client certificate), check-in with long-poll, and result
//! delivery. Errors are turned into one clear sentence naming what failed.
//!
//! ureq (blocking, rustls with the ring provider) keeps one connection alive
//! between check-ins, so an idle check-in costs no TLS handshake.
use anyhow::{anyhow, bail, Context, Result};
use std::path::Path;
use std::time::Duration;

use crate::config::Config;
use crate::protocol::{CheckIn, ResultsAck, ResultsReport, CHECKIN_PATH, MAX_BODY_BYTES, RESULTS_PATH};
use ureq::tls::{Certificate, ClientCert, PemItem, RootCerts, TlsConfig, TlsProvider};

/// System CA bundles, as the common distributions lay them out.
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
];

pub struct Client {
    agent: ureq::Agent,
    base: String,
    has_client_cert: bool,
}

/// Install the ring crypto provider once per process.
pub fn init_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn read_pem(path: &Path, what: &str) -> Result<Vec<PemItem<'static>>> {
    let data = std::fs::read(path).with_context(|| format!("cannot read {what} {}", path.display()))?;
    let items: Vec<PemItem<'static>> = ureq::tls::parse_pem(&data)
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| anyhow!("{what} {} is not valid PEM: {e}", path.display()))?;
    Ok(items)
}

fn certs_of(items: &[PemItem<'static>]) -> Vec<Certificate<'static>> {
    items
        .iter()
        .filter_map(|i| match i {
            PemItem::Certificate(c) => Some(c.clone()),
            _ => None,
        })
        .collect()
}

fn root_certs(cfg: &Config) -> Result<RootCerts> {
    if let Some(ca) = &cfg.server_cert {
        let certs = certs_of(&read_pem(ca, "server_cert CA bundle")?);
        if certs.is_empty() {
            bail!("server_cert {} holds no certificate", ca.display());
        }
        return Ok(RootCerts::new_with_certs(&certs));
    }
    for b in SYSTEM_BUNDLES {
        let p = Path::new(b);
        if p.is_file() {
            let certs = certs_of(&read_pem(p, "system CA bundle")?);
            if !certs.is_empty() {
                return Ok(RootCerts::new_with_certs(&certs));
            }
        }
    }
    bail!(
        "no CA bundle to verify the server: set \"server_cert\" in {} or install the system CA certificates \
         (ca-certificates)",
        cfg.path.display()
    )
}

fn client_cert(cfg: &Config) -> Result<Option<ClientCert>> {
    let Some((cert, key)) = &cfg.client_cert else { return Ok(None) };
    crate::config::check_key_permissions(key)?;
    let chain = certs_of(&read_pem(cert, "client certificate")?);
    if chain.is_empty() {
        bail!("client certificate file {} holds no certificate", cert.display());
    }
    let key_item = read_pem(key, "client key")?.into_iter().find_map(|i| match i {
        PemItem::PrivateKey(k) => Some(k),
        _ => None,
    });
    let Some(k) = key_item else { bail!("client key file {} holds no private key", key.display()) };
    Ok(Some(ClientCert::new_with_certs(&chain, k)))
}

impl Client {
    pub fn new(cfg: &Config) -> Result<Client> {
        init_crypto();
        let base = cfg.require_server()?.to_string();
        let tls = TlsConfig::builder()
            .provider(TlsProvider::Rustls)
            .root_certs(root_certs(cfg)?)
            .client_cert(client_cert(cfg)?)
            .build();
        let wait = Duration::from_secs(cfg.long_poll_seconds);
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .tls_config(tls)
            .http_status_as_error(false)
            .user_agent(format!("xcp-vm-agent/{}", crate::VERSION))
            .timeout_connect(Some(Duration::from_secs(15)))
            .timeout_send_request(Some(Duration::from_secs(30)))
            .timeout_recv_response(Some(wait + Duration::from_secs(30)))
            .timeout_recv_body(Some(Duration::from_secs(60)))
            .max_idle_connections(2)
            .max_idle_age(Duration::from_secs(300))
            .build()
            .into();
        Ok(Client { agent, base, has_client_cert: cfg.client_cert.is_some() })
    }

    fn post<Req: serde::Serialize, Resp: serde::de::DeserializeOwned>(&self, path: &str, body: &Req) -> Result<Resp> {
        let url = format!("{}{}", self.base, path);
        let json = serde_json::to_vec(body)?;
        let mut resp = self
            .agent
            .post(&url)
            .header("content-type", "application/json")
            .send(&json[..])
            .map_err(|e| anyhow!("cannot reach {url}: {}", explain(&e, self.has_client_cert)))?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .with_config()
            .limit(MAX_BODY_BYTES)
            .read_to_string()
            .map_err(|e| anyhow!("reading the answer of {url} failed: {}", explain(&e, self.has_client_cert)))?;
        if !(200..300).contains(&status) {
            let reason = serde_json::from_str::<crate::protocol::ErrorBody>(&text)
                .map(|e| e.error)
                .unwrap_or_else(|_| snippet(&text));
            bail!("server answered {url} with HTTP {status}: {reason}");
        }
        serde_json::from_str(&text)
            .map_err(|e| anyhow!("server sent malformed JSON for {url} ({e}); body starts: {}", snippet(&text)))
    }

    /// Check in. Jobs come back as raw JSON so that one malformed job is
    /// answered on its own (refused, naming the problem) instead of spoiling
    /// the whole answer.
    pub fn checkin(&self, msg: &CheckIn) -> Result<Vec<serde_json::Value>> {
        #[derive(serde::Deserialize)]
        struct Raw {
            #[serde(default)]
            jobs: Vec<serde_json::Value>,
        }
        let raw: Raw = self.post(CHECKIN_PATH, msg)?;
        Ok(raw.jobs)
    }

    pub fn send_results(&self, msg: &ResultsReport) -> Result<ResultsAck> {
        self.post(RESULTS_PATH, msg)
    }
}

fn snippet(s: &str) -> String {
    let t: String = s.chars().take(120).collect();
    if t.is_empty() {
        "(empty body)".into()
    } else {
        format!("{t:?}")
    }
}

/// One sentence for a transport error, naming TLS problems plainly.
fn explain(e: &ureq::Error, has_client_cert: bool) -> String {
    let s = e.to_string();
    let mut chain = s.clone();
    let mut src = std::error::Error::source(e);
    while let Some(x) = src {
        let t = x.to_string();
        if !chain.contains(&t) {
            chain.push_str(": ");
            chain.push_str(&t);
        }
        src = x.source();
    }
    let low = chain.to_ascii_lowercase();
    if low.contains("unknownissuer") || low.contains("unknown issuer") || low.contains("invalid peer certificate") {
        format!("TLS: the server's certificate is not signed by a trusted CA (check server_cert): {chain}")
    } else if low.contains("unknownca") || low.contains("badcertificate") || low.contains("bad certificate") {
        format!(
            "TLS: the server did not accept this agent's client certificate (not signed by a CA it trusts; check \
             client_cert): {chain}"
        )
    } else if low.contains("broken pipe") || low.contains("connection reset") {
        let why = if has_client_cert {
            "it probably does not accept this agent's client certificate (check client_cert and the CA the server \
             trusts)"
        } else {
            "it probably requires a client certificate, and none is configured (set client_cert)"
        };
        format!("the server dropped the connection right after the TLS handshake ({chain}); {why}")
    } else if low.contains("close_notify") || low.contains("unexpectedeof") || low.contains("unexpected eof") {
        "the server closed the connection without answering".to_string()
    } else if low.contains("certificaterequired")
        || low.contains("certificate required")
        || low.contains("handshake") && low.contains("alert")
    {
        format!("TLS handshake refused by the server (a client certificate may be missing or not trusted; check client_cert): {chain}")
    } else {
        chain
    }
}
