//! No peer can make either side wait past its deadlines or speak for a VM
//! it is not (issue 10, the peer half). Real parts only: the real
//! `mgmt-server` process and the real `xcp-vm-agent` binary, real TLS on
//! 127.0.0.1, hostile peers played by threads of this test.
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};
use vm_tests::harness::{agent_bin, tls_client_config, wait_for, ServerProc, TlsClient, World};

const SERVER: &str = env!("CARGO_BIN_EXE_mgmt-server");

fn checkin_body(vm: &str) -> Value {
    json!({
        "protocol_version": 1, "agent_version": "test", "vm_uuid": vm,
        "identity": {"vm_uuid": vm, "source": "dmi", "hostname": "h", "os": {}, "kernel": "k", "hypervisor": "kvm"},
        "capabilities": ["RunScript"],
        "metrics": {"cpu_usage_percent": 1.0, "memory_usage_percent": 2.0, "memory_used_kb": 1, "memory_total_kb": 2,
                    "memory_available_kb": 1, "uptime_seconds": 3, "load_average": 0.0, "load_average_5m": 0.0, "load_average_15m": 0.0, "process_count": 9},
        "network": [], "wait_seconds": 0, "pending_results": 0
    })
}

fn result(id: &str, status: &str) -> Value {
    json!({"job_id": id, "operation": "RunScript", "status": status, "message": status,
           "details": {}, "started_at": 1, "finished_at": 2, "duration_ms": 3})
}

fn tls(w: &World, s: &ServerProc, cert_dir: &std::path::Path) -> TlsClient {
    let cfg = tls_client_config(
        &w.pki.join("ca.pem"),
        Some((cert_dir.join("agent-cert.pem").as_path(), cert_dir.join("agent-key.pem").as_path())),
    );
    TlsClient::connect(s.api, cfg).expect("TLS connect")
}

fn alive(s: &ServerProc) -> bool {
    let pid = s.pid().expect("server started") as i32;
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|st| !st.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
        .unwrap_or(false)
}

