//! End-to-end tests of the agent core: the real `xcp-vm-agent` binary against
//! the real `mgmt-server` (or a fake HTTPS responder for misbehaving-server
//! cases), over real TLS with client certificates on 127.0.0.1.
//!
//! On failure every test prints the commands it ran with their exit status,
//! stdout and stderr, the server log and the agent's log files
//! (`vm_tests::harness::World`). `XCP_TEST_KEEP=1` keeps the scratch
//! directory of a failed test.
use serde_json::{json, Value};
use std::process::Output;
use std::time::{Duration, Instant};
use vm_tests::harness::{kill_marker, marker, pids_with_marker, wait_for, Agent, FakeServer, Reply, ServerProc, World};
use vm_tests::schema::{schemas_dir, Checker};

const SERVER: &str = env!("CARGO_BIN_EXE_mgmt-server");
const CMD_TIMEOUT: Duration = Duration::from_secs(90);

/// A world with a running server and one agent configured against it.
/// Fields drop in order: agent processes and server first, the world (which
/// prints the transcript on failure and removes the scratch dir) last.
struct Setup {
    server: ServerProc,
    agent: Agent,
    vm: String,
    w: World,
}

fn setup(name: &str, overrides: Value) -> Setup {
    let w = World::new(name, SERVER);
    let server = w.start_server("server-state", &[]);
    let agent = w.agent("agent", server.api, overrides);
    let vm = w.vm_uuid(&agent);
    Setup { server, agent, vm, w }
}

impl Setup {
    fn once(&self) -> Output {
        self.w.agent_cmd(&self.agent, &["once"], CMD_TIMEOUT)
    }
    fn queue(&self, op: &str, params: Value) -> String {
        self.server.admin().queue(&self.vm, op, params)
    }
    fn job(&self, id: &str) -> Value {
        self.server.admin().job(id)
    }
}

