//! A xenstore client that speaks the wire protocol itself, so the agent needs
//! neither xe-guest-utilities nor xenstore-utils at run time.
//!
//! This module owns the connection (socket or xenbus device), the per-reply
//! deadline and the requests; the message format, the error type and the
//! reply checks are `xs_wire.rs` (re-exported here).
//!
//! The server may be dead, slow or hostile: every reply is read against a
//! deadline ([`Client::set_timeout`], 5 s by default) and anything that does not
//! look like the answer to the request just sent (short header, length over the
//! limit, another request id, another message type) is a [`XsError::Protocol`].
//! After a timeout or protocol error the connection is out of step with the
//! server, so the client refuses further requests ([`XsError::Broken`]);
//! callers drop it and [`Client::open`] again.
//!
//! Transport: the unix socket named by `XENSTORED_PATH` (the variable libxenstore
//! honours, used by the test xenstored), else `/dev/xen/xenbus`, else
//! `/proc/xen/xenbus` (old kernels).
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::xs_wire::{check_header, reply_body, trim_nul};
pub use super::xs_wire::{parse_reply, Op, Tx, XsErrno, XsError, HEADER_LEN, PAYLOAD_MAX};

/// How long a reply may take unless [`Client::set_timeout`] says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// The guest-side xenbus device, and its location on old kernels.
pub const XENBUS_DEVICES: [&str; 2] = ["/dev/xen/xenbus", "/proc/xen/xenbus"];

enum Conn {
    Socket(UnixStream),
    Device(File),
}

impl Conn {
    fn raw_fd(&self) -> i32 {
        match self {
            Conn::Socket(s) => s.as_raw_fd(),
            Conn::Device(f) => f.as_raw_fd(),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Socket(s) => s.read(buf),
            Conn::Device(f) => f.read(buf),
        }
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            // MSG_NOSIGNAL: a server that hung up gives EPIPE, not a SIGPIPE.
            Conn::Socket(s) => nix::sys::socket::send(s.as_raw_fd(), buf, nix::sys::socket::MsgFlags::MSG_NOSIGNAL)
                .map_err(io::Error::from),
            Conn::Device(f) => f.write(buf),
        }
    }
}

/// A connection to xenstore. Not shared between threads; open one per user.
pub struct Client {
    conn: Conn,
    location: PathBuf,
    next_req: u32,
    timeout: Duration,
    broken: Option<String>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client").field("location", &self.location).field("broken", &self.broken).finish()
    }
}

impl Client {
    /// Connect the way libxenstore does: the socket `XENSTORED_PATH` names,
    /// else the xenbus device.
    pub fn open() -> Result<Client, XsError> {
        match std::env::var_os("XENSTORED_PATH") {
            Some(p) if !p.is_empty() => Client::connect_socket(Path::new(&p)),
            _ => Client::open_device_from(&XENBUS_DEVICES.map(PathBuf::from)),
        }
    }

    /// Connect to the socket `socket` names, or as [`Client::open`] when None
    /// (for callers that carry a configured xenstore location).
    pub fn open_at(socket: Option<&Path>) -> Result<Client, XsError> {
        match socket {
            Some(p) => Client::connect_socket(p),
            None => Client::open(),
        }
    }

    /// Where [`Client::open`] would connect, without connecting: the socket
    /// path, the first xenbus device that exists, or None.
    pub fn location() -> Option<PathBuf> {
        match std::env::var_os("XENSTORED_PATH") {
            Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
            _ => XENBUS_DEVICES.iter().map(PathBuf::from).find(|p| p.exists()),
        }
    }

    /// Connect to a xenstored unix socket.
    pub fn connect_socket(path: &Path) -> Result<Client, XsError> {
        if !path.exists() {
            return Err(XsError::NotAvailable { tried: vec![path.to_path_buf()] });
        }
        let s = UnixStream::connect(path).map_err(|e| XsError::Open { path: path.to_path_buf(), source: e })?;
        s.set_nonblocking(true).map_err(|e| XsError::Open { path: path.to_path_buf(), source: e })?;
        Ok(Client::new(Conn::Socket(s), path))
    }

