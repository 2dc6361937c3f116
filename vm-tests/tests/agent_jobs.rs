//! Jobs, results and state under stress (issue 10, job half): the real
//! `xcp-vm-agent` binary against the real `mgmt-server` (or the fake HTTPS
//! responder where the server cannot be made to send what a test needs, such
//! as job ids of 150 bytes or with a newline), over real TLS; a real tmpfs
//! that is full; real scripts whose children escape with `setsid`.
//!
//! Each test names the defect it caught on the code before its fix.
use serde_json::{json, Value};
use std::process::Output;
use std::time::{Duration, Instant};
use vm_tests::harness::{kill_marker, marker, pids_with_marker, wait_for, Agent, FakeServer, Reply, ServerProc, World};

const SERVER: &str = env!("CARGO_BIN_EXE_mgmt-server");
const CMD_TIMEOUT: Duration = Duration::from_secs(120);

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

fn count_lines(p: &std::path::Path) -> usize {
    std::fs::read_to_string(p).map(|s| s.lines().count()).unwrap_or(0)
}

fn spool_files(a: &Agent) -> usize {
    std::fs::read_dir(a.state_dir.join("spool"))
        .map(|rd| rd.flatten().filter(|e| !e.file_name().to_string_lossy().starts_with('.')).count())
        .unwrap_or(0)
}

/// Kills leftover processes carrying a marker when the test ends, pass or fail.
struct MarkerGuard(String);
impl Drop for MarkerGuard {
    fn drop(&mut self) {
        kill_marker(&self.0);
    }
}

/// Failed before: six results of binary output made one results request
/// over the server's 4 MiB cap; the server answered 413, the agent sent the
/// same batch first on every cycle and never checked in again (the seventh
/// job never ran).
#[test]
fn binary_output_of_many_jobs_gets_through_and_checkins_go_on() {
    let s = setup("bigresults", json!({}));
    let ids: Vec<String> = (0..6)
        .map(|i| {
            // Control bytes: JSON writes each as \u0001, six bytes; 64 KiB
            // kept of each stream make about 800 KB of JSON per result.
            s.queue(
                "RunScript",
                json!({"script": format!("echo job{i}; head -c 200000 /dev/zero | tr '\\0' '\\1'; head -c 200000 /dev/zero | tr '\\0' '\\1' >&2")}),
            )
        })
        .collect();
    let o = s.once();
    assert!(o.status.success(), "once failed: {}", String::from_utf8_lossy(&o.stderr));
    for id in &ids {
        let j = s.job(id);
        assert_eq!(j["status"], "succeeded", "{id}: {j:#}");
        let size = serde_json::to_vec(&j["result"]).unwrap().len();
        assert!(size <= 256 * 1024, "a result of {size} bytes is over the per-result bound");
        assert!(j["result"]["details"]["stdout"].as_str().unwrap().starts_with("job"), "{j:#}");
        assert_eq!(j["result"]["details"]["stdout_bytes"], 200005, "{j:#}");
    }
    assert_eq!(spool_files(&s.agent), 0);
    let seventh = s.queue("RunScript", json!({"script": "echo seventh"}));
    assert!(s.once().status.success());
    assert_eq!(s.job(&seventh)["result"]["details"]["stdout"], "seventh\n");
}

/// Failed before: a spooled result the server refuses for good (413: over
/// its body cap, as an older agent could spool) stayed first in line for
/// ever; `once` failed and never checked in, the spool never drained.
#[test]
fn a_result_the_server_refuses_for_good_is_replaced_by_a_note_and_the_spool_drains() {
    let s = setup("refused", json!({}));
    // The state directory exists after one check-in.
    assert!(s.once().status.success());
    let id = s.queue("RunScript", json!({"script": "echo never-run-here"}));
    // Its result is already spooled (an older agent made it): 5 MiB.
    let big = json!({
        "job_id": id, "operation": "RunScript", "status": "succeeded", "message": "script exited with 0",
        "details": {"stdout": "x".repeat(5 << 20)}, "started_at": 1, "finished_at": 2, "duration_ms": 1000,
    });
    std::fs::write(s.agent.state_dir.join("spool").join(format!("{id}.json")), serde_json::to_vec(&big).unwrap())
        .unwrap();
    // Mark it seen so the job is not run (its result exists).
    std::fs::write(s.agent.state_dir.join("seen-jobs"), format!("{}\n", serde_json::to_string(&id).unwrap())).unwrap();
    let other = s.queue("RunScript", json!({"script": "echo other"}));
    let o = s.once();
    assert!(o.status.success(), "once failed: {}", String::from_utf8_lossy(&o.stderr));
    let j = s.job(&id);
    assert_eq!(j["status"], "failed", "{j:#}");
    let msg = j["result"]["message"].as_str().unwrap();
    assert!(msg.contains("refused this job's result for good") && msg.contains("413"), "{msg}");
    assert_eq!(j["result"]["details"]["original_status"], "succeeded");
    assert_eq!(spool_files(&s.agent), 0, "the spool must drain");
    assert_eq!(s.job(&other)["result"]["details"]["stdout"], "other\n", "check-in must go on");
}

