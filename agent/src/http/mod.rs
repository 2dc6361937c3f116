//! A minimal HTTP/1.1 client over rustls: exactly what protocol v1 needs and
//! no more. It replaced ureq (with http and ureq-proto, about 190 KB of the
//! static binary) to keep the agent inside its 2.2 MB size budget.
//!
//! - `Target`: `https://host[:port][/prefix]`, IPv4/IPv6 literals or DNS names.
//! - `Proxy`: an `http://` proxy reached with a CONNECT tunnel, chosen from
//!   the environment by curl's rules for an https URL: `https_proxy`,
//!   `HTTPS_PROXY`, `all_proxy`, `ALL_PROXY` (never `HTTP_PROXY`), with
//!   `no_proxy`/`NO_PROXY` matched as curl matches it.
//! - `Https`: POST a body, read the answer (Content-Length, chunked, or until
//!   the server closes), keep one connection alive between requests, reused
//!   only when it is provably idle (nothing buffered, nothing waiting on the
//!   socket). A reused connection found closed before any answer byte is
//!   replaced once; nothing is retried once the answer has started.
//! - Deadlines, not per-read timeouts: each phase (connect, proxy tunnel and
//!   TLS handshake, sending the request, the answer's head, its body) must
//!   finish within its time as a whole (`Timed`), so a peer that trickles
//!   one byte at a time cannot hold the agent longer than the sum.
//!
//! - Errors are an `HttpError` (connect, TLS with the rustls error, proxy
//!   status, closed, timeout, malformed, too large, other I/O) that callers
//!   match on.
//!
//! Files: `target` (Target, Proxy), `wire` (the request bytes and the
//! parsers of an answer), `error` (HttpError), this file (deadlines and the
//! client), `tests` (loopback tests against a real TLS server and proxy).
use anyhow::{anyhow, Result};
use rustls::pki_types::ServerName;
use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod error;
mod target;
#[cfg(test)]
mod tests;
mod wire;

pub use error::HttpError;

/// Install the ring crypto provider once per process (`client.rs` does
/// before it builds its TLS configuration).
pub fn init_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
pub use target::{no_proxy_matches, Proxy, Target};
pub use wire::{read_body, read_head, request, Head, MAX_HEAD_BYTES};

/// How long each phase of an exchange may take as a whole (deadlines, not
/// per-read timeouts: a peer sending one byte a second gains nothing).
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// TCP connect (to the server or the proxy), all addresses together.
    pub connect: Duration,
    /// The proxy tunnel and TLS handshake together; then, separately,
    /// sending the request.
    pub send: Duration,
    /// From the request sent to the end of the answer's headers.
    pub head: Duration,
    /// The whole body of the answer.
    pub body: Duration,
}

/// A TCP stream whose reads and writes fail with `TimedOut` once
/// `deadline` has passed: before each call the socket timeout is set to
/// what is left.
pub struct Timed {
    tcp: TcpStream,
    deadline: Instant,
}

impl Timed {
    pub fn new(tcp: TcpStream, within: Duration) -> Timed {
        Timed { tcp, deadline: Instant::now() + within }
    }

    fn set(&mut self, within: Duration) {
        self.deadline = Instant::now() + within;
    }

    fn left(&self) -> io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(ErrorKind::TimedOut, "deadline passed"));
        }
        Ok(left)
    }

    /// Whether a byte or the end of the connection is waiting (without
    /// waiting for it).
    fn has_input(&self) -> bool {
        if self.tcp.set_nonblocking(true).is_err() {
            return true;
        }
        let r = self.tcp.peek(&mut [0u8; 1]);
        let _ = self.tcp.set_nonblocking(false);
        !matches!(r, Err(e) if e.kind() == ErrorKind::WouldBlock)
    }
}

impl Read for Timed {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.tcp.set_read_timeout(Some(self.left()?))?;
        self.tcp.read(buf)
    }
}

