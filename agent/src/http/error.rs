//! `HttpError`: what went wrong in an exchange, typed for the callers that
//! branch on it (`client.rs` words TLS and connection problems by the
//! variant and the rustls error, never by searching the message). Each
//! variant keeps the sentence, an anyhow chain naming what was being done;
//! `Display` shows it with its causes.
use anyhow::anyhow;
use std::fmt;
use std::io::{self, ErrorKind};
use std::time::Duration;

#[derive(Debug)]
pub enum HttpError {
    /// No TCP connection to the server or the proxy: the name does not
    /// resolve, nobody listens, the network is unreachable.
    Connect(anyhow::Error),
    /// TLS failed with this rustls error (a certificate refused, an alert
    /// received); `handshake`: before the handshake ended.
    Tls { error: rustls::Error, handshake: bool, msg: anyhow::Error },
    /// The proxy refused to open a tunnel with this HTTP status.
    ProxyStatus { status: u16, msg: anyhow::Error },
    /// The peer closed the connection (`UnexpectedEof`) or reset or broke it
    /// (`ConnectionReset`, `ConnectionAborted`, `BrokenPipe`); `handshake`:
    /// before the TLS handshake ended.
    Closed { kind: ErrorKind, handshake: bool, msg: anyhow::Error },
    /// A deadline passed.
    Timeout(anyhow::Error),
    /// The answer is not HTTP/1.1 as the agent reads it (a cut-short answer
    /// included: its framing promised more).
    Malformed(anyhow::Error),
    /// The answer (its head, a line, its body) exceeds its limit.
    TooLarge(anyhow::Error),
    /// Any other I/O error.
    Io(anyhow::Error),
}

impl HttpError {
    /// The sentence.
    pub fn msg(&self) -> &anyhow::Error {
        match self {
            HttpError::Connect(m)
            | HttpError::Timeout(m)
            | HttpError::Malformed(m)
            | HttpError::TooLarge(m)
            | HttpError::Io(m)
            | HttpError::Tls { msg: m, .. }
            | HttpError::ProxyStatus { msg: m, .. }
            | HttpError::Closed { msg: m, .. } => m,
        }
    }

    /// The sentence, taken out.
    pub fn into_msg(self) -> anyhow::Error {
        match self {
            HttpError::Connect(m)
            | HttpError::Timeout(m)
            | HttpError::Malformed(m)
            | HttpError::TooLarge(m)
            | HttpError::Io(m)
            | HttpError::Tls { msg: m, .. }
            | HttpError::ProxyStatus { msg: m, .. }
            | HttpError::Closed { msg: m, .. } => m,
        }
    }

    fn map(self, f: impl FnOnce(anyhow::Error) -> anyhow::Error) -> HttpError {
        match self {
            HttpError::Connect(m) => HttpError::Connect(f(m)),
            HttpError::Timeout(m) => HttpError::Timeout(f(m)),
            HttpError::Malformed(m) => HttpError::Malformed(f(m)),
            HttpError::TooLarge(m) => HttpError::TooLarge(f(m)),
            HttpError::Io(m) => HttpError::Io(f(m)),
            HttpError::Tls { error, handshake, msg } => HttpError::Tls { error, handshake, msg: f(msg) },
            HttpError::ProxyStatus { status, msg } => HttpError::ProxyStatus { status, msg: f(msg) },
            HttpError::Closed { kind, handshake, msg } => HttpError::Closed { kind, handshake, msg: f(msg) },
        }
    }

    /// The same error, its sentence wrapped in `c` (anyhow's `context`).
    pub fn context<C: fmt::Display + Send + Sync + 'static>(self, c: C) -> HttpError {
        self.map(|m| m.context(c))
    }

    /// An I/O error by its kind and cause, its sentence `e` itself.
    pub(crate) fn from_io(e: io::Error, handshake: bool) -> HttpError {
        let kind = e.kind();
        if e.get_ref().is_some_and(|i| i.is::<rustls::Error>()) {
            // Taken out by value (no clone); the sentence is its words, as
            // the io::Error that carried it showed them.
            let error = e.into_inner().and_then(|i| i.downcast::<rustls::Error>().ok()).expect("checked just above");
            let msg = anyhow!("{error}");
            return HttpError::Tls { error: *error, handshake, msg };
        }
        let msg = anyhow!(e);
        if is_closed(kind) {
            HttpError::Closed { kind, handshake, msg }
        } else if is_timeout(kind) {
            HttpError::Timeout(msg)
        } else {
            HttpError::Io(msg)
        }
    }

    /// An I/O error while `doing` something within `limit`, in words:
    /// "timed out after N s {doing}", or "{doing} failed: {e}".
    pub(crate) fn io(e: io::Error, doing: &str, limit: Duration, handshake: bool) -> HttpError {
        if is_timeout(e.kind()) {
            HttpError::Timeout(anyhow!("timed out after {} s {doing}", limit.as_secs()))
        } else {
            HttpError::from_io(e, handshake).context(format!("{doing} failed"))
        }
    }

    /// A timeout renamed "timed out after N s {doing}"; anything else as is.
    pub(crate) fn named_timeout(self, doing: &str, limit: Duration) -> HttpError {
        match self {
            HttpError::Timeout(_) => HttpError::Timeout(anyhow!("timed out after {} s {doing}", limit.as_secs())),
            e => e,
        }
    }
}

/// Whether an I/O error of this kind means the peer closed the connection.
pub(crate) fn is_closed(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe
    )
}

fn is_timeout(kind: ErrorKind) -> bool {
    matches!(kind, ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#}", self.msg())
    }
}

impl std::error::Error for HttpError {}