    /// Open the first xenbus device of `candidates` that exists.
    pub fn open_device_from(candidates: &[PathBuf]) -> Result<Client, XsError> {
        let Some(path) = candidates.iter().find(|p| p.exists()) else {
            return Err(XsError::NotAvailable { tried: candidates.to_vec() });
        };
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| XsError::Open { path: path.clone(), source: e })?;
        Ok(Client::new(Conn::Device(f), path))
    }

    fn new(conn: Conn, location: &Path) -> Client {
        Client { conn, location: location.to_path_buf(), next_req: 1, timeout: DEFAULT_TIMEOUT, broken: None }
    }

    /// The socket or device this client talks to.
    pub fn path(&self) -> &Path {
        &self.location
    }

    /// How long to wait for each reply.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    /// The value of a node (relative paths are under the guest's
    /// `/local/domain/<domid>`).
    pub fn read(&mut self, path: &str) -> Result<String, XsError> {
        self.read_tx(Tx::NONE, path)
    }

    pub fn read_tx(&mut self, tx: Tx, path: &str) -> Result<String, XsError> {
        let body = self.request(Op::Read, tx, path, &[path.as_bytes(), b"\0"])?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    /// The value of a node, or None when it does not exist.
    pub fn read_opt(&mut self, path: &str) -> Result<Option<String>, XsError> {
        match self.read(path) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The names of a node's children.
    pub fn directory(&mut self, path: &str) -> Result<Vec<String>, XsError> {
        self.directory_tx(Tx::NONE, path)
    }

    pub fn directory_tx(&mut self, tx: Tx, path: &str) -> Result<Vec<String>, XsError> {
        let body = self.request(Op::Directory, tx, path, &[path.as_bytes(), b"\0"])?;
        Ok(body.split(|b| *b == 0).filter(|s| !s.is_empty()).map(|s| String::from_utf8_lossy(s).into_owned()).collect())
    }

    /// Children of a node, or an empty list when it does not exist.
    pub fn directory_opt(&mut self, path: &str) -> Result<Vec<String>, XsError> {
        match self.directory(path) {
            Ok(v) => Ok(v),
            Err(e) if e.is_not_found() => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Set a node's value, creating it (and missing parents).
    pub fn write(&mut self, path: &str, value: &str) -> Result<(), XsError> {
        self.write_tx(Tx::NONE, path, value)
    }

    pub fn write_tx(&mut self, tx: Tx, path: &str, value: &str) -> Result<(), XsError> {
        self.request(Op::Write, tx, path, &[path.as_bytes(), b"\0", value.as_bytes()]).map(|_| ())
    }

    /// Remove a node and everything below it.
    pub fn rm(&mut self, path: &str) -> Result<(), XsError> {
        self.rm_tx(Tx::NONE, path)
    }

    pub fn rm_tx(&mut self, tx: Tx, path: &str) -> Result<(), XsError> {
        self.request(Op::Rm, tx, path, &[path.as_bytes(), b"\0"]).map(|_| ())
    }

    /// Remove a node; a node that is already gone is success.
    pub fn rm_if_present(&mut self, path: &str) -> Result<(), XsError> {
        match self.rm(path) {
            Err(e) if e.is_not_found() => Ok(()),
            r => r,
        }
    }

    pub fn transaction_start(&mut self) -> Result<Tx, XsError> {
        let body = self.request(Op::TransactionStart, Tx::NONE, "", &[b"\0"])?;
        let text = String::from_utf8_lossy(trim_nul(&body)).into_owned();
        match text.parse::<u32>() {
            Ok(id) if id != 0 => Ok(Tx(id)),
            _ => {
                let detail = format!("transaction id {text:?} is not a positive number");
                self.broken = Some(detail.clone());
                Err(XsError::Protocol { op: Op::TransactionStart, path: String::new(), detail })
            }
        }
    }

    /// Commit (`commit = true`) or abandon a transaction. A conflict comes back
    /// as `XsError::Server { errno: XsErrno::Again, .. }`: run it again.
    pub fn transaction_end(&mut self, tx: Tx, commit: bool) -> Result<(), XsError> {
        let flag: &[u8] = if commit { b"T\0" } else { b"F\0" };
        self.request(Op::TransactionEnd, tx, "", &[flag]).map(|_| ())
    }

    /// Send one request and wait for its reply payload.
    pub fn request(&mut self, op: Op, tx: Tx, path: &str, parts: &[&[u8]]) -> Result<Vec<u8>, XsError> {
        if let Some(cause) = &self.broken {
            return Err(XsError::Broken { cause: cause.clone() });
        }
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > PAYLOAD_MAX {
            return Err(XsError::BadRequest {
                op,
                path: path.into(),
                detail: format!("payload of {len} bytes exceeds the xenstore limit of {PAYLOAD_MAX}"),
            });
        }
        if path.as_bytes().contains(&0) {
            return Err(XsError::BadRequest { op, path: path.into(), detail: "path contains a NUL byte".into() });
        }
        let req_id = self.next_req;
        self.next_req = self.next_req.wrapping_add(1).max(1);
        let mut msg = Vec::with_capacity(HEADER_LEN + len);
        // len <= PAYLOAD_MAX, checked above.
        for v in [op as u32, req_id, tx.0, u32::try_from(len).unwrap_or(u32::MAX)] {
            msg.extend_from_slice(&v.to_le_bytes());
        }
        for p in parts {
            msg.extend_from_slice(p);
        }
        let result = self.exchange(op, path, req_id, &msg);
        if let Err(e) = &result {
            if e.is_fatal() {
                self.broken = Some(e.to_string());
            }
        }
        result
    }

    fn exchange(&mut self, op: Op, path: &str, req_id: u32, msg: &[u8]) -> Result<Vec<u8>, XsError> {
        let deadline = Instant::now() + self.timeout;
        self.send(op, path, msg, deadline)?;
        let mut header = [0u8; HEADER_LEN];
        self.recv_exact(op, path, &mut header, deadline)?;
        let (rop, rlen) = check_header(op, path, req_id, &header)?;
        let mut body = vec![0u8; rlen];
        self.recv_exact(op, path, &mut body, deadline)?;
        reply_body(op, path, rop, body)
    }

    fn send(&mut self, op: Op, path: &str, msg: &[u8], deadline: Instant) -> Result<(), XsError> {
        let mut sent = 0;
        while sent < msg.len() {
            match self.conn.write(&msg[sent..]) {
                Ok(0) => return Err(XsError::Closed { op, path: path.into() }),
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.wait(op, path, nix::libc::POLLOUT, deadline)?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(XsError::Io { op, path: path.into(), source: e }),
            }
        }
        Ok(())
    }

    fn recv_exact(&mut self, op: Op, path: &str, buf: &mut [u8], deadline: Instant) -> Result<(), XsError> {
        let mut got = 0;
        while got < buf.len() {
            match self.conn.read(&mut buf[got..]) {
                Ok(0) => return Err(XsError::Closed { op, path: path.into() }),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.wait(op, path, nix::libc::POLLIN, deadline)?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(XsError::Io { op, path: path.into(), source: e }),
            }
        }
        Ok(())
    }

    /// Wait until the connection is ready for `events` or the deadline passes.
    fn wait(&self, op: Op, path: &str, events: i16, deadline: Instant) -> Result<(), XsError> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(XsError::Timeout { op, path: path.into(), after: self.timeout });
            }
            let mut pfd = nix::libc::pollfd { fd: self.conn.raw_fd(), events, revents: 0 };
            let ms = i32::try_from(left.as_millis().clamp(1, i32::MAX as u128)).unwrap_or(i32::MAX);
            // SAFETY: one valid pollfd for a descriptor this client owns.
            let rc = unsafe { nix::libc::poll(&mut pfd, 1, ms) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(XsError::Io { op, path: path.into(), source: e });
            }
            if rc > 0 {
                return Ok(());
            }
        }
    }
}

