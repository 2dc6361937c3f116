//! The optional local status endpoint (`status_listen`, off by default):
//! `GET /health` answers JSON (healthy or not, last successful check-in,
//! results waiting in the spool), `GET /metrics` the metrics in Prometheus
//! text format. Plain HTTP/1.0-style, one request per connection, on a
//! thread of its own; it reads the request line and skips the headers.
//!
//! Every peer-controlled input is bounded: the request line to
//! [`MAX_LINE`] bytes (414 beyond), the headers to [`MAX_HEADERS`] bytes
//! (431), and the whole request to [`DEADLINE`] however slowly it trickles
//! in, so one client can hold the endpoint no longer than that.
use anyhow::{Context, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::health::Shared;

/// Longest request line read.
pub const MAX_LINE: u64 = 8 * 1024;
/// Most header bytes read (all lines together).
pub const MAX_HEADERS: u64 = 16 * 1024;
/// Longest a client may take to send its request (and read the answer).
pub const DEADLINE: Duration = Duration::from_secs(5);

/// Read the request line and skip the headers; the line, or the status to
/// answer instead. `None`: nothing to answer (closed, timed out).
fn read_request(rd: &mut dyn BufRead) -> Result<String, Option<&'static str>> {
    let mut line = Vec::new();
    match Read::take(&mut *rd, MAX_LINE).read_until(b'\n', &mut line) {
        Ok(_) if line.last() == Some(&b'\n') => {}
        Ok(n) if n as u64 == MAX_LINE => return Err(Some("414 URI Too Long")),
        _ => return Err(None),
    }
    let mut left = MAX_HEADERS;
    loop {
        let mut h = Vec::new();
        match Read::take(&mut *rd, left).read_until(b'\n', &mut h) {
            Ok(_) if h.last() == Some(&b'\n') => {}
            Ok(n) if n as u64 == left => return Err(Some("431 Request Header Fields Too Large")),
            _ => return Err(None),
        }
        left -= h.len() as u64;
        if h == b"\r\n" || h == b"\n" {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
    }
}

pub fn spawn(addr: SocketAddr, shared: Arc<Shared>) -> Result<SocketAddr> {
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "status endpoint listens on a non-loopback address, as configured");
    }
    let l = TcpListener::bind(addr).with_context(|| format!("cannot listen on status_listen {addr}"))?;
    let bound = l.local_addr()?;
    let sampler = Arc::new(Mutex::new(crate::metrics::Sampler::default()));
    std::thread::Builder::new().name("status".into()).spawn(move || {
        for conn in l.incoming().flatten() {
            let Ok(r) = conn.try_clone() else { continue };
            let mut rd = BufReader::new(crate::http::Timed::new(r, DEADLINE));
            let respond = |mut c: &TcpStream, code: &str, ctype: &str, body: &str| {
                let _ = c.set_write_timeout(Some(DEADLINE));
                let _ = write!(
                    c,
                    "HTTP/1.1 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            };
            let line = match read_request(&mut rd) {
                Ok(l) => l,
                Err(Some(code)) => {
                    respond(&conn, code, "text/plain", "request too large\n");
                    continue;
                }
                Err(None) => continue,
            };
            let path = line.split_whitespace().nth(1).unwrap_or("");
            let (code, ctype, body) = match path {
                "/health" => {
                    let health = shared.health.lock().unwrap_or_else(PoisonError::into_inner).clone();
                    let code = if health.healthy { "200 OK" } else { "503 Service Unavailable" };
                    (code, "application/json", serde_json::to_string(&health).unwrap_or_default())
                }
                "/metrics" => {
                    let m = sampler.lock().unwrap_or_else(PoisonError::into_inner).sample();
                    ("200 OK", "text/plain; version=0.0.4", crate::metrics::prometheus(&m))
                }
                _ => ("404 Not Found", "text/plain", "not found: try /health or /metrics\n".to_string()),
            };
            respond(&conn, code, ctype, &body);
        }
    })?;
    tracing::info!(%bound, "status endpoint listening");
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_bounded() {
        let ok = read_request(&mut &b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"[..]).unwrap();
        assert_eq!(ok, "GET /health HTTP/1.1\r\n");
        let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(usize::try_from(MAX_LINE).unwrap()));
        assert_eq!(read_request(&mut long.as_bytes()).unwrap_err(), Some("414 URI Too Long"));
        let many = format!("GET / HTTP/1.1\r\n{}\r\n", "X: y\r\n".repeat(4000));
        assert_eq!(read_request(&mut many.as_bytes()).unwrap_err(), Some("431 Request Header Fields Too Large"));
        assert_eq!(read_request(&mut &b"GET / HTTP/1.1\r\nX: y"[..]).unwrap_err(), None);
        assert_eq!(read_request(&mut &b""[..]).unwrap_err(), None);
    }
}
