//! A xenstore client that speaks the wire protocol itself, so the agent needs
//! neither xe-guest-utilities nor xenstore-utils at run time.
//!
//! Every message is a 16-byte header (type, request id, transaction id,
//! payload length; each a little-endian u32) followed by at most 4096 bytes of
//! payload whose strings are NUL-separated (`xen/include/public/io/xs_wire.h`).
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

/// Largest payload a xenstore message may carry (`XENSTORE_PAYLOAD_MAX`).
pub const PAYLOAD_MAX: usize = 4096;
/// Size of the message header.
pub const HEADER_LEN: usize = 16;
/// How long a reply may take unless [`Client::set_timeout`] says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// The guest-side xenbus device, and its location on old kernels.
pub const XENBUS_DEVICES: [&str; 2] = ["/dev/xen/xenbus", "/proc/xen/xenbus"];

/// Message types of the wire protocol (the subset a guest uses plus the ones a
/// server may legitimately send back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Op {
    Control = 0,
    Directory = 1,
    Read = 2,
    GetPerms = 3,
    Watch = 4,
    Unwatch = 5,
    TransactionStart = 6,
    TransactionEnd = 7,
    Introduce = 8,
    Release = 9,
    GetDomainPath = 10,
    Write = 11,
    Mkdir = 12,
    Rm = 13,
    SetPerms = 14,
    WatchEvent = 15,
    Error = 16,
    IsDomainIntroduced = 17,
    Resume = 18,
    SetTarget = 19,
    ResetWatches = 21,
    DirectoryPart = 22,
}

impl Op {
    pub fn from_u32(v: u32) -> Option<Op> {
        use Op::*;
        Some(match v {
            0 => Control,
            1 => Directory,
            2 => Read,
            3 => GetPerms,
            4 => Watch,
            5 => Unwatch,
            6 => TransactionStart,
            7 => TransactionEnd,
            8 => Introduce,
            9 => Release,
            10 => GetDomainPath,
            11 => Write,
            12 => Mkdir,
            13 => Rm,
            14 => SetPerms,
            15 => WatchEvent,
            16 => Error,
            17 => IsDomainIntroduced,
            18 => Resume,
            19 => SetTarget,
            21 => ResetWatches,
            22 => DirectoryPart,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        use Op::*;
        match self {
            Control => "CONTROL",
            Directory => "DIRECTORY",
            Read => "READ",
            GetPerms => "GET_PERMS",
            Watch => "WATCH",
            Unwatch => "UNWATCH",
            TransactionStart => "TRANSACTION_START",
            TransactionEnd => "TRANSACTION_END",
            Introduce => "INTRODUCE",
            Release => "RELEASE",
            GetDomainPath => "GET_DOMAIN_PATH",
            Write => "WRITE",
            Mkdir => "MKDIR",
            Rm => "RM",
            SetPerms => "SET_PERMS",
            WatchEvent => "WATCH_EVENT",
            Error => "ERROR",
            IsDomainIntroduced => "IS_DOMAIN_INTRODUCED",
            Resume => "RESUME",
            SetTarget => "SET_TARGET",
            ResetWatches => "RESET_WATCHES",
            DirectoryPart => "DIRECTORY_PART",
        }
    }
}

/// The error names xenstored sends in an `XS_ERROR` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XsErrno {
    /// ENOENT: no such node (or transaction).
    NotFound,
    /// EACCES: the domain may not read or write the node.
    PermissionDenied,
    /// EAGAIN: the transaction conflicted; retry it.
    Again,
    /// EINVAL: malformed path or request.
    Invalid,
    /// EEXIST
    Exists,
    /// EISDIR
    IsDir,
    /// ENOSPC / EQUOTA: the domain's quota is used up.
    Quota(String),
    /// E2BIG: the reply would not fit in one message.
    TooBig,
    /// ENOSYS: the server does not implement the request.
    NotImplemented,
    /// Anything else, by name.
    Other(String),
}

impl XsErrno {
    pub fn parse(name: &str) -> XsErrno {
        match name {
            "ENOENT" => XsErrno::NotFound,
            "EACCES" | "EPERM" => XsErrno::PermissionDenied,
            "EAGAIN" => XsErrno::Again,
            "EINVAL" => XsErrno::Invalid,
            "EEXIST" => XsErrno::Exists,
            "EISDIR" => XsErrno::IsDir,
            "ENOSPC" | "EQUOTA" => XsErrno::Quota(name.to_string()),
            "E2BIG" => XsErrno::TooBig,
            "ENOSYS" => XsErrno::NotImplemented,
            other => XsErrno::Other(other.to_string()),
        }
    }

