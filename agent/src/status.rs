//! The optional local status endpoint (`status_listen`, off by default):
//! `GET /health` answers JSON (healthy or not, last successful check-in,
//! results waiting in the spool), `GET /metrics` the metrics in Prometheus
//! text format. Plain HTTP/1.0-style, one request per connection, on a
//! thread of its own; it reads nothing but the request line.
use anyhow::{Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::daemon::Shared;

pub fn spawn(addr: SocketAddr, shared: Arc<Shared>) -> Result<SocketAddr> {
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "status endpoint listens on a non-loopback address, as configured");
    }
    let l = TcpListener::bind(addr).with_context(|| format!("cannot listen on status_listen {addr}"))?;
    let bound = l.local_addr()?;
    let sampler = Arc::new(Mutex::new(crate::metrics::Sampler::default()));
    std::thread::Builder::new().name("status".into()).spawn(move || {
        for conn in l.incoming().flatten() {
            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = conn.set_write_timeout(Some(Duration::from_secs(5)));
            let mut line = String::new();
            let mut rd = BufReader::new(&conn);
            if rd.read_line(&mut line).is_err() {
                continue;
            }
            // Drain headers up to the blank line.
            let mut h = String::new();
            while rd.read_line(&mut h).map(|n| n > 2).unwrap_or(false) {
                h.clear();
            }
            let path = line.split_whitespace().nth(1).unwrap_or("");
            let (code, ctype, body) = match path {
                "/health" => {
                    let health = shared.health.lock().unwrap().clone();
                    let code = if health.healthy { "200 OK" } else { "503 Service Unavailable" };
                    (code, "application/json", serde_json::to_string(&health).unwrap_or_default())
                }
                "/metrics" => {
                    let m = sampler.lock().unwrap().sample();
                    ("200 OK", "text/plain; version=0.0.4", crate::metrics::prometheus(&m))
                }
                _ => ("404 Not Found", "text/plain", "not found: try /health or /metrics\n".to_string()),
            };
            let mut c = &conn;
            let _ = write!(
                c,
                "HTTP/1.1 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    })?;
    tracing::info!(%bound, "status endpoint listening");
    Ok(bound)
}