impl Write for Timed {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tcp.set_write_timeout(Some(self.left()?))?;
        self.tcp.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, Timed>;

struct Conn {
    io: BufReader<Tls>,
    /// An answer has been read on it (so it may have gone stale since).
    used: bool,
}

/// The request went out; either the answer has started or the connection
/// turned out closed (how, in the error) before its first byte.
enum Sent {
    Answering,
    Closed(HttpError),
}

/// Where a request failed: before the answer's body (nothing read), or
/// while reading the body.
#[derive(Debug)]
pub enum Failure {
    Reach(HttpError),
    Body(HttpError),
}

/// The HTTPS client: one server, one kept-alive connection.
pub struct Https {
    target: Target,
    name: ServerName<'static>,
    proxy: Option<Proxy>,
    tls: Arc<rustls::ClientConfig>,
    user_agent: String,
    timeouts: Timeouts,
    idle: Mutex<Option<Conn>>,
}

pub const CLOSED_WITHOUT_ANSWER: &str = "the server closed the connection without answering";

impl Https {
    pub fn new(
        target: Target,
        proxy: Option<Proxy>,
        tls: Arc<rustls::ClientConfig>,
        user_agent: String,
        timeouts: Timeouts,
    ) -> Result<Https> {
        let name = ServerName::try_from(target.host.as_str())
            .map_err(|_| anyhow!("{:?} is not a valid host name", target.host))?
            .to_owned();
        Ok(Https { target, name, proxy, tls, user_agent, timeouts, idle: Mutex::new(None) })
    }

    /// `path` under the server_url prefix.
    pub fn url(&self, path: &str) -> String {
        format!("https://{}{}{path}", self.target.authority(), self.target.prefix)
    }

