//! HTTP/1.1 on the wire: the request bytes, and the parsers of an answer's
//! head and body (Content-Length, chunked, or until the server closes).
//! They work on `&mut dyn BufRead`, so they are compiled once and tested on
//! byte slices (and fuzzed: fuzz/fuzz_targets/http_response.rs). Every limit
//! is enforced before data is read, and hostile input gives an error naming
//! what was wrong, never a panic.
use super::HttpError;
use anyhow::anyhow;
use std::io::{self, BufRead, ErrorKind, Read};

type Result<T> = std::result::Result<T, HttpError>;

/// A malformed answer, in words.
macro_rules! malformed {
    ($($t:tt)*) => { HttpError::Malformed(anyhow!($($t)*)) };
}

/// Largest status line plus headers accepted (also for trailers).
pub const MAX_HEAD_BYTES: u64 = 64 * 1024;
/// Longest chunk-size line accepted.
const MAX_CHUNK_LINE: u64 = 1024;

/// Status line and the headers that matter for framing.
#[derive(Debug, Clone, PartialEq)]
pub struct Head {
    pub status: u16,
    pub length: Option<u64>,
    pub chunked: bool,
    /// The server closes the connection after this answer.
    pub close: bool,
}

/// What a quoted piece of hostile input looks like in an error.
fn snippet(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(&b[..b.len().min(80)]);
    format!("{s:?}")
}

/// Whether `r` means the connection ended (a TLS peer that closes without
/// close_notify gives UnexpectedEof); the caller then sees the data short.
fn ended<T>(r: io::Result<T>, what: &str) -> Result<()> {
    match r {
        Err(e) if e.kind() != ErrorKind::UnexpectedEof => {
            Err(HttpError::from_io(e, false).context(format!("reading {what}")))
        }
        _ => Ok(()),
    }
}

/// Read up to `n` bytes onto `buf`, fewer when the connection ends; how many.
fn read_upto(r: &mut dyn BufRead, n: u64, buf: &mut Vec<u8>, what: &str) -> Result<u64> {
    let before = buf.len();
    ended(Read::take(r, n).read_to_end(buf), what)?;
    Ok((buf.len() - before) as u64)
}