/// A fake server that hands out `jobs` on every check-in and acknowledges
/// every result.
fn fake_with_jobs(w: &World, jobs: Value) -> FakeServer {
    FakeServer::start(&w.pki, move |path, body| match path {
        "/api/v1/checkin" => Reply::Json(200, json!({"jobs": jobs.clone(), "server_time": 0})),
        _ => {
            let ids: Vec<Value> =
                body["results"].as_array().into_iter().flatten().map(|r| r["job_id"].clone()).collect();
            Reply::Json(200, json!({"acknowledged": ids}))
        }
    })
}

fn final_results(fake: &FakeServer) -> Vec<Value> {
    fake.seen()
        .iter()
        .filter(|s| s.path == "/api/v1/results")
        .flat_map(|s| s.body["results"].as_array().cloned().unwrap_or_default())
        .filter(|r| r["status"] != "running")
        .collect()
}

/// Failed before: spool names were the hex of an id's first 100 bytes, so
/// two 150-byte ids with a common prefix shared one spool file and one
/// result overwrote the other before delivery.
#[test]
fn long_ids_sharing_a_prefix_both_get_their_results() {
    let w = World::new("longids", SERVER);
    let prefix = "j".repeat(140);
    let jobs = json!([
        {"id": format!("{prefix}-one"), "operation": "RunScript", "params": {"script": "echo one"}},
        {"id": format!("{prefix}-two"), "operation": "RunScript", "params": {"script": "echo two"}},
    ]);
    let fake = fake_with_jobs(&w, jobs);
    let agent = w.agent("agent", fake.addr, json!({}));
    assert!(w.agent_cmd(&agent, &["once"], CMD_TIMEOUT).status.success());
    let mut got: Vec<(String, String)> = final_results(&fake)
        .iter()
        .map(|r| (r["job_id"].as_str().unwrap().to_string(), r["details"]["stdout"].as_str().unwrap().to_string()))
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![(format!("{prefix}-one"), "one\n".to_string()), (format!("{prefix}-two"), "two\n".to_string())]
    );
}

/// Failed before: `seen-jobs` stored a newline in an id as a space, so after
/// a restart a redelivered job whose id holds a newline ran again.
#[test]
fn a_job_id_with_a_newline_never_runs_twice() {
    let w = World::new("newlineid", SERVER);
    let count = w.path("count");
    let jobs = json!([{"id": "first line\nsecond line", "operation": "RunScript",
                       "params": {"script": format!("echo run >> '{}'", count.display())}}]);
    let fake = fake_with_jobs(&w, jobs);
    let agent = w.agent("agent", fake.addr, json!({}));
    for _ in 0..3 {
        // A new process each time: the id comes back from seen-jobs.
        assert!(w.agent_cmd(&agent, &["once"], CMD_TIMEOUT).status.success());
    }
    assert_eq!(count_lines(&count), 1, "the job ran more than once");
    let finals = final_results(&fake);
    assert_eq!(finals.len(), 1, "{finals:#?}");
    assert_eq!(finals[0]["job_id"], "first line\nsecond line");
}

