//! Helpers for integration tests that drive the real binaries: a scratch
//! directory with a PKI, a `mgmt-server` child process, an admin API client,
//! agent configs and agent processes, and a fake HTTPS responder for
//! misbehaving-server tests.
//!
//! Everything a test runs is recorded in a transcript; when the test panics,
//! [`World`]'s `Drop` prints every command with its exit status, stdout and
//! stderr, the server's log and the agent's log file, so a failure explains
//! itself without a re-run (the ripgrep habit).
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::server::http::Conn;
use crate::server::pki;

/// The workspace root (parent of `vm-tests`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("vm-tests has a parent").to_path_buf()
}

/// `target/debug` (or whatever profile directory the running test lives in):
/// the test executable is `<profile>/deps/NAME-HASH`.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("exe dir");
    if deps.file_name().map(|n| n == "deps").unwrap_or(false) {
        deps.parent().expect("profile dir").to_path_buf()
    } else {
        deps.to_path_buf()
    }
}

fn newest_mtime(dir: &Path) -> Option<std::time::SystemTime> {
    let mut newest = None;
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        let t = if p.is_dir() { newest_mtime(&p) } else { e.metadata().ok().and_then(|m| m.modified().ok()) };
        if let Some(t) = t {
            if newest.is_none_or(|n| t > n) {
                newest = Some(t);
            }
        }
    }
    newest
}

/// The agent binary next to the test executable, built with
/// `cargo build -p xcp-vm-agent` when it is missing or older than its sources
/// (set `XCP_TEST_AGENT_BIN` to use another binary). Built once per process.
pub fn agent_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("XCP_TEST_AGENT_BIN") {
            return PathBuf::from(p);
        }
        let bin = profile_dir().join("xcp-vm-agent");
        let root = workspace_root();
        let bin_time = bin.metadata().and_then(|m| m.modified()).ok();
        let src_time = newest_mtime(&root.join("agent/src"))
            .into_iter()
            .chain(root.join("agent/Cargo.toml").metadata().and_then(|m| m.modified()).ok())
            .max();
        let stale = match (bin_time, src_time) {
            (None, _) => true,
            (Some(b), Some(s)) => s > b,
            (Some(_), None) => false,
        };
        if stale {
            let release = profile_dir().file_name().map(|n| n == "release").unwrap_or(false);
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.current_dir(&root).args([
                "build",
                "-p",
                "xcp-vm-agent",
                "--bin",
                "xcp-vm-agent",
                "--features",
                "guest",
            ]);
            if release {
                cmd.arg("--release");
            }
            eprintln!("harness: building the agent: {cmd:?}");
            let st = cmd.status().expect("run cargo build");
            assert!(st.success(), "cargo build -p xcp-vm-agent failed: {st}");
        }
        assert!(bin.exists(), "agent binary {} not found", bin.display());
        bin
    })
    .clone()
}

/// Wait for `f` to return Some, polling every 20 ms, up to `timeout`.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(t) = f() {
            return Some(t);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn show_output(out: &[u8]) -> String {
    let s = String::from_utf8_lossy(out);
    if s.trim().is_empty() {
        "(empty)".into()
    } else {
        s.into_owned()
    }
}

/// A test's world: a scratch directory, the PKI, the transcript.
pub struct World {
    pub name: String,
    pub dir: tempfile::TempDir,
    pub pki: PathBuf,
    pub server_bin: PathBuf,
    transcript: Arc<Mutex<Vec<String>>>,
    servers: Mutex<Vec<Arc<Mutex<Option<ServerInfo>>>>>,
    log_files: Mutex<Vec<PathBuf>>,
}

#[derive(Clone)]
struct ServerInfo {
    log: PathBuf,
}

