//! The reference management server (`mgmt-server`): protocol v1 over HTTPS
//! for agents, a plain-HTTP admin API on loopback for people and tests.
//!
//! - [`pki`]: `init-pki`, a throw-away CA with server and agent certificates.
//! - [`http`]: the small HTTP/1.1 layer both listeners share.
//! - [`store`]: agents, jobs and results, persisted in the state directory.
//! - [`api`]: `/api/v1/checkin` and `/api/v1/results` (docs/protocol.md).
//! - [`admin`]: `/admin/v1/...` (docs/protocol.md, "Admin API").
//!
//! One thread per connection over `std::net::TcpListener`; a held long-poll
//! check-in parks its thread on the store's condition variable.
pub mod admin;
pub mod api;
pub mod http;
pub mod pki;
pub mod store;
pub mod util;

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Conn, ReadError, Request, Response};
use store::Store;

/// Longest the server holds a check-in, whatever the agent announces.
pub const DEFAULT_MAX_WAIT_SECONDS: u64 = 300;
/// A keep-alive connection idle this long between requests is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(330);

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub listen: String,
    pub admin_listen: String,
    pub pki: PathBuf,
    pub state: PathBuf,
    /// None: require client certificates when the PKI has `agent-cert.pem`.
    pub client_auth: Option<bool>,
    pub max_wait_seconds: u64,
    pub ready_file: Option<PathBuf>,
}

/// A started server: its bound addresses and its state.
pub struct Server {
    pub api_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub store: Arc<Store>,
    pub client_auth: bool,
}

/// Log one line to stderr with a timestamp.
pub fn log(msg: impl AsRef<str>) {
    let t = util::now_ms();
    eprintln!("{}.{:03} mgmt-server: {}", t / 1000, t % 1000, msg.as_ref());
}

fn resolve(addr: &str, what: &str) -> Result<Vec<SocketAddr>> {
    let v: Vec<SocketAddr> =
        addr.to_socket_addrs().with_context(|| format!("invalid {what} address {addr:?} (want HOST:PORT)"))?.collect();
    if v.is_empty() {
        bail!("{what} address {addr:?} resolves to nothing");
    }
    Ok(v)
}

fn load_certs(path: &Path) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(f))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("invalid PEM in {}", path.display()))?;
    if certs.is_empty() {
        bail!("no certificate in {}", path.display());
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<rustls::pki_types::PrivateKeyDer<'static>> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    rustls_pemfile::private_key(&mut std::io::BufReader::new(f))
        .with_context(|| format!("invalid PEM in {}", path.display()))?
        .with_context(|| format!("no private key in {}", path.display()))
}