struct Unmount(std::path::PathBuf);
impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Fill the filesystem holding `dir` until writing fails.
fn fill(dir: &std::path::Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(dir.join("filler")).unwrap();
    let block = vec![0xa5u8; 64 * 1024];
    while f.write_all(&block).is_ok() {}
    let mut n = 0;
    // Small files for the last blocks and inodes.
    while std::fs::write(dir.join(format!("f{n}")), [1u8; 512]).is_ok() && n < 100_000 {
        n += 1;
    }
}

/// Failed before: with the state directory on a full filesystem the agent
/// could not record a job's start; it logged the error every cycle, never
/// answered the job (the server showed it delivered for ever) and stopped
/// checking in. Now the job is answered `failed`, naming the state directory
/// and the errno, without running; check-ins go on; the agent also starts
/// with the disk already full, and runs jobs again once there is space.
#[test]
#[ignore = "root tier: needs root for mounts (cargo xtask test runs it with --ignored)"]
fn full_state_disk_answers_failed_without_running_and_keeps_checking_in() {
    vm_tests::tier::require_root();
    let w = World::new("fulldisk", SERVER);
    let server = w.start_server("server-state", &[]);
    let mnt = w.path("small");
    std::fs::create_dir_all(&mnt).unwrap();
    nix::mount::mount(Some("tmpfs"), &mnt, Some("tmpfs"), nix::mount::MsFlags::empty(), Some("size=1m,nr_inodes=64"))
        .expect("mount a tmpfs");
    let _u = Unmount(mnt.clone());
    let state = mnt.join("state");
    let agent = w.agent("agent", server.api, json!({"state_dir": state}));
    let vm = w.vm_uuid(&agent);
    let admin = server.admin();
    // A first life creates the state directory; then the disk fills up.
    assert!(w.agent_cmd(&agent, &["once"], CMD_TIMEOUT).status.success());
    fill(&mnt);
    let ran = w.path("ran");
    let id = admin.queue(&vm, "RunScript", json!({"script": format!("echo run >> '{}'", ran.display())}));
    // The daemon starts on the full disk.
    let mut d = w.spawn_agent(&agent, &["run"]);
    let j = admin.wait_job(&id, "final", 60);
    assert_eq!(j["status"], "failed", "{j:#}");
    let msg = j["result"]["message"].as_str().unwrap();
    assert!(msg.contains(&state.display().to_string()), "the message must name the state directory: {msg}");
    assert!(msg.contains("ENOSPC") || msg.contains("EDQUOT"), "the message must name the errno: {msg}");
    assert!(msg.contains("not run"), "{msg}");
    assert_eq!(count_lines(&ran), 0, "a job that cannot be recorded must not run");
    // It keeps checking in.
    let n = admin.checkin_count(&vm);
    assert!(
        wait_for(Duration::from_secs(30), || (admin.checkin_count(&vm) >= n + 2).then_some(())).is_some(),
        "the daemon stopped checking in on a full disk"
    );
    assert!(d.is_running());
    // Space again: jobs run.
    std::fs::remove_file(mnt.join("filler")).unwrap();
    let id2 = admin.queue(&vm, "RunScript", json!({"script": format!("echo run >> '{}'", ran.display())}));
    let j = admin.wait_job(&id2, "final", 60);
    assert_eq!(j["status"], "succeeded", "{j:#}");
    assert_eq!(count_lines(&ran), 1);
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(d.wait_timeout(Duration::from_secs(10)).is_some());
}

/// Failed before: a script that leaves `setsid sleep &` (or `nohup server &`)
/// behind kept the job running after bash exited: the agent's readers waited
/// for the pipes the escaped child held, and the daemon took no other job.
#[test]
fn a_daemonised_child_does_not_wedge_the_agent() {
    let s = setup("escape", json!({}));
    let m = marker("escape");
    let _g = MarkerGuard(m.clone());
    let id = s.queue(
        "RunScript",
        json!({"script": format!("setsid bash -c 'exec -a {m} sleep 1000' &\nnohup bash -c 'exec -a {m} sleep 1000' &\necho started"),
               "timeout_seconds": 3600}),
    );
    let mut d = s.w.spawn_agent(&s.agent, &["run"]);
    let t0 = Instant::now();
    let j = s.server.admin().wait_job(&id, "final", 60);
    assert_eq!(j["status"], "succeeded", "{j:#}");
    assert!(t0.elapsed() < Duration::from_secs(30), "the job took {:?}", t0.elapsed());
    assert_eq!(j["result"]["details"]["stdout"], "started\n");
    assert_eq!(j["result"]["details"]["processes_killed"], 2, "{j:#}");
    assert!(pids_with_marker(&m).is_empty(), "processes left: {:?}", pids_with_marker(&m));
    // The daemon takes the next job.
    let next = s.queue("RunScript", json!({"script": "echo next"}));
    let j = s.server.admin().wait_job(&next, "final", 60);
    assert_eq!(j["result"]["details"]["stdout"], "next\n");
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(d.wait_timeout(Duration::from_secs(10)).is_some());
}

