//! A minimal HTTP/1.1 server side over any `Read + Write` stream (plain TCP
//! for the admin API, rustls for the agent API): request parsing with
//! `httparse`, `Content-Length` and chunked bodies with a size cap checked
//! before reading, keep-alive, JSON responses.
//!
//! Deliberately small: no pipelining beyond what a sequential keep-alive
//! client sends, no trailers, no compression.
use std::io::{self, Read, Write};

/// Most header bytes we accept before answering 431.
const MAX_HEAD_BYTES: usize = 64 * 1024;
const MAX_HEADERS: usize = 64;

#[derive(Debug)]
pub struct Request {
    pub method: String,
    /// Path without the query string.
    pub path: String,
    /// Raw query string (after `?`), empty when none.
    pub query: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The client asked to close (or spoke HTTP/1.0).
    pub close: bool,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Value of `key` in the query string (no percent-decoding beyond `%XX`).
    pub fn query_param(&self, key: &str) -> Option<String> {
        self.query.split('&').filter_map(|kv| kv.split_once('=').or(Some((kv, "")))).find_map(|(k, v)| {
            if k == key {
                Some(percent_decode(v))
            } else {
                None
            }
        })
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Why a request could not be read. Each maps to an answer (or to silence
/// when the peer is gone).
#[derive(Debug)]
pub enum ReadError {
    /// Clean end of stream between requests.
    Closed,
    Io(io::Error),
    /// Malformed request: answer 400 with this text, then close.
    Bad(String),
    /// Headers too large: 431, then close.
    HeadTooLarge,
    /// Body over the cap: 413 with this text, then close.
    TooLarge(String),
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        ReadError::Io(e)
    }
}

/// A buffered connection: keeps bytes read past the end of one request for
/// the next one.
pub struct Conn<S> {
    pub stream: S,
    buf: Vec<u8>,
}

impl<S: Read + Write> Conn<S> {
    pub fn new(stream: S) -> Self {
        Conn { stream, buf: Vec::new() }
    }

    fn fill(&mut self) -> io::Result<usize> {
        let mut tmp = [0u8; 16 * 1024];
        let n = self.stream.read(&mut tmp)?;
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(n)
    }

    /// Read one request whose body may be at most `max_body` bytes.
    pub fn read_request(&mut self, max_body: u64) -> Result<Request, ReadError> {
        // Head.
        let (head_len, method, path, query, headers, http10) = loop {
            if !self.buf.is_empty() {
                let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut req = httparse::Request::new(&mut hs);
                match req.parse(&self.buf) {
                    Ok(httparse::Status::Complete(n)) => {
                        let target = req.path.unwrap_or("/").to_string();
                        let (path, query) = match target.split_once('?') {
                            Some((p, q)) => (p.to_string(), q.to_string()),
                            None => (target, String::new()),
                        };
                        let headers: Vec<(String, String)> = req
                            .headers
                            .iter()
                            .map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).trim().to_string()))
                            .collect();
                        break (n, req.method.unwrap_or("").to_string(), path, query, headers, req.version == Some(0));
                    }
                    Ok(httparse::Status::Partial) => {
                        if self.buf.len() > MAX_HEAD_BYTES {
                            return Err(ReadError::HeadTooLarge);
                        }
                    }
                    Err(httparse::Error::TooManyHeaders) => return Err(ReadError::HeadTooLarge),
                    Err(e) => return Err(ReadError::Bad(format!("malformed HTTP request: {e}"))),
                }
            }
            match self.fill() {
                Ok(0) if self.buf.is_empty() => return Err(ReadError::Closed),
                Ok(0) => return Err(ReadError::Bad("connection closed in the middle of the request head".into())),
                Ok(_) => {}
                Err(e) if self.buf.is_empty() => return Err(ReadError::Io(e)),
                Err(e) => return Err(ReadError::Io(e)),
            }
        };
        self.buf.drain(..head_len);
        let mut req = Request { method, path, query, headers, body: Vec::new(), close: http10 };
        if let Some(c) = req.header("connection") {
            if c.to_ascii_lowercase().split(',').any(|t| t.trim() == "close") {
                req.close = true;
            } else if http10 && c.eq_ignore_ascii_case("keep-alive") {
                req.close = false;
            }
        }
        let chunked =
            req.header("transfer-encoding").map(|te| te.to_ascii_lowercase().contains("chunked")).unwrap_or(false);
        let content_length = match req.header("content-length") {
            Some(v) => {
                Some(v.parse::<u64>().map_err(|_| ReadError::Bad(format!("invalid Content-Length header {v:?}")))?)
            }
            None => None,
        };
        if let Some(n) = content_length {
            if !chunked && n > max_body {
                return Err(ReadError::TooLarge(format!(
                    "request body of {n} bytes is over the limit of {max_body} bytes"
                )));
            }
        }
        let expects_continue = req.header("expect").map(|e| e.eq_ignore_ascii_case("100-continue")).unwrap_or(false);
        if expects_continue && (chunked || content_length.unwrap_or(0) > 0) {
            self.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
            self.stream.flush()?;
        }
        if chunked {
            req.body = self.read_chunked(max_body)?;
        } else if let Some(n) = content_length {
            let n = n as usize;
            while self.buf.len() < n {
                if self.fill()? == 0 {
                    return Err(ReadError::Bad(format!(
                        "connection closed after {} of {n} body bytes",
                        self.buf.len()
                    )));
                }
            }
            req.body = self.buf.drain(..n).collect();
        }
        Ok(req)
    }

    fn read_line(&mut self) -> Result<Vec<u8>, ReadError> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..i + 2).take(i).collect();
                return Ok(line);
            }
            if self.buf.len() > 4096 {
                return Err(ReadError::Bad("chunk size line too long".into()));
            }
            if self.fill()? == 0 {
                return Err(ReadError::Bad("connection closed inside a chunked body".into()));
            }
        }
    }

    fn read_chunked(&mut self, max_body: u64) -> Result<Vec<u8>, ReadError> {
        let mut body = Vec::new();
        loop {
            let line = self.read_line()?;
            let text = String::from_utf8_lossy(&line);
            let size_txt = text.split(';').next().unwrap_or("").trim();
            // from_str_radix alone takes a sign; a size is hex digits only.
            let size = Some(size_txt)
                .filter(|t| !t.is_empty() && t.bytes().all(|c| c.is_ascii_hexdigit()))
                .and_then(|t| u64::from_str_radix(t, 16).ok())
                .ok_or_else(|| ReadError::Bad(format!("invalid chunk size {size_txt:?}")))?;
            if size == 0 {
                // Trailers (ignored) up to the empty line.
                loop {
                    if self.read_line()?.is_empty() {
                        return Ok(body);
                    }
                }
            }
            // Checked: a peer-chosen size such as ffffffffffffffff must not
            // overflow (a panic aborts the whole server in release builds).
            if (body.len() as u64).checked_add(size).is_none_or(|n| n > max_body) {
                return Err(ReadError::TooLarge(format!("chunked request body is over the limit of {max_body} bytes")));
            }
            let size = size as usize; // at most max_body, so it fits
            while self.buf.len() < size.saturating_add(2) {
                if self.fill()? == 0 {
                    return Err(ReadError::Bad("connection closed inside a chunked body".into()));
                }
            }
            body.extend(self.buf.drain(..size));
            if &self.buf[..2] != b"\r\n" {
                return Err(ReadError::Bad("chunk not followed by CRLF".into()));
            }
            self.buf.drain(..2);
        }
    }

    /// Write a complete response with a body.
    pub fn respond(&mut self, status: u16, content_type: &str, body: &[u8], close: bool) -> io::Result<()> {
        let head = format!(
            "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n",
            reason(status),
            body.len(),
            if close { "close" } else { "keep-alive" }
        );
        let mut out = head.into_bytes();
        out.extend_from_slice(body);
        self.stream.write_all(&out)?;
        self.stream.flush()
    }

    /// After refusing a request we did not read: drain (and discard) what the
    /// client is still sending, a bounded amount, so that closing the socket
    /// does not reset the connection before the client has read our answer.
    pub fn drain_input(&mut self, max_bytes: u64) {
        let mut seen = 0u64;
        let mut tmp = [0u8; 16 * 1024];
        while seen < max_bytes {
            match self.stream.read(&mut tmp) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen += n as u64,
            }
        }
    }
}

pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        415 => "Unsupported Media Type",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// A handler's answer.
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
    pub content_type: &'static str,
}

impl Response {
    pub fn json(status: u16, v: &serde_json::Value) -> Response {
        let mut body = serde_json::to_vec(v).unwrap_or_default();
        body.push(b'\n');
        Response { status, body, content_type: "application/json" }
    }
    pub fn ok<T: serde::Serialize>(v: &T) -> Response {
        Response::json(200, &serde_json::to_value(v).unwrap_or(serde_json::Value::Null))
    }
    pub fn error(status: u16, msg: impl Into<String>) -> Response {
        Response::json(status, &serde_json::json!({ "error": msg.into() }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Mock {
        input: io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }
    impl Read for Mock {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            self.input.read(b)
        }
    }
    impl Write for Mock {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.output.write(b)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    fn conn(s: &str) -> Conn<Mock> {
        Conn::new(Mock { input: io::Cursor::new(s.as_bytes().to_vec()), output: Vec::new() })
    }

    #[test]
    fn keep_alive_two_requests() {
        let mut c = conn(
            "POST /a?x=1&y=a%20b HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /b HTTP/1.1\r\nConnection: close\r\n\r\n",
        );
        let r = c.read_request(10).unwrap();
        assert_eq!((r.method.as_str(), r.path.as_str(), &r.body[..]), ("POST", "/a", &b"abc"[..]));
        assert_eq!(r.query_param("y").as_deref(), Some("a b"));
        assert!(!r.close);
        let r = c.read_request(10).unwrap();
        assert_eq!(r.path, "/b");
        assert!(r.close);
        assert!(matches!(c.read_request(10), Err(ReadError::Closed)));
    }

    #[test]
    fn chunked_and_caps() {
        let mut c = conn("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n");
        assert_eq!(c.read_request(10).unwrap().body, b"abcde");
        let mut c =
            conn("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n8\r\nabcdefgh\r\n8\r\nabcdefgh\r\n0\r\n\r\n");
        assert!(matches!(c.read_request(10), Err(ReadError::TooLarge(_))));
        let mut c = conn("POST / HTTP/1.1\r\nContent-Length: 11\r\n\r\n");
        assert!(matches!(c.read_request(10), Err(ReadError::TooLarge(_))));
        // Found in review: these sizes overflowed `len + size` and panicked.
        for size in ["ffffffffffffffff", "fffffffffffffffe", "8000000000000000"] {
            let mut c = conn(&format!("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n{size}\r\n"));
            assert!(matches!(c.read_request(10), Err(ReadError::TooLarge(_))), "{size}");
        }
        for size in ["+1", "-1", "", "1ffffffffffffffff"] {
            let mut c = conn(&format!("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{size}\r\na\r\n0\r\n\r\n"));
            assert!(matches!(c.read_request(10), Err(ReadError::Bad(_))), "{size:?}");
        }
        let mut c = conn("GARBAGE\r\n\r\n");
        assert!(matches!(c.read_request(10), Err(ReadError::Bad(_))));
    }
}
