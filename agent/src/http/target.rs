//! Where the server is and how to reach it: `Target` (`https://host[:port][/prefix]`,
//! IPv4/IPv6 literals or DNS names; the one parser of `server_url`, used by
//! config validation and the client alike) and `Proxy` (an `http://` CONNECT
//! proxy chosen from the environment by curl's rules for an https URL:
//! `https_proxy`, `HTTPS_PROXY`, `all_proxy`, `ALL_PROXY`, never `HTTP_PROXY`;
//! `no_proxy`/`NO_PROXY` matched as curl matches it).
use anyhow::{anyhow, bail, Context, Result};

/// Where the server lives, from `server_url`.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// DNS name or IP address (an IPv6 literal without its brackets).
    pub host: String,
    pub port: u16,
    /// Path prefix without a trailing slash: "" or "/mgmt".
    pub prefix: String,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target> {
        let url = url.trim();
        let rest = url
            .get(..8)
            .filter(|s| s.eq_ignore_ascii_case("https://"))
            .map(|_| &url[8..])
            .ok_or_else(|| anyhow!("server_url {url:?} must start with https://"))?;
        if let Some(c) = url.chars().find(|c| c.is_control() || c.is_whitespace()) {
            bail!("server_url {url:?} contains the character {c:?}: control characters and spaces are not allowed");
        }
        let (auth, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if auth.contains('@') || path.contains(['?', '#']) {
            bail!("server_url {url:?} must be https://host[:port][/prefix] (no user, query or fragment)");
        }
        let (host, port) = split_host_port(auth, 443).with_context(|| format!("server_url {url:?}"))?;
        Ok(Target { host, port, prefix: path.trim_end_matches('/').to_string() })
    }

    /// `host[:port]` for the Host header (the port only when not 443).
    pub fn authority(&self) -> String {
        if self.port == 443 {
            self.bracketed()
        } else {
            self.host_port()
        }
    }

    /// `host:port`, always with the port, as CONNECT wants it.
    pub fn host_port(&self) -> String {
        format!("{}:{}", self.bracketed(), self.port)
    }

    fn bracketed(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        }
    }
}

/// Split `host[:port]` or `[v6]:port`; the host comes back without brackets.
fn split_host_port(s: &str, default_port: u16) -> Result<(String, u16)> {
    let (host, port) = match s.strip_prefix('[') {
        Some(r) => r.split_once(']').ok_or_else(|| anyhow!("unclosed [ in the address"))?,
        None => s.split_at(s.find(':').unwrap_or(s.len())),
    };
    let port = match port {
        "" => default_port,
        p => p
            .strip_prefix(':')
            .and_then(|p| p.parse::<u16>().ok())
            .filter(|&p| p != 0)
            .ok_or_else(|| anyhow!("bad port {p:?} (IPv6 addresses go in brackets: [::1]:443)"))?,
    };
    if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/') {
        bail!("no host name in {s:?}");
    }
    Ok((host.to_string(), port))
}

/// An HTTP proxy reached with CONNECT.
#[derive(Debug, Clone, PartialEq)]
pub struct Proxy {
    pub host: String,
    pub port: u16,
    /// `user:password`, base64-encoded for Proxy-Authorization.
    pub auth: Option<String>,
}

/// The variables naming a proxy for an https URL, in the order curl reads
/// them. `HTTP_PROXY`/`http_proxy` are for http URLs only: curl never uses
/// them for https, and neither do we.
const PROXY_VARS: &[&str] = &["https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"];

impl Proxy {
    /// `[http://][user:password@]host[:port][/]` (port 80 by default).
    pub fn parse(s: &str) -> Result<Proxy> {
        let s = s.trim();
        let rest = match s.split_once("://") {
            Some((scheme, r)) if scheme.eq_ignore_ascii_case("http") => r,
            Some((scheme, _)) => bail!("{scheme}:// proxies are not supported, only http:// (CONNECT)"),
            None => s,
        };
        let rest = rest.trim_end_matches('/');
        let (auth, hostport) = match rest.rsplit_once('@') {
            Some((a, h)) => (Some(base64(&percent_decode(a))), h),
            None => (None, rest),
        };
        let (host, port) = split_host_port(hostport, 80)?;
        Ok(Proxy { host, port, auth })
    }

    /// The proxy for `host` from the environment, if any (curl's rules for
    /// an https URL: https_proxy, HTTPS_PROXY, all_proxy, ALL_PROXY; no_proxy
    /// or NO_PROXY exempts hosts).
    pub fn from_env(host: &str) -> Result<Option<Proxy>> {
        Proxy::lookup(&|k| std::env::var(k).ok(), host)
    }

