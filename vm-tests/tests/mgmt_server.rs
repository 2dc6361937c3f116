//! The reference server on its own: command line, protocol errors, long-poll,
//! delivery and result semantics, persistence across a restart. Driven over
//! real TLS with the PKI's agent certificate (no agent binary needed).
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use vm_tests::harness::{http_request, tls_client_config, wait_for, Admin, ServerProc, TlsClient, World};
use vm_tests::schema::{schemas_dir, Checker};
use xcp_vm_agent::protocol::MAX_BODY_BYTES;

const SERVER: &str = env!("CARGO_BIN_EXE_mgmt-server");
const VM: &str = "11111111-2222-4333-8444-555555555555";

fn client(w: &World, s: &ServerProc) -> TlsClient {
    let cfg = tls_client_config(
        &w.pki.join("ca.pem"),
        Some((w.pki.join("agent-cert.pem").as_path(), w.pki.join("agent-key.pem").as_path())),
    );
    TlsClient::connect(s.api, cfg).expect("TLS connect with the agent certificate")
}

fn checkin_body(vm: &str, wait: u64) -> Value {
    json!({
        "protocol_version": 1, "agent_version": "test", "vm_uuid": vm,
        "identity": {"vm_uuid": vm, "source": "dmi", "hostname": "h", "os": {}, "kernel": "k", "hypervisor": "kvm"},
        "capabilities": ["RunScript"],
        "metrics": {"cpu_usage_percent": 1.0, "memory_usage_percent": 2.0, "memory_used_kb": 1, "memory_total_kb": 2,
                    "memory_available_kb": 1, "uptime_seconds": 3, "load_average": 0.0, "load_average_5m": 0.0, "load_average_15m": 0.0, "process_count": 9},
        "network": [], "wait_seconds": wait, "pending_results": 0
    })
}

fn checkin(c: &mut TlsClient, vm: &str, wait: u64) -> Vec<Value> {
    let (st, v) = c.post("/api/v1/checkin", checkin_body(vm, wait).to_string().as_bytes()).unwrap();
    assert_eq!(st, 200, "check-in answered {st}: {v}");
    Checker::new(&schemas_dir()).validate("checkin-response.json", &v).unwrap();
    v["jobs"].as_array().unwrap().clone()
}

fn result(id: &str, status: &str) -> Value {
    json!({"job_id": id, "operation": "RunScript", "status": status, "message": status,
           "details": {}, "started_at": 1, "finished_at": 2, "duration_ms": 3})
}

fn report(c: &mut TlsClient, vm: &str, results: Vec<Value>) -> Vec<Value> {
    let body = json!({"vm_uuid": vm, "results": results});
    Checker::new(&schemas_dir()).validate("results-report.json", &body).unwrap();
    let (st, v) = c.post("/api/v1/results", body.to_string().as_bytes()).unwrap();
    assert_eq!(st, 200, "results answered {st}: {v}");
    Checker::new(&schemas_dir()).validate("results-ack.json", &v).unwrap();
    v["acknowledged"].as_array().unwrap().clone()
}

fn server_cmd(w: &World, args: &[&str]) -> std::process::Output {
    w.run_cmd(Command::new(SERVER).args(args), Duration::from_secs(30))
}