/// A chunk size of ffffffffffffffff overflowed `len + size` in the server's
/// chunked parser: a panic, which with panic=abort (release) ends the whole
/// process. Before the fix the connection closed with no answer (debug) or
/// the server died (release).
#[test]
fn a_crafted_chunked_body_is_refused_and_the_server_survives() {
    let w = World::new("chunked", SERVER);
    let s = w.start_server("state", &[]);
    for size in ["ffffffffffffffff", "fffffffffffffff0"] {
        let mut c = tls(&w, &s, &w.pki);
        let req = format!(
            "POST /api/v1/results HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
             Transfer-Encoding: chunked\r\n\r\n1\r\n{{\r\n{size}\r\n"
        );
        let (st, v) = c.raw(req.as_bytes()).expect("an answer, not a dropped connection");
        assert_eq!(st, 413, "{v}");
        assert!(v["error"].as_str().unwrap_or("").contains("over the limit"), "{v}");
    }
    assert!(alive(&s), "mgmt-server died:\n{}", s.log_text());
    let mut c = tls(&w, &s, &w.pki);
    let (st, v) =
        c.post("/api/v1/checkin", checkin_body("11111111-2222-4333-8444-555555555555").to_string().as_bytes()).unwrap();
    assert_eq!(st, 200, "{v}");
}

/// `mgmt-server agent-cert` issues a certificate naming one VM; a connection
/// with it may check in, fetch jobs and report results for that VM only.
/// Before: any VM's certificate (the shared one) could fetch VM B's jobs.
#[test]
fn a_certificate_speaks_for_one_vm() {
    let w = World::new("certvm", SERVER);
    let (a, b) = ("aaaaaaaa-0000-4000-8000-00000000000a", "bbbbbbbb-0000-4000-8000-00000000000b");
    let dir_a = w.path("vm-a");
    let o = w.run_cmd(
        Command::new(SERVER).args(["agent-cert", "--pki"]).arg(&w.pki).args(["--vm-uuid", a, "--out"]).arg(&dir_a),
        Duration::from_secs(60),
    );
    assert!(o.status.success(), "agent-cert failed");
    for f in ["agent-cert.pem", "agent-key.pem", "ca.pem"] {
        assert!(dir_a.join(f).exists(), "{f} missing");
    }
    let o = w.run_cmd(Command::new(SERVER).args(["agent-cert", "--help"]), Duration::from_secs(10));
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("urn:uuid:"));
    let o = w.run_cmd(
        Command::new(SERVER)
            .args(["agent-cert", "--pki"])
            .arg(&w.pki)
            .args(["--vm-uuid", "nope", "--out"])
            .arg(w.path("x")),
        Duration::from_secs(10),
    );
    assert!(!o.status.success());

    let s = w.start_server("state", &[]);
    let admin = s.admin();
    let job_b = admin.queue(b, "RunScript", json!({"script": "echo secret"}));
    let job_a = admin.queue(a, "RunScript", json!({"script": "echo a"}));
    let mut c = tls(&w, &s, &dir_a);
    // VM A's certificate asking for VM B's jobs: 403 with the reason, nothing delivered.
    let (st, v) = c.post("/api/v1/checkin", checkin_body(b).to_string().as_bytes()).unwrap();
    assert_eq!(st, 403, "{v}");
    let m = v["error"].as_str().unwrap_or("");
    assert!(m.contains(a) && m.contains(b), "{m}");
    assert_eq!(admin.job(&job_b)["status"], "queued");
    // Nor report for B.
    let body = json!({"vm_uuid": b, "results": [result(&job_b, "succeeded")]});
    let (st, v) = c.post("/api/v1/results", body.to_string().as_bytes()).unwrap();
    assert_eq!(st, 403, "{v}");
    assert_eq!(admin.job(&job_b)["status"], "queued");
    // Its own VM: fine (the UUID in any case).
    let (st, v) = c.post("/api/v1/checkin", checkin_body(&a.to_uppercase()).to_string().as_bytes()).unwrap();
    assert_eq!(st, 200, "{v}");
    let (st, v) = c.post("/api/v1/checkin", checkin_body(a).to_string().as_bytes()).unwrap();
    assert_eq!(st, 200, "{v}");
    let body = json!({"vm_uuid": a, "results": [result(&job_a, "succeeded")]});
    let (st, v) = c.post("/api/v1/results", body.to_string().as_bytes()).unwrap();
    assert_eq!((st, &v["acknowledged"]), (200, &json!([job_a])), "{v}");
    assert_eq!(admin.job(&job_a)["status"], "succeeded");
    // The shared test certificate names no VM and still speaks for any.
    let mut shared = tls(&w, &s, &w.pki);
    let (st, v) = shared.post("/api/v1/checkin", checkin_body(b).to_string().as_bytes()).unwrap();
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["jobs"][0]["id"], job_b.as_str());
}

/// Results for job ids the server never issued were stored, one file each,
/// without limit. Now they are acknowledged (the agent's spool drains) and
/// not stored.
#[test]
fn results_for_unknown_jobs_are_not_stored() {
    let w = World::new("unknownres", SERVER);
    let s = w.start_server("state", &[]);
    let vm = "11111111-2222-4333-8444-555555555555";
    let mut c = tls(&w, &s, &w.pki);
    let ids: Vec<String> = (0..20).map(|i| format!("made-up-{i}")).collect();
    let body = json!({"vm_uuid": vm, "results": ids.iter().map(|i| result(i, "failed")).collect::<Vec<_>>()});
    let (st, v) = c.post("/api/v1/results", body.to_string().as_bytes()).unwrap();
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["acknowledged"].as_array().unwrap().len(), 20);
    assert!(s.admin().results("made-up-0").is_null(), "a result for an unknown job was stored");
    let stored = std::fs::read_dir(s.state.join("results")).unwrap().count();
    assert_eq!(stored, 0, "files in results/");
    // The server logs a request after answering it: wait for the line.
    let logged = wait_for(Duration::from_secs(10), || s.log_text().contains("not a job of this server").then_some(()));
    assert!(logged.is_some(), "{}", s.log_text());
}

fn raw_http(addr: SocketAddr, req: &str) -> (u16, Value) {
    let mut t = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    t.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    t.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    let _ = t.read_to_end(&mut raw);
    vm_tests::harness::parse_response(&raw).unwrap()
}