    pub fn lookup(env: &dyn Fn(&str) -> Option<String>, host: &str) -> Result<Option<Proxy>> {
        let found = PROXY_VARS.iter().find_map(|k| env(k).filter(|v| !v.trim().is_empty()).map(|v| (k, v)));
        let Some((var, val)) = found else { return Ok(None) };
        let no = env("no_proxy").or_else(|| env("NO_PROXY")).unwrap_or_default();
        if no_proxy_matches(&no, host) {
            return Ok(None);
        }
        Proxy::parse(&val).map(Some).with_context(|| format!("{var}={val:?} is not a usable proxy"))
    }
}

/// Whether the no_proxy list `list` exempts `host`, as curl (lib/noproxy.c)
/// decides: entries separated by commas or whitespace; `*` alone exempts
/// all; for a host name, an entry (a leading dot ignored, case ignored)
/// exempts that name and its subdomains; for an IP address, an entry is an
/// address or a CIDR range (`10.0.0.0/8`, `fd00::/8`) of the same family.
/// Nothing else is a wildcard: `10.*` or `*.example.com` match nothing.
pub fn no_proxy_matches(list: &str, host: &str) -> bool {
    use std::net::IpAddr;
    let host = host.trim_start_matches('[').trim_end_matches(']').trim_end_matches('.').to_ascii_lowercase();
    let ip = host.parse::<IpAddr>().ok();
    let mut entries = list.split(|c: char| c == ',' || c.is_ascii_whitespace()).filter(|e| !e.is_empty());
    if list.trim() == "*" {
        return true;
    }
    entries.any(|e| {
        let e = e.trim_start_matches('[').to_ascii_lowercase();
        if let Some(ip) = ip {
            let (addr, bits) = match e.split_once('/') {
                Some((a, b)) => (a.trim_end_matches(']'), b.parse::<u32>().ok()),
                None => (e.trim_end_matches(']'), None),
            };
            let Ok(net) = addr.parse::<IpAddr>() else { return false };
            let (a, n, max) = match (ip, net) {
                (IpAddr::V4(a), IpAddr::V4(n)) => (u32::from(a) as u128, u32::from(n) as u128, 32),
                (IpAddr::V6(a), IpAddr::V6(n)) => (u128::from(a), u128::from(n), 128),
                _ => return false,
            };
            let bits = match bits {
                Some(b) if b > max => return false,
                Some(b) => b,
                None if e.contains('/') => return false,
                None => max,
            };
            let shift = max - bits;
            shift >= max || (a >> shift) == (n >> shift)
        } else {
            let e = e.strip_prefix('.').unwrap_or(&e).trim_end_matches('.');
            !e.is_empty() && (host == e || host.strip_suffix(e).is_some_and(|r| r.ends_with('.')))
        }
    })
}

fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = s.get(i + 1..i + 3).filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()));
        match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
            Some(v) if b[i] == b'%' => {
                out.push(v);
                i += 3;
            }
            _ => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    out
}