/// stdout and stderr of a command, for message checks.
fn text(o: &Output) -> String {
    format!("{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn assert_ok(o: &Output, what: &str) {
    assert!(o.status.success(), "{what} failed: {}", o.status);
}

fn assert_failed_mentioning(o: &Output, what: &str, words: &[&str]) {
    assert!(!o.status.success(), "{what} should have failed but exited 0");
    let t = text(o).to_lowercase();
    assert!(
        words.iter().any(|w| t.contains(&w.to_lowercase())),
        "{what}: the error should mention one of {words:?}; it said:\n{}",
        text(o)
    );
}

fn count_lines(p: &std::path::Path) -> usize {
    std::fs::read_to_string(p).map(|s| s.lines().count()).unwrap_or(0)
}

/// Kills leftover processes carrying a marker when the test ends, pass or fail.
struct MarkerGuard(String);
impl Drop for MarkerGuard {
    fn drop(&mut self) {
        kill_marker(&self.0);
    }
}

#[test]
fn run_script_round_trip() {
    let s = setup("roundtrip", json!({}));
    let ok = s.queue(
        "RunScript",
        json!({"script": "echo \"hello $1 $GREETING\"; echo to-stderr >&2", "args": ["world"], "env": {"GREETING": "hi"}}),
    );
    let bad = s.queue("RunScript", json!({"script": "echo partial; exit 3"}));
    assert_ok(&s.once(), "once");

    let j = s.job(&ok);
    assert_eq!(j["status"], "succeeded", "job: {j:#}");
    let r = &j["result"];
    assert_eq!(r["job_id"], ok.as_str());
    assert_eq!(r["operation"], "RunScript");
    assert_eq!(r["details"]["exit_code"], 0, "result: {r:#}");
    assert_eq!(r["details"]["stdout"], "hello world hi\n");
    assert_eq!(r["details"]["stderr"], "to-stderr\n");
    assert_eq!(j["delivery_count"], 1);

    let j = s.job(&bad);
    assert_eq!(j["status"], "failed", "job: {j:#}");
    assert_eq!(j["result"]["details"]["exit_code"], 3);
    assert_eq!(j["result"]["details"]["stdout"], "partial\n");

    // The server knows the agent: version, identity, metrics, network.
    let agents = s.server.admin().agents();
    let a = agents["agents"].as_array().unwrap().iter().find(|a| a["vm_uuid"] == s.vm.as_str()).cloned();
    let a = a.unwrap_or_else(|| panic!("agent {} not listed: {agents:#}", s.vm));
    assert_eq!(a["agent_version"], xcp_vm_agent::VERSION);
    assert_eq!(a["client_certificate"], true);
    assert_eq!(a["identity"]["vm_uuid"], s.vm.as_str());
    for m in [
        "cpu_usage_percent",
        "memory_usage_percent",
        "memory_used_kb",
        "memory_total_kb",
        "memory_available_kb",
        "uptime_seconds",
        "load_average",
        "load_average_5m",
        "load_average_15m",
        "process_count",
    ] {
        assert!(!a["metrics"][m].is_null(), "metric {m} missing: {:#}", a["metrics"]);
    }
    // The seed agent's types: one number for the 1-minute load, an integer uptime.
    assert!(a["metrics"]["load_average"].is_number(), "{:#}", a["metrics"]);
    assert!(a["metrics"]["uptime_seconds"].is_u64(), "{:#}", a["metrics"]);
    assert!(a["capabilities"].as_array().unwrap().iter().any(|c| c == "RunScript"));

    // What went over the wire matches the written protocol.
    let c = Checker::new(&schemas_dir());
    c.validate("admin-job.json", &s.job(&ok)).unwrap();
    c.validate("job-result.json", &s.job(&ok)["result"]).unwrap();
    c.validate("admin-agent.json", &a).unwrap();
}

#[test]
fn script_timeout_kills_its_children() {
    let s = setup("timeout", json!({}));
    let m = marker("timeout");
    let _g = MarkerGuard(m.clone());
    let id = s.queue(
        "RunScript",
        json!({"script": format!("(exec -a {m} sleep 300) &\necho started\nsleep 300\necho never"), "timeout_seconds": 2}),
    );
    let t0 = Instant::now();
    assert_ok(&s.once(), "once");
    assert!(t0.elapsed() < Duration::from_secs(30), "once took {:?}", t0.elapsed());
    let j = s.job(&id);
    assert_eq!(j["status"], "failed", "job: {j:#}");
    assert!(j["result"]["message"].as_str().unwrap_or("").contains("timed out"), "job: {j:#}");
    assert_eq!(j["result"]["details"]["timed_out"], true);
    assert_eq!(j["result"]["details"]["stdout"], "started\n");
    let gone = wait_for(Duration::from_secs(5), || pids_with_marker(&m).is_empty().then_some(()));
    assert!(gone.is_some(), "the script's background child {m} survived the timeout: pids {:?}", pids_with_marker(&m));
}

#[test]
fn wrong_ca_is_a_clear_error() {
    let w = World::new("wrongca", SERVER);
    let server = w.start_server("state", &[]);
    let agent = w.agent("agent", server.api, json!({"server_cert": w.pki.join("other-ca.pem")}));
    let o = w.agent_cmd(&agent, &["once"], CMD_TIMEOUT);
    assert_failed_mentioning(&o, "once against a server the CA does not vouch for", &["certificate"]);
    assert!(server.admin().agents()["agents"].as_array().unwrap().is_empty(), "the check-in must not have got through");
    drop(server);
}

#[test]
fn missing_or_wrong_client_certificate_is_a_clear_error() {
    let w = World::new("clientcert", SERVER);
    let server = w.start_server("state", &[]);

    // No client certificate configured at all.
    let agent = w.agent("nocert", server.api, json!({"client_cert": null}));
    let o = w.agent_cmd(&agent, &["once"], CMD_TIMEOUT);
    assert_failed_mentioning(&o, "once without a client certificate", &["certificate"]);

    // A certificate file that does not exist: the error names the path.
    let missing = w.path("nowhere/agent.pem");
    let agent = w.agent("missingfile", server.api, json!({"client_cert": [missing, w.pki.join("agent-key.pem")]}));
    let o = w.agent_cmd(&agent, &["once"], CMD_TIMEOUT);
    assert_failed_mentioning(&o, "once with a missing certificate file", &["nowhere/agent.pem"]);

    // A certificate signed by another CA.
    let agent = w.agent(
        "othercert",
        server.api,
        json!({"client_cert": [w.pki.join("other-agent-cert.pem"), w.pki.join("other-agent-key.pem")]}),
    );
    let o = w.agent_cmd(&agent, &["once"], CMD_TIMEOUT);
    assert_failed_mentioning(&o, "once with a client certificate of another CA", &["certificate"]);

    assert!(server.admin().agents()["agents"].as_array().unwrap().is_empty(), "no check-in may get through");
    let log = server.log_text();
    assert!(log.contains("TLS handshake failed"), "server log should record the refusals:\n{log}");
    drop(server);
}

#[test]
fn server_restart_while_a_result_is_spooled() {
    let mut s = setup("restart", json!({}));
    let count = s.w.path("count");
    let pid = s.server.pid().unwrap();
    // The script runs once, then takes the server down before the agent can
    // deliver its result.
    let id =
        s.queue("RunScript", json!({"script": format!("echo run >> '{}'\nkill -9 {pid}\necho done", count.display())}));
    let o = s.once();
    assert!(!o.status.success(), "once must fail while the server is down");
    s.server.reap();
    assert_eq!(count_lines(&count), 1);

    s.server.restart();
    let j = s.job(&id);
    assert!(
        ["delivered", "running"].contains(&j["status"].as_str().unwrap()),
        "the restarted server must still know the job: {j:#}"
    );
    assert_ok(&s.once(), "once after the server restart");
    let j = s.job(&id);
    assert_eq!(j["status"], "succeeded", "job: {j:#}");
    assert_eq!(j["result"]["details"]["stdout"], "done\n");
    assert_eq!(count_lines(&count), 1, "the script must have run exactly once");
}

#[test]
fn same_job_delivered_twice_runs_once() {
    let s = setup("dedup", json!({}));
    let count = s.w.path("count");
    let id = s.queue("RunScript", json!({"script": format!("echo run >> '{}'", count.display())}));
    assert_ok(&s.once(), "first once");
    assert_eq!(s.job(&id)["status"], "succeeded");
    assert_eq!(count_lines(&count), 1);

    let r = s.server.admin().redeliver(&id);
    assert_eq!(r["redeliver"], true);
    assert_ok(&s.once(), "second once");
    let j = s.job(&id);
    assert_eq!(j["delivery_count"], 2, "the server must have delivered the job twice: {j:#}");
    assert_eq!(j["status"], "succeeded");
    assert_eq!(count_lines(&count), 1, "a job delivered twice must run once");

    // Also across a daemon's lifetime: wait until the daemon has decided
    // about the third delivery (it logs that it will not run it again).
    const AGAIN: &str = "job delivered again; it already ran here";
    let said = || std::fs::read_to_string(&s.agent.log_file).unwrap_or_default().matches(AGAIN).count();
    let said_before = said();
    s.server.admin().redeliver(&id);
    let mut d = s.w.spawn_agent(&s.agent, &["run"]);
    let j = wait_for(Duration::from_secs(60), || {
        let j = s.job(&id);
        (j["delivery_count"] == 3).then_some(j)
    });
    assert!(j.is_some(), "the daemon never picked up the redelivered job");
    assert!(
        wait_for(Duration::from_secs(60), || (said() > said_before).then_some(())).is_some(),
        "the daemon never said it would not run the redelivered job"
    );
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(d.wait_timeout(Duration::from_secs(10)).is_some());
    assert_eq!(count_lines(&count), 1, "a job delivered three times must run once");
}

/// The runner of this agent's job (`xcp-vm-agent __job STATE_DIR ...`).
fn runner_pids(a: &Agent) -> Vec<i32> {
    pids_with_marker(&format!("__job\0{}", a.state_dir.display()))
}

/// Failed before (issue 10): SIGKILL of the agent mid-job left the script
/// running on its own and the job was reported `interrupted` after the
/// restart (its real result lost); SIGTERM (any service restart) cancelled
/// the script. Now the job runs in a runner of its own: it goes on while the
/// agent is dead, the restarted agent finds it, waits for it and reports its
/// real result, once; the script ran once.
#[test]
fn agent_killed_mid_job_the_job_goes_on_and_its_real_result_is_reported_once() {
    let s = setup("killed", json!({}));
    let m = marker("killed");
    let _g = MarkerGuard(m.clone());
    let (started, done) = (s.w.path("started"), s.w.path("done"));
    let id = s.queue(
        "RunScript",
        json!({"script": format!("echo started >> '{}'\n(exec -a {m} sleep 8)\necho done >> '{}'\necho out",
                                 started.display(), done.display())}),
    );
    let mut d = s.w.spawn_agent(&s.agent, &["run"]);
    assert!(
        wait_for(Duration::from_secs(60), || (count_lines(&started) == 1).then_some(())).is_some(),
        "the job never started"
    );
    d.signal(nix::sys::signal::Signal::SIGKILL);
    assert!(d.wait_timeout(Duration::from_secs(10)).is_some());
    assert!(!pids_with_marker(&m).is_empty(), "the job died with the agent");
    assert_eq!(runner_pids(&s.agent).len(), 1, "the job's runner is not running");
    // Still running when the agent comes back: the agent waits for it.
    let mut d = s.w.spawn_agent(&s.agent, &["run"]);
    let j = s.server.admin().wait_job(&id, "final", 60);
    assert_eq!(j["status"], "succeeded", "job: {j:#}");
    assert_eq!(j["result"]["details"]["stdout"], "out\n", "job: {j:#}");
    assert_eq!((count_lines(&started), count_lines(&done)), (1, 1), "the script did not run exactly once");
    // One `running` report and one final result, nothing more.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(s.job(&id)["results_received"], 2, "{:#}", s.job(&id));
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(d.wait_timeout(Duration::from_secs(10)).is_some(), "SIGTERM did not stop the daemon");
    let running = std::fs::read_dir(s.agent.state_dir.join("running")).unwrap().count();
    assert_eq!(running, 0, "markers or lock files left in running/");
}

/// A job whose runner dies (killed with its script) is reported
/// `interrupted` after the agent's restart, and never run again.
#[test]
fn a_job_whose_runner_died_is_reported_interrupted_and_not_run_again() {
    let s = setup("runner-killed", json!({}));
    let m = marker("rkilled");
    let _g = MarkerGuard(m.clone());
    let started = s.w.path("started");
    let id = s.queue(
        "RunScript",
        json!({"script": format!("echo started >> '{}'\nexec -a {m} sleep 300", started.display())}),
    );
    let mut d = s.w.spawn_agent(&s.agent, &["run"]);
    assert!(
        wait_for(Duration::from_secs(60), || (count_lines(&started) == 1).then_some(())).is_some(),
        "the job never started"
    );
    d.signal(nix::sys::signal::Signal::SIGKILL);
    assert!(d.wait_timeout(Duration::from_secs(10)).is_some());
    let runners = runner_pids(&s.agent);
    assert_eq!(runners.len(), 1, "the job's runner is not running");
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(runners[0]), nix::sys::signal::Signal::SIGKILL);
    kill_marker(&m);
    assert!(wait_for(Duration::from_secs(10), || runner_pids(&s.agent).is_empty().then_some(())).is_some());

    let mut d = s.w.spawn_agent(&s.agent, &["run"]);
    let j = s.server.admin().wait_job(&id, "final", 60);
    assert_eq!(j["status"], "interrupted", "job: {j:#}");
    assert_eq!(count_lines(&started), 1, "an interrupted job is not run again");
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(d.wait_timeout(Duration::from_secs(10)).is_some(), "SIGTERM did not stop the daemon");
}