/// Failed before: on timeout only bash's process group was signalled; a
/// child that had called `setsid` lived on and held the job's pipes, so the
/// job never ended. Now every process the script started is killed and the
/// result says how many.
#[test]
fn timeout_kills_setsid_children_and_says_how_many() {
    let s = setup("timeout-setsid", json!({}));
    let m = marker("tsetsid");
    let _g = MarkerGuard(m.clone());
    let id = s.queue(
        "RunScript",
        json!({"script": format!("setsid bash -c 'exec -a {m} sleep 1000' &\n(bash -c 'exec -a {m} sleep 1000' &)\nexec -a {m} sleep 1000"),
               "timeout_seconds": 2}),
    );
    let t0 = Instant::now();
    let o = s.once();
    assert!(o.status.success(), "once failed: {}", String::from_utf8_lossy(&o.stderr));
    assert!(t0.elapsed() < Duration::from_secs(40), "took {:?}", t0.elapsed());
    let j = s.job(&id);
    assert_eq!(j["status"], "failed", "{j:#}");
    assert_eq!(j["result"]["details"]["timed_out"], true);
    assert_eq!(j["result"]["details"]["processes_killed"], 3, "{j:#}");
    assert!(j["result"]["message"].as_str().unwrap().contains("3 process(es)"), "{j:#}");
    assert!(pids_with_marker(&m).is_empty(), "processes left: {:?}", pids_with_marker(&m));
}

/// Failed before: `postrm purge` ran `rm -rf /var/lib/xcp-vm-agent`, which
/// descended into a mount left under it and deleted the mounted files. Now
/// the mount is unmounted first and the deletion stays on one filesystem.
/// The real maintainer script, run as dpkg runs it with `DPKG_ROOT`.
#[test]
#[ignore = "root tier: needs root for mounts (cargo xtask test runs it with --ignored)"]
fn purge_unmounts_what_is_left_under_the_state_dir_and_deletes_nothing_beyond() {
    vm_tests::tier::require_root();
    let w = World::new("purge", SERVER);
    let root = w.path("root");
    let state = root.join("var/lib/xcp-vm-agent");
    let mnt = state.join("scripts/tmp mount");
    std::fs::create_dir_all(&mnt).unwrap();
    std::fs::write(state.join("seen-jobs"), "a\n").unwrap();
    let precious = w.path("precious");
    std::fs::create_dir_all(&precious).unwrap();
    std::fs::write(precious.join("data"), "keep me").unwrap();
    nix::mount::mount(Some(&precious), &mnt, None::<&str>, nix::mount::MsFlags::MS_BIND, None::<&str>)
        .expect("bind mount");
    let _u = Unmount(mnt.clone());
    let script = vm_tests::harness::workspace_root().join("packaging/deb/scripts/postrm");
    let o = w.run_cmd(
        std::process::Command::new("sh").arg(&script).arg("purge").env("DPKG_ROOT", &root),
        Duration::from_secs(60),
    );
    assert!(o.status.success(), "postrm purge failed");
    assert_eq!(std::fs::read_to_string(precious.join("data")).unwrap(), "keep me", "purge deleted a mounted file");
    assert!(!state.exists(), "the state directory must be gone");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&root.display().to_string()), "a mount is left under the purged root");

    // The same through uninstall.sh --root (offline.sh), for a system image.
    std::fs::create_dir_all(&mnt).unwrap();
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/os-release"), "ID=debian\nPRETTY_NAME=\"test root\"\n").unwrap();
    nix::mount::mount(Some(&precious), &mnt, None::<&str>, nix::mount::MsFlags::MS_BIND, None::<&str>)
        .expect("bind mount");
    let script = vm_tests::harness::workspace_root().join("packaging/common/uninstall.sh");
    let o = w.run_cmd(std::process::Command::new("sh").arg(&script).arg("--root").arg(&root), Duration::from_secs(60));
    assert!(o.status.success(), "uninstall.sh --root failed");
    assert_eq!(std::fs::read_to_string(precious.join("data")).unwrap(), "keep me", "uninstall deleted a mounted file");
    assert!(!state.exists(), "the state directory must be gone");
}