/// Run `f` inside a transaction, retrying (up to 5 times) when the commit
/// conflicts with another writer.
pub fn with_transaction<T>(
    client: &mut Client,
    mut f: impl FnMut(&mut Client, Tx) -> Result<T, XsError>,
) -> Result<T, XsError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let tx = client.transaction_start()?;
        let value = match f(client, tx) {
            Ok(v) => v,
            Err(e) => {
                if !e.is_fatal() {
                    let _ = client.transaction_end(tx, false);
                }
                return Err(e);
            }
        };
        match client.transaction_end(tx, true) {
            Ok(()) => return Ok(value),
            Err(XsError::Server { errno: XsErrno::Again, .. }) if attempt < 5 => continue,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xen::xs_wire::tests::msg;

    use std::os::unix::net::UnixListener;

    /// A one-shot server: reads one request, answers with `reply(req_id)`.
    fn serve_once(reply: impl FnOnce(u32) -> Vec<u8> + Send + 'static) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("xs.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut h = [0u8; 16];
            s.read_exact(&mut h).unwrap();
            let len = u32::from_le_bytes(h[12..16].try_into().unwrap()) as usize;
            let mut body = vec![0; len];
            s.read_exact(&mut body).unwrap();
            let req = u32::from_le_bytes(h[4..8].try_into().unwrap());
            let _ = s.write_all(&reply(req));
            std::thread::sleep(Duration::from_secs(2));
        });
        (dir, sock)
    }

    #[test]
    fn reads_a_value() {
        let (_d, s) = serve_once(|req| msg(2, req, b"/vm/abc"));
        let mut c = Client::connect_socket(&s).unwrap();
        assert_eq!(c.read("vm").unwrap(), "/vm/abc");
    }

    #[test]
    fn error_reply_is_typed() {
        let (_d, s) = serve_once(|req| msg(16, req, b"ENOENT\0"));
        let mut c = Client::connect_socket(&s).unwrap();
        let e = c.read("nope").unwrap_err();
        assert!(e.is_not_found(), "{e}");
        assert!(!e.is_fatal());
    }

    #[test]
    fn oversized_length_is_refused_without_reading_it() {
        let (_d, s) = serve_once(|req| {
            let mut m = msg(2, req, b"");
            m[12..16].copy_from_slice(&5000u32.to_le_bytes());
            m
        });
        let mut c = Client::connect_socket(&s).unwrap().with_timeout(Duration::from_secs(1));
        let e = c.read("vm").unwrap_err();
        assert!(matches!(e, XsError::Protocol { .. }), "{e}");
        assert!(e.to_string().contains("5000"), "{e}");
        assert!(matches!(c.read("vm").unwrap_err(), XsError::Broken { .. }));
    }

    #[test]
    fn silent_server_times_out() {
        let (_d, s) = serve_once(|_| Vec::new());
        let mut c = Client::connect_socket(&s).unwrap().with_timeout(Duration::from_millis(200));
        let t = Instant::now();
        let e = c.read("vm").unwrap_err();
        assert!(matches!(e, XsError::Timeout { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn missing_socket_is_not_available() {
        let e = Client::connect_socket(Path::new("/nonexistent/xs.sock")).unwrap_err();
        assert!(matches!(e, XsError::NotAvailable { .. }), "{e}");
        let e = Client::open_device_from(&[PathBuf::from("/nonexistent/xenbus")]).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/xenbus"), "{e}");
    }

    #[test]
    fn oversized_request_is_not_sent() {
        let (_d, s) = serve_once(|req| msg(11, req, b"OK\0"));
        let mut c = Client::connect_socket(&s).unwrap();
        let big = "x".repeat(5000);
        assert!(matches!(c.write("data/x", &big).unwrap_err(), XsError::BadRequest { .. }));
    }
}