impl World {
    /// A new world with a fresh PKI made by `mgmt-server init-pki`.
    pub fn new(name: &str, server_bin: &str) -> World {
        let dir = tempfile::Builder::new().prefix(&format!("xcp-test-{name}-")).tempdir().expect("tempdir");
        let pki = dir.path().join("pki");
        let w = World {
            name: name.to_string(),
            dir,
            pki: pki.clone(),
            server_bin: PathBuf::from(server_bin),
            transcript: Arc::new(Mutex::new(Vec::new())),
            servers: Mutex::new(Vec::new()),
            log_files: Mutex::new(Vec::new()),
        };
        let out = w.run_cmd(Command::new(&w.server_bin).arg("init-pki").arg(&pki), Duration::from_secs(60));
        assert!(out.status.success(), "init-pki failed");
        w
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Add a line to the transcript printed on failure.
    pub fn note(&self, s: impl Into<String>) {
        self.transcript.lock().unwrap().push(s.into());
    }

    /// Also print this file on failure (an agent's log file, say).
    pub fn watch_file(&self, p: &Path) {
        self.log_files.lock().unwrap().push(p.to_path_buf());
    }

    /// Run a command to completion (killed after `timeout`), recording it.
    pub fn run_cmd(&self, cmd: &mut Command, timeout: Duration) -> Output {
        let desc = format!("{cmd:?}");
        let t0 = Instant::now();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {desc}: {e}"));
        let mut so = child.stdout.take().unwrap();
        let mut se = child.stderr.take().unwrap();
        let to = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = so.read_to_end(&mut v);
            v
        });
        let te = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = se.read_to_end(&mut v);
            v
        });
        let mut timed_out = false;
        let status = loop {
            if let Some(st) = child.try_wait().expect("try_wait") {
                break st;
            }
            if t0.elapsed() > timeout {
                timed_out = true;
                let _ = child.kill();
                break child.wait().expect("wait");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let out = Output { status, stdout: to.join().unwrap(), stderr: te.join().unwrap() };
        self.note(format!(
            "$ {desc}\n  -> {}{} after {:.2} s\n  --- stdout ---\n{}\n  --- stderr ---\n{}",
            out.status,
            if timed_out { " (KILLED: timed out)" } else { "" },
            t0.elapsed().as_secs_f64(),
            show_output(&out.stdout),
            show_output(&out.stderr)
        ));
        out
    }

    /// Start `mgmt-server serve` with a state dir under the world.
    pub fn start_server(&self, state: &str, extra: &[&str]) -> ServerProc {
        let state = self.path(state);
        let log = self.path(&format!("server-{}.log", self.servers.lock().unwrap().len()));
        let info = Arc::new(Mutex::new(Some(ServerInfo { log: log.clone() })));
        self.servers.lock().unwrap().push(info);
        let mut s = ServerProc {
            bin: self.server_bin.clone(),
            pki: self.pki.clone(),
            state,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            log,
            child: None,
            api: "127.0.0.1:0".parse().unwrap(),
            admin: "127.0.0.1:0".parse().unwrap(),
            transcript: self.transcript.clone(),
        };
        s.spawn("127.0.0.1:0", "127.0.0.1:0").expect("start mgmt-server");
        s
    }

    /// Write an agent config (defaults for a test, then `overrides` merged
    /// over them; a null override removes the key) and return its paths.
    pub fn agent(&self, name: &str, server: SocketAddr, overrides: Value) -> Agent {
        let dir = self.path(name);
        std::fs::create_dir_all(&dir).unwrap();
        let state = dir.join("state");
        let log_file = dir.join("agent.log");
        let mut cfg = json!({
            "server_url": format!("https://{server}"),
            "check_in_interval": 1,
            "client_cert": [self.pki.join(pki::AGENT_CERT), self.pki.join(pki::AGENT_KEY)],
            "server_cert": self.pki.join(pki::CA),
            "state_dir": state,
            "log_file": log_file,
            "log_level": "debug",
            "long_poll_seconds": 2,
        });
        if let Value::Object(o) = overrides {
            for (k, v) in o {
                if v.is_null() {
                    cfg.as_object_mut().unwrap().remove(&k);
                } else {
                    cfg[k] = v;
                }
            }
        }
        let config = dir.join("config.json");
        std::fs::write(&config, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
        self.watch_file(&log_file);
        Agent { config, state_dir: state, log_file, dir }
    }

    /// Run `xcp-vm-agent --config CONFIG ARGS...` to completion.
    pub fn agent_cmd(&self, agent: &Agent, args: &[&str], timeout: Duration) -> Output {
        let mut c = Command::new(agent_bin());
        c.arg("--config").arg(&agent.config).args(args).current_dir(&agent.dir);
        self.run_cmd(&mut c, timeout)
    }

    /// Start `xcp-vm-agent --config CONFIG ARGS...` in the background
    /// (normally `run`); its stdout and stderr go to files shown on failure.
    pub fn spawn_agent(&self, agent: &Agent, args: &[&str]) -> AgentProc {
        let n = self.log_files.lock().unwrap().len();
        let out = agent.dir.join(format!("proc-{n}.stdout"));
        let err = agent.dir.join(format!("proc-{n}.stderr"));
        let mut c = Command::new(agent_bin());
        c.arg("--config").arg(&agent.config).args(args).current_dir(&agent.dir);
        let desc = format!("{c:?}");
        let child = c
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {desc}: {e}"));
        self.note(format!("$ {desc} &  (pid {}; stdout {}, stderr {})", child.id(), out.display(), err.display()));
        self.watch_file(&out);
        self.watch_file(&err);
        AgentProc { child: Some(child), desc }
    }

    /// The VM UUID the agent will report (`identity --json`).
    pub fn vm_uuid(&self, agent: &Agent) -> String {
        let out = self.agent_cmd(agent, &["identity", "--json"], Duration::from_secs(30));
        assert!(out.status.success(), "identity --json failed");
        let v: Value = serde_json::from_slice(&out.stdout).expect("identity --json prints JSON");
        v["vm_uuid"].as_str().expect("identity has vm_uuid").to_string()
    }

    fn report(&self) -> String {
        let mut s =
            format!("\n===== transcript of test {} (scratch dir {}) =====\n", self.name, self.dir.path().display());
        for t in self.transcript.lock().unwrap().iter() {
            s.push_str(t);
            s.push('\n');
        }
        for info in self.servers.lock().unwrap().iter() {
            if let Some(i) = info.lock().unwrap().clone() {
                s.push_str(&format!(
                    "----- server log {} -----\n{}\n",
                    i.log.display(),
                    std::fs::read_to_string(&i.log).unwrap_or_else(|e| format!("({e})"))
                ));
            }
        }
        for f in self.log_files.lock().unwrap().iter() {
            s.push_str(&format!(
                "----- {} -----\n{}\n",
                f.display(),
                std::fs::read_to_string(f).map(|t| show_output(t.as_bytes())).unwrap_or_else(|e| format!("({e})"))
            ));
        }
        s
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("XCP_TEST_SHOW").is_some() {
            eprintln!("{}", self.report());
            if std::env::var_os("XCP_TEST_KEEP").is_some() {
                let p = self.dir.path().to_path_buf();
                eprintln!("keeping {}", p.display());
                std::mem::forget(std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap()));
            }
        }
    }
}

