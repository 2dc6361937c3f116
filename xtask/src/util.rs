//! Small helpers shared by the tasks: workspace paths, running commands with
//! progress lines, root detection.
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::Command;

/// The workspace root (the parent of `xtask/`).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The workspace's one definition of root and CI (vm-tests/src/tier.rs).
#[path = "../../vm-tests/src/tier.rs"]
mod tier;
pub use tier::{in_ci, is_root};

/// Print a progress line that stands out in long logs.
pub fn step(msg: &str) {
    eprintln!("\n==> {msg}");
}

/// Run a command inheriting stdio; fail with the command line if it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let line = format!("{cmd:?}");
    eprintln!("    $ {line}");
    let st = cmd.status().with_context(|| format!("cannot start {line}"))?;
    if !st.success() {
        bail!("{line} failed with {st}");
    }
    Ok(())
}

/// Run a command and return its stdout; fail with stderr if it fails.
pub fn output(cmd: &mut Command) -> Result<String> {
    let line = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("cannot start {line}"))?;
    if !out.status.success() {
        bail!("{line} failed with {}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn have(prog: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {prog} >/dev/null 2>&1")])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

/// A minimal HTTP/1.1 client for the reference server's plain-HTTP admin
/// API on loopback: one request per connection. Returns status and body.
pub fn http(method: &str, base: &str, path: &str, body: Option<&str>) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let host = base.trim_start_matches("http://").trim_end_matches('/');
    let mut s = std::net::TcpStream::connect(host).with_context(|| format!("cannot connect to {host}"))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).with_context(|| format!("reading the answer to {method} {path}"))?;
    let (head, rest) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
    Ok((code, if chunked { dechunk(rest) } else { rest.to_string() }))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// `http` that expects a 2xx JSON answer.
pub fn http_json(method: &str, base: &str, path: &str, body: Option<&serde_json::Value>) -> Result<serde_json::Value> {
    let b = body.map(|v| v.to_string());
    let (code, text) = http(method, base, path, b.as_deref())?;
    if !(200..300).contains(&code) {
        bail!("{method} {path} answered {code}: {text}");
    }
    serde_json::from_str(&text).with_context(|| format!("{method} {path} answered non-JSON: {text}"))
}

/// A running `mgmt-server serve` on loopback with a fresh PKI, stopped on drop.
pub struct Server {
    pub child: std::process::Child,
    pub https: String,
    pub admin: String,
    pub dir: PathBuf,
}

impl Server {
    /// Start `bin` (the mgmt-server binary) with PKI and state under `dir`.
    pub fn start(bin: &std::path::Path, dir: &std::path::Path) -> Result<Server> {
        use std::io::BufRead;
        run(Command::new(bin).arg("init-pki").arg(dir.join("pki")).stdout(std::process::Stdio::null()))?;
        let mut child = Command::new(bin)
            .args(["serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--pki"])
            .arg(dir.join("pki"))
            .arg("--state")
            .arg(dir.join("server-state"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(dir.join("server.log"))?)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line)?;
        let https = line.split_whitespace().find(|w| w.starts_with("https://")).map(str::to_string);
        let admin = line.split_whitespace().find(|w| w.starts_with("http://")).map(str::to_string);
        match (https, admin) {
            (Some(https), Some(admin)) => Ok(Server { child, https, admin, dir: dir.to_path_buf() }),
            _ => {
                let _ = child.kill();
                bail!(
                    "mgmt-server did not print its addresses (got {line:?}); see {}",
                    dir.join("server.log").display()
                )
            }
        }
    }

    /// An agent config talking to this server with the PKI's client certificate.
    pub fn agent_config(&self, state_dir: &std::path::Path, extra: serde_json::Value) -> serde_json::Value {
        let pki = self.dir.join("pki");
        let mut v = serde_json::json!({
            "server_url": self.https,
            "server_cert": pki.join("ca.pem"),
            "client_cert": [pki.join("agent-cert.pem"), pki.join("agent-key.pem")],
            "state_dir": state_dir,
            "log_file": state_dir.join("agent.log"),
        });
        if let (Some(m), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            for (k, x) in e {
                m.insert(k.clone(), x.clone());
            }
        }
        v
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Debian `suite` minbase rootfs with `include` (comma-separated packages)
/// as a tarball at `tar`, made by mmdebstrap on first use and kept while the
/// package list stays the same (a `.include` stamp beside it). Uses the
/// machine's own archive configuration, whatever mirror it names. Returns
/// whether it was built now.
pub fn debian_tarball(tar: &std::path::Path, suite: &str, include: &str, what: &str) -> Result<bool> {
    let stamp = tar.with_extension("include");
    if tar.exists() && std::fs::read_to_string(&stamp).map(|s| s == include).unwrap_or(false) {
        return Ok(false);
    }
    step(&format!("{what}: mmdebstrap {suite} minbase + {include} (cached afterwards)"));
    if let Some(d) = tar.parent() {
        std::fs::create_dir_all(d)?;
    }
    let tmp = tar.with_extension("tar.tmp");
    let mut cmd = Command::new("mmdebstrap");
    cmd.args(["--variant=minbase", "--mode=root", "--format=tar", "--quiet"])
        .arg(format!("--include={include}"))
        .arg(suite)
        .arg(&tmp);
    let sources = std::path::Path::new("/etc/apt/sources.list.d/debian.sources");
    if sources.exists() {
        cmd.arg(sources);
    }
    run(&mut cmd)?;
    std::fs::rename(&tmp, tar)?;
    std::fs::write(&stamp, include)?;
    Ok(true)
}

/// base64 (standard alphabet, padded).
pub fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in data.chunks(3) {
        let n =
            (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                s.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_rfc4648() {
        let b = super::base64;
        assert_eq!(b(b""), "");
        assert_eq!(b(b"f"), "Zg==");
        assert_eq!(b(b"fo"), "Zm8=");
        assert_eq!(b(b"foo"), "Zm9v");
        assert_eq!(b(b"foobar"), "Zm9vYmFy");
    }
}