#[test]
fn sigterm_stops_an_idle_daemon_within_10s() {
    let s = setup("sigterm-idle", json!({"long_poll_seconds": 60}));
    let mut d = s.w.spawn_agent(&s.agent, &["run"]);
    assert!(
        wait_for(Duration::from_secs(60), || (s.server.admin().checkin_count(&s.vm) >= 1).then_some(())).is_some(),
        "the daemon never checked in"
    );
    // The server records a check-in before holding it: the daemon is now
    // waiting in a 60 s long-poll.
    let t0 = Instant::now();
    d.signal(nix::sys::signal::Signal::SIGTERM);
    let st = d.wait_timeout(Duration::from_secs(10));
    assert!(st.is_some(), "the daemon was still running 10 s after SIGTERM");
    assert!(t0.elapsed() < Duration::from_secs(10));
}

/// Failed before: SIGTERM (a service stop or restart) cancelled the running
/// script and the job was reported `interrupted`. Now the daemon stops
/// within 10 s and the job goes on; the next start reports its real result.
#[test]
fn sigterm_mid_job_stops_within_10s_and_the_job_goes_on() {
    let s = setup("sigterm-job", json!({}));
    let m = marker("term");
    let _g = MarkerGuard(m.clone());
    let started = s.w.path("started");
    let id = s.queue(
        "RunScript",
        json!({"script": format!("echo started >> '{}'\n(exec -a {m} sleep 6)\necho end", started.display())}),
    );
    let mut d = s.w.spawn_agent(&s.agent, &["run"]);
    assert!(
        wait_for(Duration::from_secs(60), || (count_lines(&started) == 1).then_some(())).is_some(),
        "the job never started"
    );
    let t0 = Instant::now();
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(d.wait_timeout(Duration::from_secs(10)).is_some(), "the daemon was still running 10 s after SIGTERM");
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert!(!pids_with_marker(&m).is_empty(), "the job was stopped with the daemon");
    // `once` finds the job still running, waits for it, reports it.
    assert_ok(&s.once(), "once after the stop");
    let j = s.job(&id);
    assert_eq!(j["status"], "succeeded", "job: {j:#}");
    assert_eq!(j["result"]["details"]["stdout"], "end\n", "job: {j:#}");
    assert_eq!(count_lines(&started), 1);
}