/// Failed before: a results endpoint that keeps failing (500) made every
/// cycle an error, so the daemon backed off its check-ins (1 s, 2 s, 4 s ...
/// up to 5 min) although the server took them: jobs waited minutes. Now the
/// check-in pace stays `check_in_interval` and delivery is retried each cycle.
#[test]
fn failing_result_delivery_does_not_slow_check_ins() {
    let w = World::new("slowresults", SERVER);
    let fake = FakeServer::start(&w.pki, |path, _| match path {
        "/api/v1/checkin" => Reply::Json(
            200,
            json!({"jobs": [{"id": "j1", "operation": "RunScript", "params": {"script": "echo hi"}}], "server_time": 0}),
        ),
        _ => Reply::Json(500, json!({"error": "result store on fire"})),
    });
    let agent = w.agent("agent", fake.addr, json!({"check_in_interval": 1}));
    let checkins = |f: &FakeServer| f.seen().iter().filter(|s| s.path == "/api/v1/checkin").count();
    let mut d = w.spawn_agent(&agent, &["run"]);
    assert!(
        wait_for(Duration::from_secs(60), || fake.seen().iter().any(|s| s.path == "/api/v1/results").then_some(()))
            .is_some(),
        "no results request"
    );
    let before = checkins(&fake);
    std::thread::sleep(Duration::from_secs(20));
    let n = checkins(&fake) - before;
    assert!(n >= 10, "only {n} check-ins in 20 s with check_in_interval 1 while results fail");
    assert!(d.is_running());
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(d.wait_timeout(Duration::from_secs(10)).is_some());
}

/// Failed before: a results endpoint answering 404 to everything (a wrong
/// `server_url` prefix, an ingress default backend) made the agent replace
/// each spooled result by a "refused" note and, the note refused too, delete
/// it: one `once` emptied the spool. A refusal of the whole endpoint proves
/// nothing about one result: the original stays until a note is accepted.
#[test]
fn an_endpoint_refusing_everything_never_loses_a_spooled_result() {
    let w = World::new("all404", SERVER);
    let fake = FakeServer::start(&w.pki, |_, _| Reply::Json(404, json!({"error": "no such path"})));
    let agent = w.agent("agent", fake.addr, json!({}));
    let spool = agent.state_dir.join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    let r = json!({"job_id": "j1", "operation": "RunScript", "status": "succeeded", "message": "script exited with 0",
                   "details": {"stdout": "precious\n"}, "started_at": 1, "finished_at": 2, "duration_ms": 1000});
    let text = serde_json::to_vec(&r).unwrap();
    std::fs::write(spool.join("j1.json"), &text).unwrap();
    for _ in 0..2 {
        let o = w.agent_cmd(&agent, &["once"], CMD_TIMEOUT);
        assert!(!o.status.success(), "once must fail: nothing was delivered");
    }
    assert!(fake.seen().iter().any(|s| s.path == "/api/v1/results"), "no results request");
    assert_eq!(std::fs::read(spool.join("j1.json")).ok(), Some(text), "the spooled result was dropped or changed");
}

/// Zombie children of `pid` (state Z, parent `pid`).
fn zombies_of(pid: i32) -> Vec<i32> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else { continue };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() > 1 && f[0] == "Z" && f[1] == pid.to_string() {
            v.push(p);
        }
    }
    v
}