    /// Connect to `host:port`, every address tried within one deadline; the
    /// stream then has `send` for the tunnel and the TLS handshake.
    fn tcp(&self, host: &str, port: u16) -> Result<Timed, HttpError> {
        let t = self.timeouts;
        let addrs = (host, port)
            .to_socket_addrs()
            .map_err(|e| HttpError::Connect(anyhow!(e).context(format!("cannot resolve {host}"))))?;
        let deadline = Instant::now() + t.connect;
        let mut last = HttpError::Connect(anyhow!("{host} has no address"));
        for a in addrs {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let timeout = format!("timed out after {} s connecting to {host}", t.connect.as_secs());
                return Err(HttpError::Timeout(last.into_msg().context(timeout)));
            }
            match TcpStream::connect_timeout(&a, left) {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    return Ok(Timed::new(s, t.send));
                }
                Err(e) => {
                    last = match HttpError::io(e, &format!("connecting to {a}"), t.connect, false) {
                        HttpError::Timeout(m) => HttpError::Timeout(m),
                        other => HttpError::Connect(other.into_msg()),
                    }
                }
            }
        }
        Err(last)
    }

    /// Open the CONNECT tunnel through `p` to the target.
    fn tunnel(&self, p: &Proxy) -> Result<Timed, HttpError> {
        let what = format!("the proxy {}:{}", p.host, p.port);
        let mut tcp = self.tcp(&p.host, p.port).map_err(|e| e.context(format!("cannot reach {what}")))?;
        let to = self.target.host_port();
        let mut req = format!("CONNECT {to} HTTP/1.1\r\nHost: {to}\r\nUser-Agent: {}\r\n", self.user_agent);
        if let Some(a) = &p.auth {
            req.push_str(&format!("Proxy-Authorization: Basic {a}\r\n"));
        }
        req.push_str("\r\n");
        tcp.write_all(req.as_bytes())
            .map_err(|e| HttpError::io(e, &format!("sending CONNECT to {what}"), self.timeouts.send, false))?;
        let mut rd = BufReader::new(&mut tcp);
        let head = read_head(&mut rd).map_err(|e| {
            e.named_timeout(&format!("waiting for {what} to answer CONNECT"), self.timeouts.send)
                .context(format!("{what} answered CONNECT {to} badly"))
        })?;
        if !(200..300).contains(&head.status) {
            let msg = anyhow!("{what} refused to open a tunnel to {to}: HTTP {}", head.status);
            return Err(HttpError::ProxyStatus { status: head.status, msg });
        }
        if !rd.buffer().is_empty() {
            return Err(HttpError::Malformed(anyhow!("{what} sent data after its answer to CONNECT")));
        }
        drop(rd);
        Ok(tcp)
    }

    fn connect(&self) -> Result<Conn, HttpError> {
        let tcp = match &self.proxy {
            Some(p) => self.tunnel(p)?,
            None => self
                .tcp(&self.target.host, self.target.port)
                .map_err(|e| e.context(format!("cannot connect to {}", self.target.authority())))?,
        };
        let conn = rustls::ClientConnection::new(self.tls.clone(), self.name.clone()).map_err(|error| {
            let msg = anyhow!("{error}").context("TLS setup");
            HttpError::Tls { error, handshake: true, msg }
        })?;
        let mut s = rustls::StreamOwned::new(conn, tcp);
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock).map_err(|e| HttpError::io(e, "TLS handshake", self.timeouts.send, true))?;
        }
        Ok(Conn { io: BufReader::new(s), used: false })
    }

    /// Whether a kept-alive connection may carry the next request: nothing
    /// left unread of the last answer, in our buffer, in rustls or on the
    /// socket. Extra bytes (or the peer's close) mean it is not idle: reusing
    /// it would read them as the next answer, one answer behind.
    fn is_idle(c: &mut Conn) -> bool {
        if !c.io.buffer().is_empty() {
            return false;
        }
        let tls = c.io.get_mut();
        match tls.conn.reader().read(&mut [0u8; 1]) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            _ => return false,
        }
        !tls.sock.has_input()
    }

    /// Send `req` and wait for the first byte of the answer.
    fn send(&self, c: &mut Conn, req: &[u8]) -> Result<Sent, HttpError> {
        let t = self.timeouts;
        let tls = c.io.get_mut();
        // Plus a second per 16 KiB: 1 MiB of results gets through at 128 kbit/s.
        let send = t.send + Duration::from_millis(req.len() as u64 / 16);
        tls.sock.set(send);
        if let Err(e) = tls.write_all(req).and_then(|_| tls.flush()) {
            return Ok(Sent::Closed(HttpError::io(e, "sending the request", send, false)));
        }
        tls.sock.set(t.head);
        match c.io.fill_buf() {
            Ok([]) => Ok(Sent::Closed(HttpError::Closed {
                kind: ErrorKind::UnexpectedEof,
                handshake: false,
                msg: anyhow!(CLOSED_WITHOUT_ANSWER),
            })),
            Ok(_) => Ok(Sent::Answering),
            Err(e) if error::is_closed(e.kind()) => Ok(Sent::Closed(HttpError::from_io(e, false))),
            Err(e) => Err(HttpError::io(e, "waiting for the answer", t.head, false)),
        }
    }

    /// POST `body` to `path` (under the prefix); the status and body of the
    /// answer, whatever the status.
    pub fn post(&self, path: &str, content_type: &str, body: &[u8], max: u64) -> Result<(u16, Vec<u8>), Failure> {
        let path = format!("{}{path}", self.target.prefix);
        let req = request(&self.target.authority(), &path, &self.user_agent, content_type, body);
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).take();
        let mut c = match idle.and_then(|mut c| Self::is_idle(&mut c).then_some(c)) {
            Some(c) => c,
            None => self.connect().map_err(Failure::Reach)?,
        };
        while let Sent::Closed(e) = self.send(&mut c, &req).map_err(Failure::Reach)? {
            if !c.used {
                return Err(Failure::Reach(e));
            }
            // A kept-alive connection the server closed meanwhile: replace it
            // once (the new one is not `used`, so this loop runs at most twice).
            c = self.connect().map_err(Failure::Reach)?;
        }
        let t = self.timeouts;
        let head =
            read_head(&mut c.io).map_err(|e| Failure::Reach(e.named_timeout("waiting for the answer", t.head)))?;
        c.io.get_mut().sock.set(t.body);
        let body = read_body(&mut c.io, &head, max)
            .map_err(|e| Failure::Body(e.named_timeout("reading the body of the answer", t.body)))?;
        if !head.close && Self::is_idle(&mut c) {
            c.used = true;
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            if idle.is_none() {
                *idle = Some(c);
            }
        }
        Ok((head.status, body))
    }
}