#[test]
fn allowlist_refusal_keeps_the_daemon_going() {
    let s = setup("allowlist", json!({"allowed_operations": ["ExtendPartition"]}));
    let mut d = s.w.spawn_agent(&s.agent, &["run"]);
    let count = s.w.path("count");
    let script = json!({"script": format!("echo run >> '{}'", count.display())});
    for n in 0..2 {
        let id = s.queue("RunScript", script.clone());
        let j = s.server.admin().wait_job(&id, "final", 60);
        assert_eq!(j["status"], "refused", "job {n}: {j:#}");
        let msg = j["result"]["message"].as_str().unwrap_or("");
        assert!(msg.contains("allowed_operations"), "the refusal should name the setting: {msg}");
        assert!(d.is_running(), "the daemon must keep running after a refusal");
    }
    assert_eq!(count_lines(&count), 0, "a refused job must not run");
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(d.wait_timeout(Duration::from_secs(10)).is_some());
}

#[test]
fn unknown_operation_is_refused() {
    let s = setup("unknown-op", json!({}));
    let id = s.queue("FormatEverything", json!({"really": true}));
    assert_ok(&s.once(), "once");
    let j = s.job(&id);
    assert_eq!(j["status"], "refused", "job: {j:#}");
    let msg = j["result"]["message"].as_str().unwrap_or("");
    assert!(msg.contains("FormatEverything"), "the refusal should name the operation: {msg}");
}