    /// The name as xenstored spells it.
    pub fn name(&self) -> &str {
        match self {
            XsErrno::NotFound => "ENOENT",
            XsErrno::PermissionDenied => "EACCES",
            XsErrno::Again => "EAGAIN",
            XsErrno::Invalid => "EINVAL",
            XsErrno::Exists => "EEXIST",
            XsErrno::IsDir => "EISDIR",
            XsErrno::Quota(n) | XsErrno::Other(n) => n,
            XsErrno::TooBig => "E2BIG",
            XsErrno::NotImplemented => "ENOSYS",
        }
    }
}

/// Everything that can go wrong talking to xenstore. Callers branch on
/// [`XsError::NotAvailable`] (not a Xen guest), [`XsError::is_not_found`] and
/// [`XsError::Server`] with [`XsErrno::Again`] (retry a transaction).
#[derive(Debug)]
pub enum XsError {
    /// Neither `XENSTORED_PATH` nor a xenbus device exists: not running on Xen.
    NotAvailable { tried: Vec<PathBuf> },
    /// The socket or device exists but could not be opened.
    Open { path: PathBuf, source: io::Error },
    /// Reading or writing the connection failed.
    Io { op: Op, path: String, source: io::Error },
    /// The server closed the connection.
    Closed { op: Op, path: String },
    /// No (complete) reply within the timeout.
    Timeout { op: Op, path: String, after: Duration },
    /// The reply was not a valid answer to the request.
    Protocol { op: Op, path: String, detail: String },
    /// The server answered with an error (`ENOENT`, `EACCES`, ...).
    Server { op: Op, path: String, errno: XsErrno },
    /// The request itself is too large or contains a NUL byte.
    BadRequest { op: Op, path: String, detail: String },
    /// An earlier timeout or protocol error left the connection unusable.
    Broken { cause: String },
}

impl XsError {
    /// The node does not exist (`ENOENT`).
    pub fn is_not_found(&self) -> bool {
        matches!(self, XsError::Server { errno: XsErrno::NotFound, .. })
    }

    /// The server refused access (`EACCES`).
    pub fn is_permission_denied(&self) -> bool {
        matches!(self, XsError::Server { errno: XsErrno::PermissionDenied, .. })
    }

    /// The connection can no longer be used; open a new one.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            XsError::Io { .. }
                | XsError::Closed { .. }
                | XsError::Timeout { .. }
                | XsError::Protocol { .. }
                | XsError::Broken { .. }
        )
    }
}

impl fmt::Display for XsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            XsError::NotAvailable { tried } => {
                let list: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
                write!(f, "xenstore is not available (not a Xen guest?): none of {} exists", list.join(", "))
            }
            XsError::Open { path, source } => write!(f, "cannot open xenstore at {}: {source}", path.display()),
            XsError::Io { op, path, source } => write!(f, "xenstore {} {path:?}: {source}", op.name()),
            XsError::Closed { op, path } => {
                write!(f, "xenstore {} {path:?}: the server closed the connection", op.name())
            }
            XsError::Timeout { op, path, after } => {
                write!(f, "xenstore {} {path:?}: no reply within {:.1} s", op.name(), after.as_secs_f64())
            }
            XsError::Protocol { op, path, detail } => {
                write!(f, "xenstore {} {path:?}: invalid reply: {detail}", op.name())
            }
            XsError::Server { op, path, errno } => write!(f, "xenstore {} {path:?}: {}", op.name(), errno.name()),
            XsError::BadRequest { op, path, detail } => {
                write!(f, "xenstore {} {path:?}: request not sent: {detail}", op.name())
            }
            XsError::Broken { cause } => {
                write!(f, "xenstore connection unusable after an earlier error ({cause}); reconnect")
            }
        }
    }
}