/// Paths of one agent set-up in a world.
#[derive(Debug, Clone)]
pub struct Agent {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub state_dir: PathBuf,
    pub log_file: PathBuf,
}

/// A background agent process (`run`).
pub struct AgentProc {
    pub child: Option<Child>,
    pub desc: String,
}

impl AgentProc {
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig);
    }
    /// Wait up to `timeout` for the process to end; its exit status if it did.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let c = self.child.as_mut()?;
        wait_for(timeout, || c.try_wait().ok().flatten())
    }
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().map(|c| c.try_wait().ok().flatten().is_none()).unwrap_or(false)
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A running (or stopped) `mgmt-server serve` child.
pub struct ServerProc {
    bin: PathBuf,
    pki: PathBuf,
    pub state: PathBuf,
    extra: Vec<String>,
    pub log: PathBuf,
    child: Option<Child>,
    pub api: SocketAddr,
    pub admin: SocketAddr,
    transcript: Arc<Mutex<Vec<String>>>,
}

impl ServerProc {
    fn spawn(&mut self, listen: &str, admin: &str) -> Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let mut c = Command::new(&self.bin);
        c.arg("serve")
            .args(["--listen", listen, "--admin-listen", admin])
            .arg("--pki")
            .arg(&self.pki)
            .arg("--state")
            .arg(&self.state)
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        let desc = format!("{c:?}");
        let mut child = c.spawn().with_context(|| format!("cannot start {desc}"))?;
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next().and_then(|l| l.ok());
            let _ = tx.send(first);
            for _ in lines {}
        });
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Some(l)) => l,
            other => {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{desc} did not print its listening line ({other:?}); log:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
        };
        // listening https://A admin http://B
        let parts: Vec<&str> = line.split_whitespace().collect();
        match parts.as_slice() {
            ["listening", api, "admin", adm] => {
                self.api = api.trim_start_matches("https://").parse()?;
                self.admin = adm.trim_start_matches("http://").parse()?;
            }
            _ => bail!("unexpected first line from mgmt-server: {line:?}"),
        }
        self.transcript.lock().unwrap().push(format!("$ {desc} &  (pid {}) -> {line}", child.id()));
        self.child = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL the server and reap it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            self.transcript.lock().unwrap().push(format!("(mgmt-server pid {} killed)", c.id()));
        }
    }

    /// Reap a server that something else killed (a test script, say).
    pub fn reap(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    /// Start again on the same ports with the same state.
    pub fn restart(&mut self) {
        self.kill();
        let (a, b) = (self.api.to_string(), self.admin.to_string());
        // The old socket may linger for a moment; retry the bind briefly.
        let mut last = None;
        for _ in 0..50 {
            match self.spawn(&a, &b) {
                Ok(()) => return,
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("cannot restart mgmt-server: {:#}", last.unwrap());
    }

    pub fn admin(&self) -> Admin {
        Admin { addr: self.admin }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A plain HTTP/1.1 request to `addr`; returns (status, body as JSON or as
/// a string value when it is not JSON).
pub fn http_request(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(700)))?;
    let body = body.map(|b| serde_json::to_vec(b).unwrap()).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(&body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_response(&raw)
}

/// Parse a complete HTTP response (Content-Length or read-to-close body).
pub fn parse_response(raw: &[u8]) -> Result<(u16, Value)> {
    let mut hs = [httparse::EMPTY_HEADER; 32];
    let mut r = httparse::Response::new(&mut hs);
    let n = match r.parse(raw)? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => bail!("incomplete HTTP response: {:?}", String::from_utf8_lossy(raw)),
    };
    let body = &raw[n..];
    let v = serde_json::from_slice(body).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()));
    Ok((r.code.unwrap_or(0), v))
}

/// Client of the admin API.
#[derive(Clone, Copy)]
pub struct Admin {
    pub addr: SocketAddr,
}

impl Admin {
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let (st, v) = http_request(self.addr, method, path, body)
            .unwrap_or_else(|e| panic!("admin {method} {path} failed: {e:#}"));
        assert!(st == 200, "admin {method} {path} answered {st}: {v}");
        v
    }

    /// Queue a job; returns its id.
    pub fn queue(&self, vm_uuid: &str, operation: &str, params: Value) -> String {
        let v = self.call(
            "POST",
            "/admin/v1/jobs",
            Some(&json!({"vm_uuid": vm_uuid, "operation": operation, "params": params})),
        );
        v["id"].as_str().expect("id").to_string()
    }

    pub fn job(&self, id: &str) -> Value {
        self.call("GET", &format!("/admin/v1/jobs/{id}"), None)
    }

    /// The job once it reaches `until` (a state name; "final" for any final
    /// state), or as it is after `secs` seconds.
    pub fn wait_job(&self, id: &str, until: &str, secs: u64) -> Value {
        let q = if until == "final" { String::new() } else { format!("&until={until}") };
        self.call("GET", &format!("/admin/v1/jobs/{id}?wait={secs}{q}"), None)
    }

    pub fn jobs(&self) -> Value {
        self.call("GET", "/admin/v1/jobs", None)
    }

    pub fn agents(&self) -> Value {
        self.call("GET", "/admin/v1/agents", None)
    }

    pub fn redeliver(&self, id: &str) -> Value {
        self.call("POST", &format!("/admin/v1/jobs/{id}/redeliver"), None)
    }

    /// Every result the server received for `job_id` (404 gives null).
    pub fn results(&self, job_id: &str) -> Value {
        let (st, v) = http_request(self.addr, "GET", &format!("/admin/v1/results/{job_id}"), None).unwrap();
        if st == 404 {
            Value::Null
        } else {
            v
        }
    }

    /// Number of check-ins the server has seen from `vm_uuid`.
    pub fn checkin_count(&self, vm_uuid: &str) -> u64 {
        self.agents()["agents"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["vm_uuid"] == vm_uuid))
            .and_then(|a| a["checkin_count"].as_u64())
            .unwrap_or(0)
    }
}