/// The rustls server configuration for a PKI directory.
pub fn tls_config(pki_dir: &Path, client_auth: bool) -> Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = load_certs(&pki_dir.join(pki::SERVER_CERT))?;
    let key = load_key(&pki_dir.join(pki::SERVER_KEY))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = if client_auth {
        let mut roots = rustls::RootCertStore::empty();
        for c in load_certs(&pki_dir.join(pki::CA))? {
            roots.add(c).context("cannot use ca.pem as a trust anchor")?;
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .context("cannot build the client certificate verifier")?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let mut cfg = builder.with_single_cert(certs, key).context("server certificate and key do not fit")?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Bind both listeners, start their accept threads and return at once.
pub fn start(opts: &ServeOptions) -> Result<Server> {
    let admin_addrs = resolve(&opts.admin_listen, "--admin-listen")?;
    if let Some(a) = admin_addrs.iter().find(|a| !a.ip().is_loopback()) {
        bail!("--admin-listen {a} is not a loopback address: the admin API has no authentication, so it only listens on 127.0.0.1 or ::1");
    }
    let client_auth = opts.client_auth.unwrap_or_else(|| opts.pki.join(pki::AGENT_CERT).exists());
    let tls = tls_config(&opts.pki, client_auth)?;
    let store = Arc::new(Store::open(&opts.state)?);
    let api = TcpListener::bind(&resolve(&opts.listen, "--listen")?[..])
        .with_context(|| format!("cannot listen on {}", opts.listen))?;
    let admin =
        TcpListener::bind(&admin_addrs[..]).with_context(|| format!("cannot listen on {}", opts.admin_listen))?;
    let server =
        Server { api_addr: api.local_addr()?, admin_addr: admin.local_addr()?, store: store.clone(), client_auth };
    let max_wait = Duration::from_secs(opts.max_wait_seconds);
    {
        let store = store.clone();
        std::thread::Builder::new().name("api-accept".into()).spawn(move || {
            for s in api.incoming() {
                match s {
                    Ok(s) => {
                        let (store, tls) = (store.clone(), tls.clone());
                        let _ = std::thread::Builder::new()
                            .name("api-conn".into())
                            .spawn(move || serve_tls(s, tls, store, max_wait));
                    }
                    Err(e) => {
                        log(format!("accept failed: {e}"));
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        })?;
    }
    std::thread::Builder::new().name("admin-accept".into()).spawn(move || {
        for s in admin.incoming() {
            match s {
                Ok(s) => {
                    let store = store.clone();
                    let _ = std::thread::Builder::new().name("admin-conn".into()).spawn(move || serve_admin(s, store));
                }
                Err(e) => {
                    log(format!("admin accept failed: {e}"));
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    })?;
    Ok(server)
}

/// `mgmt-server serve`: start, announce the addresses, run until killed.
pub fn serve(opts: &ServeOptions) -> Result<()> {
    let s = start(opts)?;
    let line = format!("listening https://{} admin http://{}", s.api_addr, s.admin_addr);
    log(format!(
        "{line} (client certificates {}, state in {}, long-poll max {} s)",
        if s.client_auth { "required" } else { "not required" },
        opts.state.display(),
        opts.max_wait_seconds
    ));
    if let Some(p) = &opts.ready_file {
        util::write_atomic(p, format!("{line}\n").as_bytes())?;
    }
    println!("{line}");
    std::io::stdout().flush()?;
    loop {
        std::thread::park();
    }
}

/// What a connection needs beyond Read + Write: its TCP socket, for timeouts.
trait Sock: Read + Write {
    fn tcp(&self) -> &TcpStream;
    fn finish(&mut self) {}
}

impl Sock for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl Sock for rustls::StreamOwned<rustls::ServerConnection, TcpStream> {
    fn tcp(&self) -> &TcpStream {
        &self.sock
    }
    fn finish(&mut self) {
        self.conn.send_close_notify();
        let _ = self.flush();
    }
}

/// The request loop shared by both listeners: read, route, answer, log,
/// until the client closes or a request cannot be read.
fn request_loop<S: Sock>(
    mut conn: Conn<S>,
    peer: &str,
    max_body: u64,
    route: &dyn Fn(&Request) -> (Response, Option<String>),
) {
    loop {
        let _ = conn.stream.tcp().set_read_timeout(Some(IDLE_TIMEOUT));
        match conn.read_request(max_body) {
            Ok(req) => {
                let t0 = Instant::now();
                let (resp, note) = route(&req);
                let close = req.close;
                let ok = conn.respond(resp.status, resp.content_type, &resp.body, close).is_ok();
                log(format!(
                    "{peer} {} {}{}{} -> {} ({} bytes in, {} out, {} ms){}{}",
                    req.method,
                    req.path,
                    if req.query.is_empty() { "" } else { "?" },
                    req.query,
                    resp.status,
                    req.body.len(),
                    resp.body.len(),
                    t0.elapsed().as_millis(),
                    note.map(|n| format!(": {n}")).unwrap_or_default(),
                    if ok { "" } else { " [client gone before the answer]" }
                ));
                if close || !ok {
                    conn.stream.finish();
                    return;
                }
            }
            Err(ReadError::Closed) => return,
            Err(ReadError::Io(e)) => {
                if !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) {
                    if e.kind() != std::io::ErrorKind::UnexpectedEof {
                        log(format!("{peer} connection error: {e}"));
                    }
                } else {
                    log(format!("{peer} idle keep-alive connection closed"));
                }
                return;
            }
            Err(ReadError::Bad(m)) => {
                log(format!("{peer} bad request -> 400: {m}"));
                let r = Response::error(400, m);
                let _ = conn.respond(400, r.content_type, &r.body, true);
                conn.stream.finish();
                return;
            }
            Err(ReadError::HeadTooLarge) => {
                log(format!("{peer} request head too large -> 431"));
                let r = Response::error(431, "request head too large");
                let _ = conn.respond(431, r.content_type, &r.body, true);
                conn.stream.finish();
                return;
            }
            Err(ReadError::TooLarge(m)) => {
                log(format!("{peer} body too large -> 413: {m}"));
                let r = Response::error(413, m);
                let _ = conn.respond(413, r.content_type, &r.body, true);
                conn.stream.finish();
                let _ = conn.stream.tcp().set_read_timeout(Some(Duration::from_secs(2)));
                conn.drain_input(2 * max_body);
                return;
            }
        }
    }
}

fn serve_tls(tcp: TcpStream, tls: Arc<rustls::ServerConfig>, store: Arc<Store>, max_wait: Duration) {
    let peer = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(30)));
    let _ = tcp.set_nodelay(true);
    let conn = match rustls::ServerConnection::new(tls) {
        Ok(c) => c,
        Err(e) => return log(format!("{peer} TLS setup failed: {e}")),
    };
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        if let Err(e) = s.conn.complete_io(&mut s.sock) {
            // Send the alert rustls queued (for example CertificateRequired),
            // so the client learns why instead of seeing a broken pipe.
            while s.conn.wants_write() {
                if s.conn.write_tls(&mut s.sock).is_err() {
                    break;
                }
            }
            let hint = if e.to_string().contains("no certificates") || e.to_string().contains("CertificateRequired") {
                " (the client presented no client certificate)"
            } else {
                ""
            };
            return log(format!("{peer} TLS handshake failed: {e}{hint}"));
        }
    }
    let client_cert = s.conn.peer_certificates().map(|c| !c.is_empty()).unwrap_or(false);
    let cert_vms =
        s.conn.peer_certificates().and_then(|c| c.first()).map(|c| pki::cert_vm_uuids(c)).unwrap_or_default();
    let ctx = api::Ctx { store, peer: peer.clone(), client_cert, cert_vms, max_wait };
    request_loop(Conn::new(s), &peer, xcp_vm_agent::protocol::MAX_BODY_BYTES, &|req| api::route(&ctx, req));
}

fn serve_admin(tcp: TcpStream, store: Arc<Store>) {
    let peer = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
    let Ok(local) = tcp.local_addr() else { return };
    let _ = tcp.set_nodelay(true);
    request_loop(Conn::new(tcp), &format!("admin {peer}"), xcp_vm_agent::protocol::MAX_BODY_BYTES, &|req| {
        match admin::refuse(req, local) {
            Some(r) => {
                let note = serde_json::from_slice::<serde_json::Value>(&r.body).ok().map(|v| v["error"].to_string());
                (r, note)
            }
            None => admin::route(&store, req),
        }
    });
}