/// Failed before: an orphan of a script that came back to the agent (the
/// subreaper) and exited by itself was never reaped: each `(sleep 1 &)` left
/// a zombie of the daemon for ever (counting against the unit's TasksMax).
#[test]
fn orphans_that_exit_by_themselves_are_reaped() {
    let w = World::new("zombies", SERVER);
    let given = std::sync::atomic::AtomicBool::new(false);
    let fake = FakeServer::start(&w.pki, move |path, body| match path {
        "/api/v1/checkin" => {
            // The job on the first check-in only, so the daemon idles after.
            let jobs = if given.swap(true, std::sync::atomic::Ordering::SeqCst) {
                json!([])
            } else {
                json!([{"id": "z1", "operation": "RunScript",
                        "params": {"script": "(sleep 1 >/dev/null 2>&1 &); (sleep 1 &); echo done"}}])
            };
            Reply::Json(200, json!({"jobs": jobs, "server_time": 0}))
        }
        _ => {
            let ids: Vec<Value> =
                body["results"].as_array().into_iter().flatten().map(|r| r["job_id"].clone()).collect();
            Reply::Json(200, json!({"acknowledged": ids}))
        }
    });
    let agent = w.agent("agent", fake.addr, json!({"check_in_interval": 1}));
    let mut d = w.spawn_agent(&agent, &["run"]);
    assert!(
        wait_for(Duration::from_secs(60), || (!final_results(&fake).is_empty()).then_some(())).is_some(),
        "no result"
    );
    assert_eq!(final_results(&fake)[0]["details"]["stdout"], "done\n");
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(zombies_of(d.pid()), Vec::<i32>::new(), "zombie children of the agent");
    assert!(d.is_running());
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(d.wait_timeout(Duration::from_secs(10)).is_some());
}

/// Failed before: when the spool could not take a result (the disk full),
/// the result was delivered from memory but the job's running marker stayed,
/// so the next start reported the same job `interrupted` (a second result
/// contradicting the first); the failed write also left its partial
/// temporary file, holding space the full disk lacked.
#[test]
#[ignore = "root tier: needs root for mounts (cargo xtask test runs it with --ignored)"]
fn a_result_delivered_from_memory_is_not_reported_interrupted_after_restart() {
    vm_tests::tier::require_root();
    let w = World::new("fullfinish", SERVER);
    let mnt = w.path("small");
    std::fs::create_dir_all(&mnt).unwrap();
    nix::mount::mount(Some("tmpfs"), &mnt, Some("tmpfs"), nix::mount::MsFlags::empty(), Some("size=1m,nr_inodes=64"))
        .expect("mount a tmpfs");
    let _u = Unmount(mnt.clone());
    let state = mnt.join("state");
    // The script fills the disk the state directory is on, so its result
    // (40 KB: more than the page its script file frees) cannot be spooled.
    let script =
        format!("head -c 4M /dev/zero > '{}/filler'; head -c 30000 /dev/zero | base64 -w0; echo hi", mnt.display());
    let jobs = json!([{"id": "f1", "operation": "RunScript", "params": {"script": script}}]);
    let fake = fake_with_jobs(&w, jobs);
    let agent = w.agent("agent", fake.addr, json!({"state_dir": state}));
    let o = w.agent_cmd(&agent, &["once"], CMD_TIMEOUT);
    assert!(o.status.success(), "once failed: {}", String::from_utf8_lossy(&o.stderr));
    assert!(mnt.join("filler").exists(), "the script did not run");
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(log.contains("delivering it from memory"), "the result was spooled after all: {log}");
    let tmp: Vec<_> = ["spool", "running"]
        .iter()
        .flat_map(|d| std::fs::read_dir(state.join(d)).unwrap().flatten())
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(tmp.is_empty(), "temporary files left: {tmp:?}");
    // Space again; the agent starts anew.
    std::fs::remove_file(mnt.join("filler")).unwrap();
    let o = w.agent_cmd(&agent, &["once"], CMD_TIMEOUT);
    assert!(o.status.success(), "once failed: {}", String::from_utf8_lossy(&o.stderr));
    let finals: Vec<Value> = final_results(&fake).into_iter().filter(|r| r["job_id"] == "f1").collect();
    assert_eq!(finals.len(), 1, "more than one final result: {finals:#?}");
    assert_eq!(finals[0]["status"], "succeeded", "{finals:#?}");
    assert!(finals[0]["details"]["stdout"].as_str().unwrap().ends_with("hi\n"), "{finals:#?}");
}