/// A rustls client config trusting `ca` and presenting `cert`/`key` (if given).
pub fn tls_client_config(ca: &Path, client: Option<(&Path, &Path)>) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut BufReader::new(std::fs::File::open(ca).unwrap())) {
        roots.add(c.unwrap()).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let cfg = match client {
        Some((c, k)) => {
            let certs = rustls_pemfile::certs(&mut BufReader::new(std::fs::File::open(c).unwrap()))
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key =
                rustls_pemfile::private_key(&mut BufReader::new(std::fs::File::open(k).unwrap())).unwrap().unwrap();
            b.with_client_auth_cert(certs, key).unwrap()
        }
        None => b.with_no_client_auth(),
    };
    Arc::new(cfg)
}

/// A TLS connection to the agent API, for protocol tests without an agent.
pub struct TlsClient {
    pub stream: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
}

impl TlsClient {
    pub fn connect(addr: SocketAddr, cfg: Arc<rustls::ClientConfig>) -> Result<TlsClient> {
        let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        tcp.set_read_timeout(Some(Duration::from_secs(60)))?;
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let conn = rustls::ClientConnection::new(cfg, name)?;
        let mut stream = rustls::StreamOwned::new(conn, tcp);
        while stream.conn.is_handshaking() {
            stream.conn.complete_io(&mut stream.sock)?;
        }
        Ok(TlsClient { stream })
    }

