//! The xenstore wire protocol (`xen/include/public/io/xs_wire.h`), without
//! I/O: every message is a 16-byte header (type, request id, transaction
//! id, payload length; each a little-endian u32) followed by at most
//! [`PAYLOAD_MAX`] bytes of payload whose strings are NUL-separated. Owns
//! the message types ([`Op`]), the server's error names ([`XsErrno`]), the
//! client's error type ([`XsError`]) and the checks a reply must pass before
//! it is believed (`check_header`, `reply_body`, [`parse_reply`], which the
//! fuzz target `xenstore_reply` drives). The connection, deadlines and
//! requests are `xenstore.rs`.
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Largest payload a xenstore message may carry (`XENSTORE_PAYLOAD_MAX`).
pub const PAYLOAD_MAX: usize = 4096;
/// Size of the message header.
pub const HEADER_LEN: usize = 16;
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

/// The reply header to request `req_id` of type `op`: the reply's type and
/// payload length, checked before the payload is read.
pub(super) fn check_header(op: Op, path: &str, req_id: u32, header: &[u8; HEADER_LEN]) -> Result<(Op, usize), XsError> {
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
pub(super) fn reply_body(op: Op, path: &str, rop: Op, body: Vec<u8>) -> Result<Vec<u8>, XsError> {
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
/// of type `op`, as [`super::xenstore::Client::request`] does on the wire; for tests and the
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

pub(super) fn trim_nul(b: &[u8]) -> &[u8] {
    match b.iter().position(|c| *c == 0) {
        Some(i) => &b[..i],
        None => b,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A wire message: header (type, request id, transaction 0, length), body.
    pub(crate) fn msg(t: u32, req: u32, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        for v in [t, req, 0, u32::try_from(body.len()).unwrap()] {
            m.extend_from_slice(&v.to_le_bytes());
        }
        m.extend_from_slice(body);
        m
    }

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
}