#[test]
fn every_command_has_help() {
    let w = World::new("help", SERVER);
    for args in [&["--help"][..], &["help"], &["init-pki", "--help"], &["serve", "--help"]] {
        let o = server_cmd(&w, args);
        assert!(o.status.success(), "{args:?}");
        assert!(String::from_utf8_lossy(&o.stdout).contains("mgmt-server"), "{args:?}");
    }
    let o = server_cmd(&w, &["frobnicate"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown command"));
    let o = server_cmd(&w, &["serve", "--pki", "x"]);
    assert_eq!(o.status.code(), Some(2), "--state is required");
}

#[test]
fn init_pki_writes_private_keys_0600() {
    use std::os::unix::fs::PermissionsExt;
    let w = World::new("pki", SERVER);
    for f in ["ca.pem", "server-cert.pem", "server-key.pem", "agent-cert.pem", "agent-key.pem", "other-ca.pem"] {
        assert!(w.pki.join(f).exists(), "{f} missing");
    }
    for f in ["server-key.pem", "agent-key.pem", "ca-key.pem", "other-agent-key.pem"] {
        let mode = std::fs::metadata(w.pki.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f} has mode {mode:o}");
    }
}

#[test]
fn admin_api_only_listens_on_loopback() {
    let w = World::new("adminloop", SERVER);
    let pki = w.pki.to_str().unwrap().to_string();
    let state = w.path("state");
    let o = server_cmd(
        &w,
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "0.0.0.0:0",
            "--pki",
            &pki,
            "--state",
            state.to_str().unwrap(),
        ],
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("loopback"), "the refusal should say why");
}

#[test]
fn client_certificate_is_required() {
    let w = World::new("needcert", SERVER);
    let s = w.start_server("state", &[]);
    let cfg = tls_client_config(&w.pki.join("ca.pem"), None);
    let r = TlsClient::connect(s.api, cfg).and_then(|mut c| c.post("/api/v1/checkin", b"{}"));
    assert!(r.is_err(), "a client without a certificate must not get an answer: {r:?}");
    let logged = wait_for(Duration::from_secs(5), || s.log_text().contains("no client certificate").then_some(()));
    assert!(logged.is_some(), "server log should say why: {}", s.log_text());

    // With --no-client-auth the same client gets through.
    let s2 = w.start_server("state2", &["--no-client-auth"]);
    let cfg = tls_client_config(&w.pki.join("ca.pem"), None);
    let mut c = TlsClient::connect(s2.api, cfg).unwrap();
    let (st, _) = c.post("/api/v1/checkin", checkin_body(VM, 0).to_string().as_bytes()).unwrap();
    assert_eq!(st, 200);
}

#[test]
fn protocol_errors_name_the_problem() {
    let w = World::new("errors", SERVER);
    let s = w.start_server("state", &[]);
    let c_ = Checker::new(&schemas_dir());
    let mut c = client(&w, &s);
    let mut expect = |path: &str, body: &[u8], status: u16, words: &[&str]| {
        let (st, v) = c.post(path, body).unwrap();
        assert_eq!(st, status, "{path} {:?}: {v}", String::from_utf8_lossy(body));
        c_.validate("error.json", &v).unwrap();
        let e = v["error"].as_str().unwrap();
        for word in words {
            assert!(
                e.contains(word),
                "error for {path} {:?} should mention {word:?}: {e}",
                String::from_utf8_lossy(body)
            );
        }
    };
    // All on one keep-alive connection (TlsClient never reconnects): a 400
    // for a bad body must not break it. Every error matches error.json.
    expect("/api/v1/checkin", b"{not json", 400, &["malformed JSON"]);
    expect("/api/v1/checkin", b"[1, 2]", 400, &["JSON object"]);
    let mut b = checkin_body(VM, 0);
    b["wait_seconds"] = json!("10");
    expect("/api/v1/checkin", b.to_string().as_bytes(), 400, &["wait_seconds", "invalid type"]);
    let mut b = checkin_body(VM, 0);
    b.as_object_mut().unwrap().remove("vm_uuid");
    expect("/api/v1/checkin", b.to_string().as_bytes(), 400, &["vm_uuid"]);
    let b = checkin_body("../../etc", 0);
    expect("/api/v1/checkin", b.to_string().as_bytes(), 400, &["vm_uuid"]);
    let b = json!({"vm_uuid": VM, "results": [result("a", "succeeded"), result("b", "done")]});
    expect("/api/v1/results", b.to_string().as_bytes(), 400, &["results[1]", "status", "done"]);
    expect("/api/v1/nowhere", b"{}", 404, &["/api/v1/nowhere"]);
    // The connection is still usable after all those errors.
    assert!(checkin(&mut c, VM, 0).is_empty());

    let (st, v) = c.raw(b"GET /api/v1/checkin HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_eq!(st, 405, "{v}");

    // 413 from Content-Length, before reading the body.
    let mut c = client(&w, &s);
    let head = format!("POST /api/v1/checkin HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", MAX_BODY_BYTES + 1);
    let (st, v) = c.raw(head.as_bytes()).unwrap();
    assert_eq!(st, 413, "{v}");
    assert!(v["error"].as_str().unwrap().contains("limit"));

    // 413 for a chunked body that passes the cap.
    let mut c = client(&w, &s);
    let mut req = b"POST /api/v1/results HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    let chunk = vec![b' '; 1 << 20];
    for _ in 0..5 {
        req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        req.extend_from_slice(&chunk);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let (st, v) = c.raw(&req).unwrap();
    assert_eq!(st, 413, "{v}");

    // A small chunked body is fine.
    let mut c = client(&w, &s);
    let body = checkin_body(VM, 0).to_string();
    let (a, b) = body.split_at(body.len() / 2);
    let req = format!(
        "POST /api/v1/checkin HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
        a.len(),
        b.len()
    );
    let (st, v) = c.raw(req.as_bytes()).unwrap();
    assert_eq!(st, 200, "{v}");
}

#[test]
fn long_poll_holds_then_wakes_when_a_job_is_queued() {
    let w = World::new("longpoll", SERVER);
    let s = w.start_server("state", &[]);
    let admin = s.admin();
    let mut c = client(&w, &s);

    // Nothing queued: held for wait_seconds, then an empty answer.
    let t0 = Instant::now();
    assert!(checkin(&mut c, VM, 1).is_empty());
    let held = t0.elapsed();
    assert!(held >= Duration::from_millis(900) && held < Duration::from_secs(5), "held {held:?}");

    // A job queued while the check-in is held is answered at once.
    let t0 = Instant::now();
    let n = admin.checkin_count(VM);
    let waiter = {
        let mut c = client(&w, &s);
        std::thread::spawn(move || (checkin(&mut c, VM, 30), Instant::now()))
    };
    // The server records a check-in before it holds it.
    let held = wait_for(Duration::from_secs(10), || (admin.checkin_count(VM) > n).then_some(()));
    assert!(held.is_some(), "the check-in never reached the server");
    let queued_at = Instant::now();
    let id = admin.queue(VM, "RunScript", json!({"script": "true"}));
    let (jobs, answered_at) = waiter.join().unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0]["id"], id.as_str());
    let latency = answered_at.duration_since(queued_at);
    // A condition-variable wake-up takes microseconds; the bound leaves room
    // for a loaded 2-core CI machine.
    assert!(latency < Duration::from_millis(2000), "job pickup took {latency:?}");
    assert!(t0.elapsed() < Duration::from_secs(5));

    // Queued before the check-in: answered at once even with a long wait.
    let id2 = admin.queue(VM, "RunScript", json!({"script": "true"}));
    let t0 = Instant::now();
    let jobs = checkin(&mut c, VM, 30);
    assert!(t0.elapsed() < Duration::from_secs(1));
    // Both are undelivered-without-result, so both come, in queue order.
    let ids: Vec<&str> = jobs.iter().map(|j| j["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec![id.as_str(), id2.as_str()]);

    // Another VM's job does not wake this VM's check-in.
    report(&mut c, VM, vec![result(&id, "succeeded"), result(&id2, "succeeded")]);
    let n = admin.checkin_count(VM);
    let t0 = Instant::now();
    let waiter = {
        let mut c = client(&w, &s);
        std::thread::spawn(move || checkin(&mut c, VM, 3))
    };
    let held = wait_for(Duration::from_secs(10), || (admin.checkin_count(VM) > n).then_some(()));
    assert!(held.is_some(), "the check-in never reached the server");
    admin.queue("another-vm", "RunScript", json!({}));
    assert!(waiter.join().unwrap().is_empty());
    // Held its full 3 s: the other VM's job did not end it early.
    assert!(t0.elapsed() >= Duration::from_secs(3), "the check-in ended after {:?}", t0.elapsed());

    // The server's own bound caps the agent's.
    let s2 = w.start_server("state2", &["--max-wait", "1"]);
    let mut c2 = client(&w, &s2);
    let t0 = Instant::now();
    assert!(checkin(&mut c2, VM, 60).is_empty());
    assert!(t0.elapsed() < Duration::from_secs(3), "--max-wait 1 held {:?}", t0.elapsed());
}

#[test]
fn delivery_results_and_restart() {
    let w = World::new("delivery", SERVER);
    let mut s = w.start_server("state", &[]);
    let admin = s.admin();
    let checker = Checker::new(&schemas_dir());
    let mut c = client(&w, &s);
    let id = admin.queue(VM, "RunScript", json!({"script": "echo hi"}));
    assert_eq!(admin.job(&id)["status"], "queued");

    // At least once: sent on every check-in until a result arrives.
    assert_eq!(checkin(&mut c, VM, 0).len(), 1);
    assert_eq!(checkin(&mut c, VM, 0).len(), 1);
    let j = admin.job(&id);
    assert_eq!((j["status"].as_str(), j["delivery_count"].as_u64()), (Some("delivered"), Some(2)));

    // A running report stops redelivery.
    assert_eq!(report(&mut c, VM, vec![result(&id, "running")]), vec![json!(id)]);
    assert_eq!(admin.job(&id)["status"], "running");
    assert!(checkin(&mut c, VM, 0).is_empty());

    // Final result; a second final one is acknowledged and ignored.
    assert_eq!(report(&mut c, VM, vec![result(&id, "succeeded")]), vec![json!(id)]);
    assert_eq!(report(&mut c, VM, vec![result(&id, "failed")]), vec![json!(id)]);
    let j = admin.job(&id);
    assert_eq!(j["status"], "succeeded");
    assert_eq!(j["result"]["status"], "succeeded");
    assert_eq!(j["results_ignored"], 1);
    checker.validate("admin-job.json", &j).unwrap();
    let log = admin.results(&id);
    checker.validate("admin-result-log.json", &log).unwrap();
    let disp: Vec<&str> =
        log["results"].as_array().unwrap().iter().map(|r| r["disposition"].as_str().unwrap()).collect();
    assert_eq!(disp, vec!["applied", "applied", "ignored_duplicate"]);

    // Unknown job: acknowledged, not stored. Another VM's job: acknowledged, not applied.
    assert_eq!(report(&mut c, VM, vec![result("no-such-job", "failed")]), vec![json!("no-such-job")]);
    assert!(admin.results("no-such-job").is_null());
    let other = admin.queue("other-vm", "RunScript", json!({}));
    report(&mut c, VM, vec![result(&other, "succeeded")]);
    assert_eq!(admin.job(&other)["status"], "queued");
    assert_eq!(admin.results(&other)["results"][0]["disposition"], "wrong_vm");

    // Redelivery hook: sent once more, then not again.
    admin.redeliver(&id);
    assert_eq!(checkin(&mut c, VM, 0).len(), 1);
    assert!(checkin(&mut c, VM, 0).is_empty());
    assert_eq!(admin.job(&id)["delivery_count"], 3);

    // Wait for a state through the admin API.
    let id3 = admin.queue(VM, "RunScript", json!({}));
    let waiter = std::thread::spawn({
        let admin = Admin { addr: admin.addr };
        let id3 = id3.clone();
        move || admin.wait_job(&id3, "final", 30)
    });
    // The server logs the wait under its store lock before it blocks: once
    // the line is there, the result below can only reach the waiter by
    // waking it (no sleep that passes whether or not it was woken).
    let waiting = format!("for job {id3} to reach a final state (now queued)");
    let blocked = wait_for(Duration::from_secs(20), || s.log_text().contains(&waiting).then_some(()));
    assert!(blocked.is_some(), "the waiter never blocked");
    assert!(!waiter.is_finished(), "the waiter returned before the job was final");
    checkin(&mut c, VM, 0);
    report(&mut c, VM, vec![result(&id3, "no_change")]);
    assert_eq!(waiter.join().unwrap()["status"], "no_change");

    // Everything survives a restart (SIGKILL, no chance to flush anything).
    let before_jobs = admin.jobs();
    let before_agents = admin.agents();
    checker.validate("admin-job-list.json", &before_jobs).unwrap();
    checker.validate("admin-agent-list.json", &before_agents).unwrap();
    s.restart();
    let admin = s.admin();
    assert_eq!(admin.jobs(), before_jobs);
    assert_eq!(admin.agents(), before_agents);
    assert_eq!(admin.results(&id), log);
    for sub in ["agents", "jobs", "results"] {
        assert!(dir_has_json(&s.state.join(sub)), "no state files in {sub}");
    }

    // Admin API errors.
    let a = s.admin;
    let (st, v) = http_request(a, "POST", "/admin/v1/jobs", Some(&json!({"operation": "RunScript"}))).unwrap();
    assert_eq!(st, 400);
    assert!(v["error"].as_str().unwrap().contains("vm_uuid"), "{v}");
    let (st, _) =
        http_request(a, "POST", "/admin/v1/jobs", Some(&json!({"vm_uuid": "a/b", "operation": "X"}))).unwrap();
    assert_eq!(st, 400);
    let (st, _) = http_request(a, "GET", "/admin/v1/jobs/nope", None).unwrap();
    assert_eq!(st, 404);
    let (st, _) = http_request(a, "DELETE", "/admin/v1/jobs", None).unwrap();
    assert_eq!(st, 405);
    let (st, _) = http_request(a, "GET", "/admin/v2/x", None).unwrap();
    assert_eq!(st, 404);
}

fn dir_has_json(d: &Path) -> bool {
    std::fs::read_dir(d)
        .map(|r| r.flatten().any(|e| e.path().extension().is_some_and(|x| x == "json")))
        .unwrap_or(false)
}
