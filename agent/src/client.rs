//! The HTTPS client for protocol v1: TLS setup (server CA or the system
//! roots, optional client certificate), check-in with long-poll, and result
//! delivery. Errors are turned into one clear sentence naming what failed.
//!
//! The transport is our own small HTTP/1.1 client (`crate::http`, rustls with
//! the ring provider). It keeps one connection alive between check-ins, so an
//! idle check-in costs no TLS handshake.
use anyhow::{anyhow, bail, Result};
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::http::{Failure, HttpError, Https, Proxy, Timeouts};
use crate::protocol::{CheckIn, ResultsAck, ResultsReport, CHECKIN_PATH, MAX_BODY_BYTES, RESULTS_PATH};

/// System CA bundles, as the common distributions lay them out.
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
];

/// The server answered with a status outside 2xx.
#[derive(Debug)]
pub struct HttpRefusal {
    pub url: String,
    pub status: u16,
    pub reason: String,
}

impl std::fmt::Display for HttpRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "server answered {} with HTTP {}: {}", self.url, self.status, self.reason)
    }
}

impl std::error::Error for HttpRefusal {}

impl HttpRefusal {
    /// A refusal that sending the same request again cannot change: a 4xx
    /// other than 401/403 (credentials may be fixed), 408 and 429 (try later).
    pub fn is_final(&self) -> bool {
        (400..500).contains(&self.status) && ![401, 403, 408, 429].contains(&self.status)
    }
}

pub struct Client {
    http: Https,
    has_client_cert: bool,
}

pub use crate::http::init_crypto;

fn pem_error(path: &Path, what: &str, e: rustls::pki_types::pem::Error) -> anyhow::Error {
    match e {
        rustls::pki_types::pem::Error::Io(e) => anyhow!("cannot read {what} {}: {e}", path.display()),
        e => anyhow!("{what} {} is not valid PEM: {e}", path.display()),
    }
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_file_iter(path).and_then(|certs| certs.collect()).map_err(|e| pem_error(path, what, e))
}

fn root_certs(cfg: &Config) -> Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = &cfg.server_cert {
        let (added, _) = roots.add_parsable_certificates(read_certs(ca, "server_cert CA bundle")?);
        if added == 0 {
            bail!("server_cert {} holds no certificate", ca.display());
        }
        return Ok(roots);
    }
    for b in SYSTEM_BUNDLES {
        let p = Path::new(b);
        if p.is_file() {
            let (added, _) = roots.add_parsable_certificates(read_certs(p, "system CA bundle")?);
            if added > 0 {
                return Ok(roots);
            }
        }
    }
    bail!(
        "no CA bundle to verify the server: set \"server_cert\" in {} or install the system CA certificates \
         (ca-certificates)",
        cfg.path.display()
    )
}

fn tls_config(cfg: &Config) -> Result<rustls::ClientConfig> {
    let b = rustls::ClientConfig::builder().with_root_certificates(root_certs(cfg)?);
    let Some((cert, key)) = &cfg.client_cert else { return Ok(b.with_no_client_auth()) };
    crate::config::check_key_permissions(key)?;
    let chain = read_certs(cert, "client certificate")?;
    if chain.is_empty() {
        bail!("client certificate file {} holds no certificate", cert.display());
    }
    let k = match PrivateKeyDer::from_pem_file(key) {
        Err(rustls::pki_types::pem::Error::NoItemsFound) => {
            bail!("client key file {} holds no private key", key.display())
        }
        r => r.map_err(|e| pem_error(key, "client key", e))?,
    };
    b.with_client_auth_cert(chain, k).map_err(|e| {
        anyhow!("client certificate {} and key {} cannot be used together: {e}", cert.display(), key.display())
    })
}

impl Client {
    pub fn new(cfg: &Config) -> Result<Client> {
        init_crypto();
        let target = cfg.require_target()?.clone();
        let proxy = Proxy::from_env(&target.host)?;
        let timeouts = Timeouts {
            connect: Duration::from_secs(15),
            send: Duration::from_secs(30),
            head: Duration::from_secs(cfg.long_poll_seconds + 30),
            body: Duration::from_secs(60),
        };
        let ua = format!("xcp-vm-agent/{}", crate::VERSION);
        let http = Https::new(target, proxy, Arc::new(tls_config(cfg)?), ua, timeouts)?;
        Ok(Client { http, has_client_cert: cfg.client_cert.is_some() })
    }

    fn post<Req: serde::Serialize, Resp: serde::de::DeserializeOwned>(&self, path: &str, body: &Req) -> Result<Resp> {
        let url = self.http.url(path);
        let json = serde_json::to_vec(body)?;
        let (status, bytes) = self.http.post(path, "application/json", &json, MAX_BODY_BYTES).map_err(|f| match f {
            Failure::Reach(e) => anyhow!("cannot reach {url}: {}", explain(&e, self.has_client_cert, false)),
            Failure::Body(e) => {
                anyhow!("reading the answer of {url} failed: {}", explain(&e, self.has_client_cert, true))
            }
        })?;
        let text = String::from_utf8_lossy(&bytes);
        if !(200..300).contains(&status) {
            let reason = serde_json::from_str::<crate::protocol::ErrorBody>(&text)
                .map(|e| e.error)
                .unwrap_or_else(|_| snippet(&text));
            return Err(HttpRefusal { url, status, reason }.into());
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

/// One sentence for a transport error, naming TLS problems plainly, by the
/// error's variant and rustls error (never by its words).
/// `in_body`: the answer had started when it happened.
fn explain(e: &HttpError, has_client_cert: bool, in_body: bool) -> String {
    use rustls::{AlertDescription as Alert, Error as Tls};
    use std::io::ErrorKind::{BrokenPipe, ConnectionReset, UnexpectedEof};
    let chain = e.to_string();
    match e {
        HttpError::Tls { error: Tls::InvalidCertificate(_), .. } => {
            format!("TLS: the server's certificate is not signed by a trusted CA (check server_cert): {chain}")
        }
        HttpError::Tls { error: Tls::AlertReceived(Alert::UnknownCA | Alert::BadCertificate), .. } => format!(
            "TLS: the server did not accept this agent's client certificate (not signed by a CA it trusts; check \
             client_cert): {chain}"
        ),
        // Dropped before the handshake finished: a server going down, or
        // something on the port that does not speak TLS.
        HttpError::Closed { kind: ConnectionReset | BrokenPipe, handshake: true, .. } => {
            format!("the server reset the connection during the TLS handshake (stopping, or not a TLS server): {chain}")
        }
        HttpError::Closed { kind: ConnectionReset | BrokenPipe, .. } if !in_body => {
            let why = if has_client_cert {
                "it probably does not accept this agent's client certificate (check client_cert and the CA the server \
                 trusts)"
            } else {
                "it probably requires a client certificate, and none is configured (set client_cert)"
            };
            format!("the server dropped the connection right after the TLS handshake ({chain}); {why}")
        }
        HttpError::Closed { kind: UnexpectedEof, handshake: false, .. } => {
            if in_body {
                "the server closed the connection in the middle of its answer".to_string()
            } else {
                crate::http::CLOSED_WITHOUT_ANSWER.to_string()
            }
        }
        HttpError::Tls { error: Tls::AlertReceived(a), handshake, .. }
            if *handshake || matches!(a, Alert::CertificateRequired | Alert::HandshakeFailure) =>
        {
            format!("TLS handshake refused by the server (a client certificate may be missing or not trusted; check client_cert): {chain}")
        }
        _ => chain,
    }
}