pub(super) fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            s.push(if i <= c.len() { A[(n >> (18 - 6 * i) & 63) as usize] as char } else { '=' });
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err<T: std::fmt::Debug>(r: Result<T>) -> String {
        format!("{:#}", r.unwrap_err())
    }

    #[test]
    fn targets() {
        let t = Target::parse("https://mgmt.example:8443/agent/").unwrap();
        assert_eq!(t, Target { host: "mgmt.example".into(), port: 8443, prefix: "/agent".into() });
        assert_eq!(t.authority(), "mgmt.example:8443");
        let t = Target::parse("HTTPS://[::1]:9000").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.prefix.as_str()), ("::1", 9000, ""));
        assert_eq!(t.authority(), "[::1]:9000");
        let t = Target::parse("https://127.0.0.1").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("127.0.0.1", 443));
        assert_eq!(t.authority(), "127.0.0.1");
        for bad in [
            "http://x",
            "https://",
            "https://:443",
            "https://x:0",
            "https://x:99999",
            "https://::1/",
            "https://[::1",
            "https://u:p@x",
            "https://x/?a",
            "https://x:1x",
            "https://x/a\r\nX-Injected: 1",
            "https://x/a b",
            "https://x/\u{7f}",
            "https://x/a\tb",
            "https://x\u{0}/",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad} should be refused");
        }
        assert!(err(Target::parse("https://x:abc")).contains("bad port"));
        assert!(err(Target::parse("https://x/p\nq")).contains("control characters"));
    }

    #[test]
    fn proxies_from_the_environment() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        let p = Proxy::lookup(&env(&[("https_proxy", "http://proxy.lan:3128/")]), "mgmt").unwrap().unwrap();
        assert_eq!(p, Proxy { host: "proxy.lan".into(), port: 3128, auth: None });
        // HTTPS_PROXY wins over HTTP_PROXY; no scheme means http; port 80 by default.
        let e = env(&[("HTTP_PROXY", "http://other:1"), ("HTTPS_PROXY", "proxy.lan")]);
        assert_eq!(Proxy::lookup(&e, "mgmt").unwrap().unwrap().port, 80);
        assert_eq!(Proxy::lookup(&e, "mgmt").unwrap().unwrap().host, "proxy.lan");
        // Found in review: HTTP_PROXY was used for https; curl never does.
        assert!(Proxy::lookup(&env(&[("HTTP_PROXY", "http://p:3128")]), "mgmt").unwrap().is_none());
        assert!(Proxy::lookup(&env(&[("http_proxy", "http://p:3128")]), "mgmt").unwrap().is_none());
        // curl reads the lower-case names first.
        let e = env(&[("HTTPS_PROXY", "http://upper:1"), ("https_proxy", "http://lower:2")]);
        assert_eq!(Proxy::lookup(&e, "mgmt").unwrap().unwrap().host, "lower");
        let e = env(&[("ALL_PROXY", "http://upper:1"), ("all_proxy", "http://lower:2")]);
        assert_eq!(Proxy::lookup(&e, "mgmt").unwrap().unwrap().host, "lower");
        let e = env(&[("https_proxy", "http://p:1"), ("NO_PROXY", "other"), ("no_proxy", "mgmt")]);
        assert!(Proxy::lookup(&e, "mgmt").unwrap().is_none(), "no_proxy is read before NO_PROXY");
        let p = Proxy::lookup(&env(&[("ALL_PROXY", "http://al%40ice:s3cret@[fd00::1]:8080")]), "mgmt").unwrap();
        let p = p.unwrap();
        assert_eq!((p.host.as_str(), p.port), ("fd00::1", 8080));
        assert_eq!(p.auth.as_deref(), Some(base64(b"al@ice:s3cret").as_str()));
        assert!(Proxy::lookup(&env(&[]), "mgmt").unwrap().is_none());
        assert!(Proxy::lookup(&env(&[("HTTPS_PROXY", " ")]), "mgmt").unwrap().is_none());
        let e = env(&[("HTTPS_PROXY", "http://p:3128"), ("NO_PROXY", "localhost, .example.com")]);
        assert!(Proxy::lookup(&e, "mgmt.example.com").unwrap().is_none());
        assert!(Proxy::lookup(&e, "mgmt.example.org").unwrap().is_some());
        let e = env(&[("https_proxy", "http://p:3128"), ("no_proxy", "*")]);
        assert!(Proxy::lookup(&e, "anything").unwrap().is_none());
        let m = err(Proxy::lookup(&env(&[("HTTPS_PROXY", "socks5://p:1080")]), "mgmt"));
        assert!(m.contains("HTTPS_PROXY") && m.contains("socks5"), "{m}");
        assert!(Proxy::lookup(&env(&[("HTTPS_PROXY", "http://p:port")]), "mgmt").is_err());
    }

    /// curl's rules (lib/noproxy.c): names match themselves and their
    /// subdomains, IPs match addresses or CIDR ranges, `*` alone matches all,
    /// nothing else is a wildcard.
    #[test]
    fn no_proxy_lists() {
        let l = "localhost,127.0.0.1, corp.example .lan,10.0.0.0/8 192.168.0.0/16,[::1],fd00::/8";
        for h in ["localhost", "LOCALHOST", "127.0.0.1", "a.corp.example", "corp.example", "x.lan", "10.1.2.3"] {
            assert!(no_proxy_matches(l, h), "{h}");
        }
        for h in ["192.168.0.9", "::1", "[::1]", "fd12::1", "corp.example."] {
            assert!(no_proxy_matches(l, h), "{h}");
        }
        for h in ["localhost.evil", "notcorp.example", "mylan", "110.1.2.3", "127.0.0.2", "example", "fe80::1"] {
            assert!(!no_proxy_matches(l, h), "{h}");
        }
        assert!(no_proxy_matches("*", "anything"));
        assert!(!no_proxy_matches("", "anything"));
        assert!(!no_proxy_matches(" , ", "anything"));
        assert!(no_proxy_matches("example.com", "www.example.com"));
        // Not curl's: these were our own wildcards and match nothing now.
        assert!(!no_proxy_matches("10.*", "10.1.2.3"));
        assert!(!no_proxy_matches("*.corp.example", "a.corp.example"));
        assert!(!no_proxy_matches("192.168.", "192.168.0.9"));
        assert!(!no_proxy_matches("10.0.0.0/33", "10.0.0.1"));
        assert!(no_proxy_matches("0.0.0.0/0", "10.0.0.1"));
        assert!(!no_proxy_matches("10.0.0.0/8", "::1"));
    }

    #[test]
    fn base64_and_percent_decoding() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"Aladdin:open sesame"), "QWxhZGRpbjpvcGVuIHNlc2FtZQ==");
        assert_eq!(percent_decode("a%40b%zz%4"), b"a@b%zz%4");
        assert_eq!(percent_decode("%e2%82%ac"), "€".as_bytes());
    }
}