    /// Send raw request bytes and read one response (Content-Length framed).
    pub fn raw(&mut self, req: &[u8]) -> Result<(u16, Value)> {
        self.stream.write_all(req)?;
        self.stream.flush()?;
        let mut buf = Vec::new();
        let mut tmp = [0u8; 16384];
        loop {
            let n = match self.stream.read(&mut tmp) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
                Err(e) => return Err(e.into()),
            };
            buf.extend_from_slice(&tmp[..n]);
            let mut hs = [httparse::EMPTY_HEADER; 32];
            let mut r = httparse::Response::new(&mut hs);
            if let Ok(httparse::Status::Complete(h)) = r.parse(&buf) {
                let len = r
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| std::str::from_utf8(h.value).ok()?.parse::<usize>().ok());
                if let Some(len) = len {
                    if buf.len() >= h + len {
                        return parse_response(&buf[..h + len]);
                    }
                }
            }
            if n == 0 {
                return parse_response(&buf);
            }
        }
    }

    /// POST a JSON body (as bytes) to `path` on a keep-alive connection.
    pub fn post(&mut self, path: &str, body: &[u8]) -> Result<(u16, Value)> {
        let mut req = format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        self.raw(&req)
    }
}

/// What the fake responder does with one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A JSON answer with this status.
    Json(u16, Value),
    /// These exact bytes (status line and all), then close.
    Raw(Vec<u8>),
    /// Close the connection without answering.
    Close,
    /// Announce a body of this many bytes and send them, then close.
    Oversized(u64),
}