/// The admin API has no authentication and relies on being reachable from
/// loopback only. A web page can still reach it: by DNS rebinding (its own
/// name, resolved to 127.0.0.1, in Host) or a cross-origin `text/plain`
/// POST. Before: both created jobs.
#[test]
fn the_admin_api_refuses_what_a_web_page_could_send() {
    let w = World::new("adminweb", SERVER);
    let s = w.start_server("state", &[]);
    let a = s.admin;
    let body = r#"{"vm_uuid":"11111111-2222-4333-8444-555555555555","operation":"RunScript","params":{"script":"id"}}"#;
    let post = |host: &str, ctype: &str| {
        raw_http(
            a,
            &format!(
                "POST /admin/v1/jobs HTTP/1.1\r\nHost: {host}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            ),
        )
    };
    let (st, v) = post(&format!("evil.example:{}", a.port()), "application/json");
    assert_eq!(st, 403, "{v}");
    assert!(v["error"].as_str().unwrap().contains("DNS rebinding"), "{v}");
    let (st, _) = post("127.0.0.1:1", "application/json");
    assert_eq!(st, 403, "another port");
    let (st, v) = raw_http(a, "GET /admin/v1/jobs HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert_eq!(st, 403, "no Host: {v}");
    let (st, v) = post(&a.to_string(), "text/plain");
    assert_eq!(st, 415, "{v}");
    let (st, _) = raw_http(
        a,
        &format!(
            "POST /admin/v1/jobs/x/redeliver HTTP/1.1\r\nHost: {a}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        ),
    );
    assert_eq!(st, 415, "a POST without a JSON content type");
    assert_eq!(s.admin().jobs()["jobs"].as_array().unwrap().len(), 0, "a refused request created a job");
    // What our own clients send works, under either loopback name.
    let (st, v) = post(&a.to_string(), "application/json; charset=utf-8");
    assert_eq!(st, 200, "{v}");
    let (st, v) = post(&format!("localhost:{}", a.port()), "application/json");
    assert_eq!(st, 200, "{v}");
}

// ---- The agent against hostile peers ----

/// A TLS server with the world's PKI that reads one request and then sends
/// its answer's head one byte every 500 ms, for ever.
fn trickling_server(w: &World) -> SocketAddr {
    let tls = vm_tests::server::tls_config(&w.pki, true).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for tcp in l.incoming().flatten() {
            let tls = tls.clone();
            std::thread::spawn(move || {
                let conn = rustls::ServerConnection::new(tls).unwrap();
                let mut s = rustls::StreamOwned::new(conn, tcp);
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                for b in b"HTTP/1.1 200 OK\r\nX-Slow: ".iter().chain(std::iter::repeat(&b'a')) {
                    std::thread::sleep(Duration::from_millis(500));
                    if s.write_all(&[*b]).and_then(|_| s.flush()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Found in review: the client's timeouts applied to each read, so a server
/// (or anything in the path) sending a byte every 500 ms held the agent for
/// days. Now the answer's head has a deadline as a whole (long_poll_seconds
/// + 30 s): `once` gives up after 30 s with long_poll_seconds 0.
#[test]
fn a_trickling_server_cannot_hold_the_agent() {
    let w = World::new("trickle", SERVER);
    let addr = trickling_server(&w);
    let agent = w.agent("agent", addr, json!({"long_poll_seconds": 0}));
    agent_bin(); // built before the clock starts
    let t0 = Instant::now();
    let o = w.agent_cmd(&agent, &["once"], Duration::from_secs(90));
    let took = t0.elapsed();
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(!o.status.success(), "once succeeded against a trickling server: {text}");
    assert!(took < Duration::from_secs(45), "once took {took:?} against a trickling server (deadline 30 s)");
    assert!(text.contains("timed out after 30 s"), "{text}");
}

/// Found in review: `server_url` was checked for https:// only; a control
/// character in its path went into the request line (header injection).
/// check-config and run refuse it alike, before any connection.
#[test]
fn control_characters_in_server_url_are_refused_everywhere() {
    let w = World::new("ctlurl", SERVER);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    l.set_nonblocking(true).unwrap();
    for bad in [format!("https://127.0.0.1:{port}/a\r\nX-Injected: 1"), format!("https://127.0.0.1:{port}/a\u{7f}b")] {
        let agent = w.agent("agent", "127.0.0.1:1".parse().unwrap(), json!({"server_url": bad}));
        for args in [&["check-config"][..], &["once"]] {
            let o = w.agent_cmd(&agent, args, Duration::from_secs(60));
            let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
            assert!(!o.status.success(), "{args:?} accepted {bad:?}: {text}");
            assert!(text.contains("control characters"), "{args:?}: {text}");
        }
    }
    assert!(l.accept().is_err(), "the agent connected with a refused server_url");
}

/// Found in review: HTTP_PROXY (meant for http URLs) was used for https, and
/// NO_PROXY took wildcards curl does not know while ignoring CIDR ranges.
/// The real agent against the real server, with the environment curl reads.
#[test]
fn proxy_variables_follow_curl() {
    let w = World::new("proxyenv", SERVER);
    let s = w.start_server("state", &[]);
    let agent = w.agent("agent", s.api, json!({}));
    // Nothing listens on the proxies' ports: using one fails.
    let dead = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let dead = format!("http://{dead}");
    let once = |env: &[(&str, &str)]| {
        let mut c = Command::new(agent_bin());
        c.arg("--config").arg(&agent.config).arg("once").current_dir(&agent.dir);
        for v in
            ["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy"]
        {
            c.env_remove(v);
        }
        c.envs(env.iter().copied());
        w.run_cmd(&mut c, Duration::from_secs(60))
    };
    assert!(once(&[("HTTP_PROXY", &dead), ("http_proxy", &dead)]).status.success(), "HTTP_PROXY used for https");
    assert!(once(&[("HTTPS_PROXY", &dead), ("NO_PROXY", "127.0.0.0/8")]).status.success(), "NO_PROXY CIDR ignored");
    assert!(!once(&[("https_proxy", &dead), ("no_proxy", ".0.0.1")]).status.success(), "a suffix of an IP is no match");
    let o = once(&[("HTTPS_PROXY", &dead)]);
    assert!(!o.status.success(), "HTTPS_PROXY must be used");
    assert!(String::from_utf8_lossy(&o.stderr).contains("proxy"), "{}", String::from_utf8_lossy(&o.stderr));
}

fn status_agent(w: &World) -> (SocketAddr, vm_tests::harness::AgentProc, ServerProc) {
    let s = w.start_server("state", &[]);
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let agent = w.agent("agent", s.api, json!({"status_listen": addr.to_string()}));
    let d = w.spawn_agent(&agent, &["run"]);
    wait_for(Duration::from_secs(60), || TcpStream::connect(addr).ok()).expect("status endpoint never listened");
    (addr, d, s)
}

fn health(addr: SocketAddr) -> Option<u16> {
    let mut t = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    t.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
    t.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
    let mut raw = String::new();
    t.read_to_string(&mut raw).ok()?;
    raw.split_whitespace().nth(1)?.parse().ok()
}

/// Found in review: the status endpoint read a request line without a
/// length limit (a client could make the agent buffer any amount) and its
/// 5 s timeout applied to each read, so a client sending a byte every
/// second held the endpoint (one thread, one client at a time) for ever.
#[test]
fn the_status_endpoint_bounds_what_a_client_sends() {
    let w = World::new("statusbound", SERVER);
    let (addr, mut d, _s) = status_agent(&w);
    // 16 MiB of request line: the agent stops reading after 8 KiB and
    // answers 414, so the writes fail (or the answer is 414).
    let mut t = TcpStream::connect(addr).unwrap();
    t.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    let chunk = vec![b'a'; 64 * 1024];
    let mut sent = 0usize;
    t.write_all(b"GET /").unwrap();
    while sent < 16 << 20 {
        if t.write_all(&chunk).is_err() {
            break;
        }
        sent += chunk.len();
    }
    let mut raw = String::new();
    let _ = t.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = t.read_to_string(&mut raw);
    assert!(sent < 16 << 20 || raw.starts_with("HTTP/1.1 414"), "the agent read {sent} bytes of request line: {raw:?}");

    // A trickler: one header byte a second. Another client is answered
    // within the deadline (5 s) and the trickler is cut off.
    let mut slow = TcpStream::connect(addr).unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\n").unwrap();
    let trickle = std::thread::spawn(move || {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(30) {
            if slow.write_all(b"X").is_err() {
                return t0.elapsed();
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        t0.elapsed()
    });
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    assert_eq!(health(addr), Some(200), "another client got no answer");
    assert!(t0.elapsed() < Duration::from_secs(10), "another client waited {:?}", t0.elapsed());
    let held = trickle.join().unwrap();
    assert!(held < Duration::from_secs(15), "the trickler held its connection {held:?}");
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(d.wait_timeout(Duration::from_secs(10)).is_some());
}