/// Read one line (CRLF or LF) of at most `*left` bytes, counting it off.
fn read_line(r: &mut dyn BufRead, left: &mut u64, what: &str) -> Result<Vec<u8>> {
    let mut line = Vec::new();
    ended(Read::take(r, *left).read_until(b'\n', &mut line), what)?;
    let n = line.len();
    *left -= n as u64;
    if line.last() != Some(&b'\n') {
        if *left == 0 {
            return Err(HttpError::TooLarge(anyhow!("{what} too large: the limit is exceeded without an end of line")));
        }
        return Err(malformed!("the connection ended in the middle of {what} (after {n} bytes)"));
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(line)
}

/// `HTTP/1.x NNN reason` → (status, is HTTP/1.0).
fn parse_status(line: &[u8]) -> Option<(u16, bool)> {
    let rest = line.strip_prefix(b"HTTP/1.")?;
    let http10 = match rest.first()? {
        b'0' => true,
        b'1' => false,
        _ => return None,
    };
    let code = rest.get(1..5).filter(|c| c[0] == b' ' && c[1..].iter().all(u8::is_ascii_digit))?;
    if rest.len() > 5 && rest[5] != b' ' {
        return None;
    }
    let status = code[1..].iter().fold(0u16, |a, d| a * 10 + (d - b'0') as u16);
    (status >= 100).then_some((status, http10))
}

/// Read the status line and headers (at most MAX_HEAD_BYTES together),
/// skipping interim 1xx answers.
pub fn read_head(r: &mut dyn BufRead) -> Result<Head> {
    let mut left = MAX_HEAD_BYTES;
    loop {
        let what = "the response headers";
        let line = read_line(r, &mut left, what)?;
        let (status, http10) = parse_status(&line)
            .ok_or_else(|| malformed!("malformed HTTP response: the status line is {}", snippet(&line)))?;
        let mut head = Head { status, length: None, chunked: false, close: http10 };
        let mut other_coding = false;
        loop {
            let line = read_line(r, &mut left, what)?;
            if line.is_empty() {
                break;
            }
            let colon = line.iter().position(|&c| c == b':');
            let (name, value) = match colon {
                Some(i) if i > 0 && !line[i - 1].is_ascii_whitespace() && !line[0].is_ascii_whitespace() => {
                    (&line[..i], String::from_utf8_lossy(&line[i + 1..]))
                }
                _ => return Err(malformed!("malformed HTTP response: header line {}", snippet(&line))),
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case(b"content-length") {
                let n = Some(value)
                    .filter(|v| !v.is_empty() && v.len() <= 19 && v.bytes().all(|c| c.is_ascii_digit()))
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or_else(|| malformed!("malformed HTTP response: Content-Length {value:?}"))?;
                if head.length.is_some_and(|l| l != n) {
                    return Err(malformed!("malformed HTTP response: conflicting Content-Length headers"));
                }
                head.length = Some(n);
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                let last = value.rsplit(',').next().unwrap_or("").trim();
                // Chunked must come last; any other coding is framed by close.
                head.chunked = last.eq_ignore_ascii_case("chunked");
                other_coding = !head.chunked;
            } else if name.eq_ignore_ascii_case(b"connection") {
                for t in value.split(',').map(str::trim) {
                    if t.eq_ignore_ascii_case("close") {
                        head.close = true;
                    } else if t.eq_ignore_ascii_case("keep-alive") && http10 {
                        head.close = false;
                    }
                }
            }
        }
        if head.chunked || other_coding {
            head.length = None; // Transfer-Encoding overrides Content-Length.
        }
        if !head.chunked && head.length.is_none() && !no_body(status) {
            head.close = true; // The body ends where the connection does.
        }
        if !(100..200).contains(&status) || status == 101 {
            return Ok(head);
        }
    }
}

/// Answers that never have a body.
fn no_body(status: u16) -> bool {
    (100..200).contains(&status) || status == 204 || status == 304
}

fn too_large(n: u64, max: u64) -> HttpError {
    HttpError::TooLarge(anyhow!("the server's answer is too large: {n} bytes, more than the limit of {max} bytes"))
}

/// Read exactly `n` bytes onto `body`.
fn read_exact_n(r: &mut dyn BufRead, n: u64, body: &mut Vec<u8>) -> Result<()> {
    let got = read_upto(r, n, body, "the body")?;
    if got != n {
        return Err(malformed!("the connection ended after {got} of the {n} body bytes announced"));
    }
    Ok(())
}

/// Read the body `head` announces, refusing more than `max` bytes before
/// reading them.
pub fn read_body(r: &mut dyn BufRead, head: &Head, max: u64) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    if no_body(head.status) {
    } else if head.chunked {
        loop {
            let mut left = MAX_CHUNK_LINE;
            let line = read_line(r, &mut left, "a chunk size line")?;
            let hex = line.split(|&c| c == b';').next().unwrap_or(&[]).trim_ascii();
            let size = Some(hex)
                .filter(|h| !h.is_empty() && h.len() <= 16 && h.iter().all(u8::is_ascii_hexdigit))
                .and_then(|h| u64::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok())
                .ok_or_else(|| malformed!("malformed chunked body: chunk size {}", snippet(&line)))?;
            if size == 0 {
                break;
            }
            if (body.len() as u64).saturating_add(size) > max {
                let m = anyhow!("the server's chunked answer is too large: it exceeds the limit of {max} bytes");
                return Err(HttpError::TooLarge(m));
            }
            read_exact_n(r, size, &mut body)?;
            let mut end = Vec::new();
            read_upto(r, 1, &mut end, "the chunked body")?;
            if end == b"\r" {
                end.clear();
                read_upto(r, 1, &mut end, "the chunked body")?;
            }
            match end.as_slice() {
                b"\n" => {}
                b"" => return Err(malformed!("the connection ended in the middle of the chunked body")),
                _ => return Err(malformed!("malformed chunked body: a chunk is longer than its size")),
            }
        }
        let mut left = MAX_HEAD_BYTES;
        while !read_line(r, &mut left, "the trailers")?.is_empty() {}
    } else if let Some(n) = head.length {
        if n > max {
            return Err(too_large(n, max));
        }
        body.reserve_exact(usize::try_from(n).unwrap_or(0));
        read_exact_n(r, n, &mut body)?;
    } else {
        // Framed by the end of the connection; a missing TLS close_notify
        // is tolerated here (the JSON parser catches a truncated body).
        if read_upto(r, max + 1, &mut body, "the body")? > max {
            let m = anyhow!("the server's answer is too large: it exceeds the limit of {max} bytes");
            return Err(HttpError::TooLarge(m));
        }
    }
    Ok(body)
}

/// A POST with a body of `content_type`.
pub fn request(host: &str, path: &str, user_agent: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {user_agent}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    req
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(s: &str) -> Result<Head> {
        read_head(&mut s.as_bytes())
    }

    fn answer(s: &[u8], max: u64) -> Result<(Head, Vec<u8>)> {
        let mut r = s;
        let h = read_head(&mut r)?;
        let b = read_body(&mut r, &h, max)?;
        Ok((h, b))
    }

    fn err<T: std::fmt::Debug>(r: Result<T>) -> String {
        format!("{:#}", r.unwrap_err())
    }

    #[test]
    fn content_length_answers() {
        let (h, b) =
            answer(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}", 10).unwrap();
        assert_eq!(h, Head { status: 200, length: Some(2), chunked: false, close: false });
        assert_eq!(b, b"{}");
        // Bare LF line ends, no reason phrase, Connection: close.
        let (h, b) = answer(b"HTTP/1.1 500\nconnection: Close\ncontent-length:  3 \n\nabcEXTRA", 10).unwrap();
        assert_eq!((h.status, h.close, b.as_slice()), (500, true, &b"abc"[..]));
        // HTTP/1.0 closes unless asked to keep alive.
        assert!(head("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n").unwrap().close);
        assert!(!head("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n").unwrap().close);
        // Interim answers are skipped.
        let (h, b) =
            answer(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 1\r\n\r\nx", 10).unwrap();
        assert_eq!((h.status, b.as_slice()), (201, &b"x"[..]));
        // No body for 204, whatever it says.
        let (h, b) = answer(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n", 10).unwrap();
        assert_eq!((h.status, b.len()), (204, 0));
        // Repeated equal lengths are fine, different ones are not.
        assert!(head("HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n").is_ok());
        let m = err(head("HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"));
        assert!(m.contains("conflicting"), "{m}");
    }

    #[test]
    fn oversized_bodies_are_refused_unread() {
        // The announced length alone is refused: the 5 GB are never read.
        let m = err(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5000000000\r\n\r\n{", 4 << 20));
        assert!(m.contains("too large") && m.contains("5000000000 bytes") && m.contains("limit"), "{m}");
        let m = err(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n", 10));
        assert!(m.contains("limit of 10 bytes"), "{m}");
        let m = err(answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n12345678\r\n8\r\n", 10));
        assert!(m.contains("exceeds the limit of 10 bytes"), "{m}");
        let m = err(answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n", 10));
        assert!(m.contains("exceeds the limit"), "{m}");
        let m = err(answer(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n12345678901", 10));
        assert!(m.contains("exceeds the limit of 10 bytes"), "{m}");
        assert_eq!(answer(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n1234567890", 10).unwrap().1.len(), 10);
    }

    #[test]
    fn chunked_answers() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 99\r\n\r\n\
                    4;ext=1\r\n{\"a\"\r\n3\r\n: 1\r\n1\r\n}\r\n0\r\nX-Trailer: t\r\n\r\n";
        let (h, b) = answer(raw, 100).unwrap();
        assert_eq!(h, Head { status: 200, length: None, chunked: true, close: false });
        assert_eq!(b, b"{\"a\": 1}");
        // Upper-case hex, LF only.
        let (_, b) = answer(b"HTTP/1.1 200 OK\ntransfer-encoding: Chunked\n\nA\n0123456789\n0\n\n", 100).unwrap();
        assert_eq!(b, b"0123456789");
        for (raw, word) in [
            (&b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"[..], "chunk size \"zz\""),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n", "chunk size"),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n+1\r\nx\r\n0\r\n\r\n", "chunk size"),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\r\n", "chunk size"),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n11111111111111111\r\n", "chunk size"),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n", "longer than its size"),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", "2 of the 5 body bytes"),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n", "connection ended"),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n", "trailers"),
        ] {
            let m = err(answer(raw, 1 << 20));
            assert!(m.contains(word), "{m} should mention {word:?} for {}", snippet(raw));
        }
        let long = format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1{}\r\n", ";x".repeat(1000));
        let m = err(answer(long.as_bytes(), 1 << 20));
        assert!(m.contains("chunk size line too large"), "{m}");
    }

    #[test]
    fn bad_heads_are_named() {
        for (raw, word) in [
            ("this is not HTTP at all\r\n\r\n", "status line is \"this is not HTTP at all\""),
            ("\x16\x03garbage\r\n\r\n", "malformed HTTP response"),
            ("HTTP/1.1 20 OK\r\n\r\n", "status line"),
            ("HTTP/1.1 2000 OK\r\n\r\n", "status line"),
            ("HTTP/1.1 099 OK\r\n\r\n", "status line"),
            ("HTTP/2 200 OK\r\n\r\n", "status line"),
            ("HTTP/1.1 2x0 OK\r\n\r\n", "status line"),
            ("HTTP/1.1\r\n\r\n", "status line"),
            ("", "connection ended in the middle of the response headers"),
            ("HTTP/1.1 200 OK\r\nContent-Len", "connection ended"),
            ("HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "header line \"no colon here\""),
            ("HTTP/1.1 200 OK\r\n: empty name\r\n\r\n", "header line"),
            ("HTTP/1.1 200 OK\r\nA: b\r\n folded\r\n\r\n", "header line"),
            ("HTTP/1.1 200 OK\r\nContent-Length : 1\r\n\r\n", "header line"),
            ("HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "Content-Length \"-1\""),
            ("HTTP/1.1 200 OK\r\nContent-Length: 1 2\r\n\r\n", "Content-Length"),
            ("HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\n", "Content-Length"),
        ] {
            let m = err(head(raw));
            assert!(m.contains(word), "{m:?} should mention {word:?}");
        }
        // Headers past 64 KiB are refused without reading further.
        let big = format!("HTTP/1.1 200 OK\r\nX-Big: {}\r\n\r\n", "a".repeat(70_000));
        let m = err(head(&big));
        assert!(m.contains("response headers too large"), "{m}");
        let many = format!("HTTP/1.1 200 OK\r\n{}\r\n", "X-A: b\r\n".repeat(9000));
        assert!(err(head(&many)).contains("too large"));
        // Not UTF-8 in a value is not a reason to fail.
        assert_eq!(read_head(&mut &b"HTTP/1.1 200 \xff\r\nX: \xfe\r\n\r\n"[..]).unwrap().status, 200);
        let m = err(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", 100));
        assert!(m.contains("3 of the 10 body bytes"), "{m}");
    }

    #[test]
    fn requests() {
        let r = request("h:1", "/p/api", "ua/1", "application/json", b"{}");
        assert_eq!(
            r,
            b"POST /p/api HTTP/1.1\r\nHost: h:1\r\nUser-Agent: ua/1\r\nContent-Type: application/json\r\n\
              Content-Length: 2\r\n\r\n{}"
        );
    }
}