#[test]
fn parameters_of_the_wrong_type_are_refused_naming_the_field() {
    let s = setup("bad-params", json!({}));
    let cases = [
        (json!({"script": 42}), "script"),
        (json!({"script": "true", "timeout_seconds": "ten"}), "timeout_seconds"),
        (json!({"script": "true", "args": "not-a-list"}), "args"),
        (json!({"script": "true", "env": ["A=1"]}), "env"),
        (json!({}), "script"),
    ];
    let ids: Vec<(String, &str)> = cases.iter().map(|(p, f)| (s.queue("RunScript", p.clone()), *f)).collect();
    assert_ok(&s.once(), "once");
    let mut problems = Vec::new();
    for ((id, field), (params, _)) in ids.iter().zip(cases.iter()) {
        let j = s.job(id);
        let msg = j["result"]["message"].as_str().unwrap_or("").to_string();
        if j["status"] != "refused" || !msg.contains(field) {
            problems.push(format!(
                "params {params}: status {} message {msg:?} (should be refused naming {field:?})",
                j["status"]
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn malformed_job_file_names_the_file_and_position() {
    let w = World::new("jobfile", SERVER);
    let agent = w.agent("agent", "127.0.0.1:9".parse().unwrap(), json!({}));
    let f = w.path("job.json");
    std::fs::write(&f, "{\"id\": \"j1\",\n \"operation\": \"RunScript\",\n \"params\": {\"script\": }\n}").unwrap();
    let o = w.agent_cmd(&agent, &["exec", "--job", f.to_str().unwrap()], CMD_TIMEOUT);
    assert_failed_mentioning(&o, "exec of a malformed job file", &["job.json"]);
    assert!(text(&o).contains("line 3"), "the error should give the line: {}", text(&o));
}

/// The misbehaving-server tests: each bad answer makes `once` fail with a
/// message naming the problem, the result in the spool survives all of them
/// and is delivered, intact and once, when a good server answers.
#[test]
fn misbehaving_server_gives_clear_errors_and_keeps_the_spool() {
    let w = World::new("badserver", SERVER);
    let count = w.path("count");
    let job = json!({"id": "job-spooled-1", "operation": "RunScript",
                     "params": {"script": format!("echo run >> '{}'; echo spooled-output", count.display())}});
    let j2 = job.clone();
    let fake = FakeServer::start(&w.pki, move |path, _| match path {
        "/api/v1/checkin" => Reply::Json(200, json!({"jobs": [j2.clone()], "server_time": 0})),
        _ => Reply::Json(500, json!({"error": "results store on fire"})),
    });
    let agent = w.agent("agent", fake.addr, json!({}));

    // 1. The job runs; its result cannot be delivered (500).
    let o = w.agent_cmd(&agent, &["once"], CMD_TIMEOUT);
    assert_failed_mentioning(&o, "once with /results answering 500", &["500"]);
    assert_eq!(count_lines(&count), 1);

    // 2. Every kind of bad answer to the results report.
    let bad_answers: Vec<(&str, Reply, &[&str])> = vec![
        ("500", Reply::Json(500, json!({"error": "boom"})), &["500"]),
        (
            "garbage",
            Reply::Raw(b"this is not HTTP at all\r\n\r\n".to_vec()),
            &["http", "response", "invalid", "parse", "malformed"],
        ),
        ("nothing", Reply::Close, &["closed", "connection", "eof", "reset", "response"]),
        (
            "malformed JSON",
            Reply::Raw(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n{\"acknowl: ["
                    .to_vec(),
            ),
            &["json", "invalid", "parse", "malformed", "eof"],
        ),
        (
            "wrong type",
            Reply::Json(200, json!({"acknowledged": 7})),
            &["acknowledged", "invalid type", "json", "invalid"],
        ),
        ("not acknowledged", Reply::Json(200, json!({"acknowledged": []})), &["acknowledged", "spool"]),
        (
            "oversized",
            Reply::Oversized(xcp_vm_agent::protocol::MAX_BODY_BYTES + 1024),
            &["large", "limit", "size", "too big", "exceed", "bytes"],
        ),
    ];
    for (name, reply, words) in bad_answers {
        fake.set_handler(move |path, _| match path {
            "/api/v1/results" => reply.clone(),
            _ => Reply::Json(200, json!({"jobs": [], "server_time": 0})),
        });
        let o = w.agent_cmd(&agent, &["once"], CMD_TIMEOUT);
        assert_failed_mentioning(&o, &format!("once with /results answering {name}"), words);
    }

    // 3. A good server: the spooled result arrives intact, the job ran once.
    fake.set_handler(|path, body| match path {
        "/api/v1/results" => {
            let ids: Vec<Value> =
                body["results"].as_array().into_iter().flatten().map(|r| r["job_id"].clone()).collect();
            Reply::Json(200, json!({"acknowledged": ids}))
        }
        _ => Reply::Json(200, json!({"jobs": [], "server_time": 0})),
    });
    // Only what this `once` sent counts: the failed steps above sent the
    // same result to the bad servers.
    let before_good = fake.seen().len();
    assert_ok(&w.agent_cmd(&agent, &["once"], CMD_TIMEOUT), "once against a good server");
    let seen = fake.seen();
    let last = seen[before_good..]
        .iter()
        .rev()
        .find(|s| s.path == "/api/v1/results")
        .expect("no results report sent to the good server");
    let r = last.body["results"].as_array().unwrap().iter().find(|r| r["job_id"] == "job-spooled-1").cloned();
    let r = r.unwrap_or_else(|| panic!("the spooled result was not in the last report: {:#}", last.body));
    assert_eq!(r["status"], "succeeded", "{r:#}");
    assert_eq!(r["details"]["stdout"], "spooled-output\n");
    assert_eq!(count_lines(&count), 1, "the job must have run exactly once");
    // Nothing left: another once sends no results.
    let before = fake.seen().iter().filter(|s| s.path == "/api/v1/results").count();
    assert_ok(&w.agent_cmd(&agent, &["once"], CMD_TIMEOUT), "once with an empty spool");
    assert_eq!(fake.seen().iter().filter(|s| s.path == "/api/v1/results").count(), before, "the spool should be empty");

    // Every message the agent sent matches the schemas.
    let c = Checker::new(&schemas_dir());
    for s in fake.seen() {
        match s.path.as_str() {
            "/api/v1/checkin" => c.validate("checkin-request.json", &s.body).unwrap(),
            "/api/v1/results" => c.validate("results-report.json", &s.body).unwrap(),
            p => panic!("unexpected request to {p}"),
        }
    }

    // 4. Every kind of bad answer to the check-in (empty spool).
    let bad_answers: Vec<(&str, Reply, &[&str])> = vec![
        ("500", Reply::Json(500, json!({"error": "database down"})), &["500"]),
        (
            "garbage",
            Reply::Raw(b"\x16\x03garbage\r\n\r\n".to_vec()),
            &["http", "response", "invalid", "parse", "malformed"],
        ),
        ("nothing", Reply::Close, &["closed", "connection", "eof", "reset", "response"]),
        (
            "malformed JSON",
            Reply::Raw(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 9\r\n\r\n{\"jobs\": ".to_vec(),
            ),
            &["json", "invalid", "parse", "malformed", "eof"],
        ),
        ("wrong type", Reply::Json(200, json!({"jobs": "all of them"})), &["jobs", "invalid type"]),
        (
            "oversized",
            Reply::Oversized(xcp_vm_agent::protocol::MAX_BODY_BYTES + 1024),
            &["large", "limit", "size", "too big", "exceed", "bytes"],
        ),
    ];
    for (name, reply, words) in bad_answers {
        fake.set_handler(move |path, body| match path {
            "/api/v1/checkin" => reply.clone(),
            _ => {
                let ids: Vec<Value> =
                    body["results"].as_array().into_iter().flatten().map(|r| r["job_id"].clone()).collect();
                Reply::Json(200, json!({"acknowledged": ids}))
            }
        });
        let o = w.agent_cmd(&agent, &["once"], CMD_TIMEOUT);
        assert_failed_mentioning(&o, &format!("once with /checkin answering {name}"), words);
    }

    // 5. Nobody listening at all.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let agent2 = w.agent("agent-nobody", closed, json!({}));
    let o = w.agent_cmd(&agent2, &["once"], CMD_TIMEOUT);
    assert_failed_mentioning(&o, "once with nobody listening", &["connect", "refused"]);
    drop(fake);
}

/// A daemon facing a server that answers 500 keeps running (backing off) and
/// recovers when a good server comes back.
#[test]
fn daemon_survives_a_failing_server() {
    let w = World::new("daemon-500", SERVER);
    let fake = FakeServer::start(&w.pki, |_, _| Reply::Json(500, json!({"error": "down for maintenance"})));
    let agent = w.agent("agent", fake.addr, json!({}));
    let mut d = w.spawn_agent(&agent, &["run"]);
    assert!(
        wait_for(Duration::from_secs(60), || (fake.seen().len() >= 2).then_some(())).is_some(),
        "the daemon should retry after a 500"
    );
    assert!(d.is_running(), "the daemon must survive a 500");
    let n = fake.seen().len();
    fake.set_handler(|_, _| Reply::Json(200, json!({"jobs": [], "server_time": 0})));
    assert!(
        wait_for(Duration::from_secs(240), || (fake.seen().len() > n + 1).then_some(())).is_some(),
        "the daemon did not come back to a good server"
    );
    assert!(d.is_running());
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(d.wait_timeout(Duration::from_secs(10)).is_some());
}

/// With long-poll the daemon starts a job queued while it waits at once,
/// not at its next check-in interval.
#[test]
fn daemon_picks_up_a_job_at_once_through_long_poll() {
    let s = setup("pickup", json!({"long_poll_seconds": 60, "check_in_interval": 10}));
    let mut d = s.w.spawn_agent(&s.agent, &["run"]);
    let admin = s.server.admin();
    assert!(
        wait_for(Duration::from_secs(60), || (admin.checkin_count(&s.vm) >= 1).then_some(())).is_some(),
        "the daemon never checked in"
    );
    let mut latencies = Vec::new();
    let mut checkins = admin.checkin_count(&s.vm);
    for _ in 0..3 {
        // The server has a check-in it holds (it records one before holding it).
        let id = s.queue("RunScript", json!({"script": "true"}));
        let j = admin.wait_job(&id, "final", 60);
        assert_eq!(j["status"], "succeeded", "job: {j:#}");
        let lat = j["running_at_ms"].as_u64().unwrap() - j["created_at_ms"].as_u64().unwrap();
        latencies.push(lat);
        // Back in a held check-in before the next job is queued.
        checkins = wait_for(Duration::from_secs(60), || {
            let n = admin.checkin_count(&s.vm);
            (n > checkins).then_some(n)
        })
        .expect("the daemon never checked in again after a job");
    }
    // Each job is queued while a check-in is held and the interval is 10 s:
    // starting within 3 s proves the held check-in was answered when the
    // job was queued, not at the next interval.
    assert!(latencies.iter().all(|&l| l < 3000), "pickup latencies {latencies:?} ms");
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(d.wait_timeout(Duration::from_secs(10)).is_some());
}

/// GET a path from the agent's plain-HTTP status endpoint: (status, body).
fn status_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("status endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let code = raw.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, raw.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

/// The optional local status endpoint: /health follows the server's
/// reachability, /metrics speaks Prometheus text.
#[test]
fn status_endpoint_reports_health_and_metrics() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut s =
        setup("status", json!({"status_listen": addr.to_string(), "long_poll_seconds": 1, "check_in_interval": 1}));
    let mut d = s.w.spawn_agent(&s.agent, &["run"]);
    let admin = s.server.admin();
    assert!(
        wait_for(Duration::from_secs(60), || (admin.checkin_count(&s.vm) >= 1).then_some(())).is_some(),
        "the daemon never checked in"
    );
    let health = wait_for(Duration::from_secs(30), || {
        let (code, body) = status_get(addr, "/health");
        (code == 200).then_some(body)
    })
    .expect("/health never answered 200 after a successful check-in");
    let h: Value = serde_json::from_str(&health).unwrap();
    assert_eq!(h["healthy"], true, "{h}");
    assert!(h["last_successful_checkin"].as_u64().unwrap() > 0, "{h}");
    assert_eq!(h["pending_results"], 0, "{h}");
    let (code, metrics) = status_get(addr, "/metrics");
    assert_eq!(code, 200);
    assert!(metrics.contains("# TYPE xcp_vm_agent_memory_total_kb gauge"), "{metrics}");
    assert!(metrics.contains("xcp_vm_agent_load_average{window=\"1m\"}"), "{metrics}");
    assert_eq!(status_get(addr, "/nope").0, 404);
    // The check-in carried the disk inventory (the same as `inventory --json`).
    let agents = admin.agents();
    let list = agents.get("agents").cloned().unwrap_or(agents);
    let me = list.as_array().unwrap().iter().find(|a| a["vm_uuid"] == s.vm.as_str()).cloned().unwrap();
    assert!(me["inventory"]["disks"].is_array(), "no inventory in the check-in: {me:#}");
    // Server gone: /health turns 503 and says why.
    s.server.kill();
    let sick = wait_for(Duration::from_secs(60), || {
        let (code, body) = status_get(addr, "/health");
        (code == 503).then_some(body)
    })
    .expect("/health stayed healthy with the server gone");
    let h: Value = serde_json::from_str(&sick).unwrap();
    assert_eq!(h["healthy"], false);
    let err = h["last_error"].as_str().unwrap_or("");
    assert!(err.contains("127.0.0.1") && !err.contains("client certificate"), "{h}");
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(d.wait_timeout(Duration::from_secs(10)).is_some());
}

/// A fresh package install has no server_url: `run` must not exit (no
/// crash loop), must say once what to put where, and must start checking in
/// after the administrator sets it and sends SIGHUP (`systemctl reload`).
/// A later reload applies a changed allowlist without a restart.
#[test]
fn run_waits_for_a_server_url_and_applies_reloads() {
    use nix::sys::signal::Signal;
    let w = World::new("reload", SERVER);
    let server = w.start_server("server-state", &[]);
    let agent = w.agent("agent", server.api, json!({"server_url": null}));
    let vm = w.vm_uuid(&agent);
    let mut d = w.spawn_agent(&agent, &["run"]);
    let said = wait_for(Duration::from_secs(20), || {
        let log = std::fs::read_to_string(&agent.log_file).unwrap_or_default();
        log.contains("no server_url configured").then_some(log)
    })
    .expect("the daemon never said that server_url is missing");
    assert!(said.contains(&agent.config.display().to_string()), "the message must name the file: {said}");
    // Not saying it again is an absence: give a looping daemon 2 s to
    // repeat itself, then read the log afresh.
    std::thread::sleep(Duration::from_secs(2));
    assert!(d.is_running(), "without server_url the daemon must wait, not exit");
    let log = std::fs::read_to_string(&agent.log_file).unwrap();
    assert_eq!(log.matches("no server_url configured").count(), 1, "said more than once: {log}");

    // The administrator sets the server and reloads.
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(&agent.config).unwrap()).unwrap();
    cfg["server_url"] = json!(format!("https://{}", server.api));
    std::fs::write(&agent.config, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    d.signal(Signal::SIGHUP);
    let admin = server.admin();
    assert!(
        wait_for(Duration::from_secs(30), || (admin.checkin_count(&vm) >= 1).then_some(())).is_some(),
        "no check-in after server_url was set and SIGHUP sent"
    );
    let id = admin.queue(&vm, "RunScript", json!({"script": "echo before-reload"}));
    assert_eq!(admin.wait_job(&id, "final", 60)["status"], "succeeded");

    // Reload with RunScript taken off the allowlist: same process, new rules.
    cfg["allowed_operations"] = json!(["ExtendPartition"]);
    std::fs::write(&agent.config, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    d.signal(Signal::SIGHUP);
    assert!(
        wait_for(Duration::from_secs(30), || {
            std::fs::read_to_string(&agent.log_file)
                .unwrap_or_default()
                .contains("configuration reloaded")
                .then_some(())
        })
        .is_some(),
        "the daemon did not report the reload"
    );
    let id = admin.queue(&vm, "RunScript", json!({"script": "echo after-reload"}));
    let j = admin.wait_job(&id, "final", 60);
    assert_eq!(j["status"], "refused", "job: {j:#}");
    assert!(d.is_running());
    d.signal(Signal::SIGTERM);
    assert!(d.wait_timeout(Duration::from_secs(10)).is_some());
}

/// `metrics --json` prints the seed agent's types: `load_average` one
/// number (the 1-minute load), `uptime_seconds` an integer, and the 5- and
/// 15-minute loads under their own names; the check-in schema accepts it.
#[test]
fn metrics_json_has_the_seed_types() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.json");
    std::fs::write(&cfg, format!("{{\"state_dir\": {:?}}}\n", dir.path().join("state"))).unwrap();
    let out = std::process::Command::new(vm_tests::harness::agent_bin())
        .arg("--config")
        .arg(&cfg)
        .args(["metrics", "--json"])
        .output()
        .unwrap();
    assert_ok(&out, "metrics --json");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let m = &v["metrics"];
    assert!(m["load_average"].is_f64(), "{m:#}");
    assert!(m["uptime_seconds"].is_u64() && m["uptime_seconds"].as_u64().unwrap() > 0, "{m:#}");
    assert!(m["load_average_5m"].is_f64() && m["load_average_15m"].is_f64(), "{m:#}");
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap();
    let one: f64 = loadavg.split_whitespace().next().unwrap().parse().unwrap();
    assert!((m["load_average"].as_f64().unwrap() - one).abs() < 2.0, "{m:#} vs /proc/loadavg {loadavg}");
    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string(schemas_dir().join("checkin-request.json")).unwrap()).unwrap();
    let def = &schema["$defs"]["metrics"];
    for k in def["required"].as_array().unwrap() {
        assert!(!m[k.as_str().unwrap()].is_null(), "{k} missing from metrics --json: {m:#}");
    }
}