/// One request the fake responder received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub body: Value,
}

type Handler = dyn Fn(&str, &Value) -> Reply + Send + Sync;

/// A tiny HTTPS server for misbehaving-server tests: real TLS with the
/// world's PKI (client certificates required), answers chosen by a handler
/// that can be swapped while it runs.
pub struct FakeServer {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    handler: Arc<Mutex<Arc<Handler>>>,
}

impl FakeServer {
    pub fn start(pki_dir: &Path, handler: impl Fn(&str, &Value) -> Reply + Send + Sync + 'static) -> FakeServer {
        let tls = crate::server::tls_config(pki_dir, true).expect("fake server TLS config");
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Mutex<Arc<Handler>>> = Arc::new(Mutex::new(Arc::new(handler)));
        let (s2, h2) = (seen.clone(), handler.clone());
        std::thread::spawn(move || {
            for tcp in l.incoming().flatten() {
                let (tls, seen, handler) = (tls.clone(), s2.clone(), h2.clone());
                std::thread::spawn(move || fake_conn(tcp, tls, seen, handler));
            }
        });
        FakeServer { addr, seen, handler }
    }

    pub fn set_handler(&self, h: impl Fn(&str, &Value) -> Reply + Send + Sync + 'static) {
        *self.handler.lock().unwrap() = Arc::new(h);
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn fake_conn(
    tcp: TcpStream,
    tls: Arc<rustls::ServerConfig>,
    seen: Arc<Mutex<Vec<Seen>>>,
    handler: Arc<Mutex<Arc<Handler>>>,
) {
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(30)));
    let Ok(conn) = rustls::ServerConnection::new(tls) else { return };
    let mut conn = Conn::new(rustls::StreamOwned::new(conn, tcp));
    loop {
        let Ok(req) = conn.read_request(xcp_vm_agent::protocol::MAX_BODY_BYTES) else { return };
        let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
        seen.lock().unwrap().push(Seen { path: req.path.clone(), body: body.clone() });
        let h = handler.lock().unwrap().clone();
        match h(&req.path, &body) {
            Reply::Json(st, v) => {
                let b = serde_json::to_vec(&v).unwrap();
                if conn.respond(st, "application/json", &b, false).is_err() {
                    return;
                }
            }
            Reply::Raw(bytes) => {
                let _ = conn.stream.write_all(&bytes);
                let _ = conn.stream.flush();
                conn.stream.conn.send_close_notify();
                let _ = conn.stream.flush();
                return;
            }
            Reply::Close => return,
            Reply::Oversized(n) => {
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n{{\"jobs\":["
                );
                if conn.stream.write_all(head.as_bytes()).is_err() {
                    return;
                }
                let chunk = vec![b' '; 64 * 1024];
                let mut sent = 9u64;
                while sent < n {
                    let k = chunk.len().min((n - sent) as usize);
                    if conn.stream.write_all(&chunk[..k]).is_err() {
                        return;
                    }
                    sent += k as u64;
                }
                let _ = conn.stream.flush();
                return;
            }
        }
    }
}

/// Processes whose command line contains `marker` (from /proc).
pub fn pids_with_marker(marker: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        if pid == me {
            continue;
        }
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            if String::from_utf8_lossy(&cmd).contains(marker) {
                // A zombie has an empty cmdline, so anything found is alive.
                v.push(pid);
            }
        }
    }
    v
}

/// SIGKILL every process whose command line contains `marker` (cleanup of
/// scripts a killed agent left behind).
pub fn kill_marker(marker: &str) {
    for pid in pids_with_marker(marker) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
}

/// A unique marker for process names and file contents in one test.
pub fn marker(tag: &str) -> String {
    format!("xcpmark-{tag}-{}", &crate::server::util::uuid_v4()[..8])
}