impl std::error::Error for XsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            XsError::Open { source, .. } | XsError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// A transaction id; 0 means "no transaction".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tx(pub u32);

impl Tx {
    pub const NONE: Tx = Tx(0);
}

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

/// The reply header to request `req_id` of type `op`: the reply's type and
/// payload length, checked before the payload is read.
fn check_header(op: Op, path: &str, req_id: u32, header: &[u8; HEADER_LEN]) -> Result<(Op, usize), XsError> {
    let word = |i: usize| u32::from_le_bytes([header[i * 4], header[i * 4 + 1], header[i * 4 + 2], header[i * 4 + 3]]);
    let (rtype, rreq, _rtx, rlen) = (word(0), word(1), word(2), word(3) as usize);
    let protocol = |detail: String| XsError::Protocol { op, path: path.into(), detail };
    if rlen > PAYLOAD_MAX {
        return Err(protocol(format!("payload length {rlen} exceeds the xenstore limit of {PAYLOAD_MAX}")));
    }
    let Some(rop) = Op::from_u32(rtype) else {
        return Err(protocol(format!("unknown message type {rtype}")));
    };
    if rreq != req_id {
        return Err(protocol(format!("reply carries request id {rreq}, expected {req_id}")));
    }
    Ok((rop, rlen))
}

/// The payload of a reply of type `rop` to an `op` request, or the error it
/// names.
fn reply_body(op: Op, path: &str, rop: Op, body: Vec<u8>) -> Result<Vec<u8>, XsError> {
    if rop == Op::Error {
        let name = String::from_utf8_lossy(trim_nul(&body)).into_owned();
        return Err(XsError::Server { op, path: path.into(), errno: XsErrno::parse(&name) });
    }
    if rop != op {
        return Err(XsError::Protocol {
            op,
            path: path.into(),
            detail: format!("reply has type {} to a {} request", rop.name(), op.name()),
        });
    }
    Ok(body)
}

/// Parse one whole reply message (header and payload) to request `req_id`
/// of type `op`, as [`Client::request`] does on the wire; for tests and the
/// fuzz target `xenstore_reply`.
pub fn parse_reply(op: Op, req_id: u32, msg: &[u8]) -> Result<Vec<u8>, XsError> {
    let path = "(parsed)";
    let Some(header) = msg.get(..HEADER_LEN) else {
        return Err(XsError::Closed { op, path: path.into() });
    };
    let (rop, rlen) = check_header(op, path, req_id, header.try_into().expect("HEADER_LEN bytes"))?;
    let Some(body) = msg.get(HEADER_LEN..HEADER_LEN + rlen) else {
        return Err(XsError::Closed { op, path: path.into() });
    };
    reply_body(op, path, rop, body.to_vec())
}

fn trim_nul(b: &[u8]) -> &[u8] {
    match b.iter().position(|c| *c == 0) {
        Some(i) => &b[..i],
        None => b,
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

    #[test]
    fn replies_parse_as_on_the_wire() {
        assert_eq!(parse_reply(Op::Read, 7, &msg(Op::Read as u32, 7, b"v")).unwrap(), b"v");
        let e = parse_reply(Op::Read, 7, &msg(Op::Error as u32, 7, b"ENOENT\0")).unwrap_err();
        assert!(e.is_not_found(), "{e}");
        assert!(parse_reply(Op::Read, 7, &msg(Op::Read as u32, 8, b"v"))
            .unwrap_err()
            .to_string()
            .contains("request id"));
        assert!(parse_reply(Op::Read, 7, &msg(Op::Write as u32, 7, b"")).is_err());
        let mut big = msg(Op::Read as u32, 7, b"");
        big[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_reply(Op::Read, 7, &big).unwrap_err().to_string().contains("exceeds"));
        let short = msg(Op::Read as u32, 7, b"abc");
        assert!(parse_reply(Op::Read, 7, &short[..short.len() - 1]).is_err());
        assert!(parse_reply(Op::Read, 7, &short[..5]).is_err());
    }
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

    fn msg(t: u32, req: u32, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        for v in [t, req, 0, u32::try_from(body.len()).unwrap()] {
            m.extend_from_slice(&v.to_le_bytes());
        }
        m.extend_from_slice(body);
        m
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
