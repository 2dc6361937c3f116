//! Guest control through the real agent binary: FreezeFilesystems and
//! ThawFilesystems on real loop devices (root tier: `#[ignore]`d in the plain
//! tier, run as root with `--ignored`, as `disk.rs`), TrimFilesystems and the filesystem report, and Reboot /
//! Shutdown exactly once with the real mgmt-server, the init system's
//! command replaced by `XCP_AGENT_POWER_HOOK` at the very last step (the
//! real reboot is a VM scenario).
//!
//! Safety: every freeze here names its mount point (the default, every
//! local filesystem, would freeze this machine), and the power hook is set
//! for the whole process before any agent starts.
#[path = "disk/util.rs"]
#[allow(unused_imports, reason = "disk.rs's helpers: this tier uses only some of them")]
mod util;

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use util::{sh, Loop};
use vm_tests::harness::{wait_for, World};

const SERVER: &str = env!("CARGO_BIN_EXE_mgmt-server");

/// Per-process environment every agent started here inherits: its own run
/// directory (the freeze record) and the power hook.
fn test_env() -> &'static (PathBuf, PathBuf) {
    static E: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    E.get_or_init(|| {
        let d = tempfile::Builder::new().prefix("xcp-guest-").tempdir().unwrap().keep();
        let run = d.join("run");
        std::fs::create_dir_all(&run).unwrap();
        let hook = d.join("power-hook");
        // Records its arguments, then waits until the test releases it (so
        // the test can look at the server while "the init system is asked").
        std::fs::write(
            &hook,
            format!(
                "#!/bin/sh\necho \"$*\" >> {d}/power-calls\nwhile [ ! -e {d}/power-release ]; do sleep 0.05; done\n",
                d = d.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        std::fs::write(d.join("power-release"), "").unwrap();
        // SAFETY (edition 2021: safe fn): set once, before any agent starts.
        std::env::set_var("XCP_AGENT_RUN_DIR", &run);
        std::env::set_var("XCP_AGENT_POWER_HOOK", &hook);
        (run, d)
    })
}

fn ext4_loop() -> (Loop, PathBuf) {
    let l = Loop::new(64, 512);
    sh("mkfs.ext4", &["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", &l.dev]);
    let mp = l.mount(&l.dev, "mnt");
    (l, std::fs::canonicalize(mp).unwrap())
}

/// A process writing (and fsyncing) a file on `mp`: blocks while frozen.
fn writer(mp: &Path, name: &str) -> Child {
    Command::new("dd")
        .args(["if=/dev/zero", &format!("of={}", mp.join(name).display()), "bs=4096", "count=4", "conv=fsync"])
        .args(["status=none"])
        .spawn()
        .unwrap()
}

fn finished_within(c: &mut Child, d: Duration) -> Option<Instant> {
    wait_for(d, || c.try_wait().unwrap().map(|st| (st, Instant::now()))).map(|(st, t)| {
        assert!(st.success(), "the writer failed: {st}");
        t
    })
}

fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

fn record_exists() -> bool {
    test_env().0.join("freeze.json").exists()
}

#[test]
#[ignore = "root tier: needs root and loop devices (cargo xtask test runs it with --ignored)"]
fn freeze_deadline_thaws_after_the_agent_is_sigkilled_with_its_state_dir_on_the_frozen_fs() {
    test_env();
    let (_l, mp) = ext4_loop();
    let w = World::new("freeze-deadline", SERVER);
    let server = w.start_server("server-state", &[]);
    // State directory and log file on the filesystem to be frozen.
    let agent = w.agent("agent", server.api, json!({"state_dir": mp.join("state"), "log_file": mp.join("agent.log")}));
    let vm = w.vm_uuid(&agent);
    let admin = server.admin();
    let mut d = w.spawn_agent(&agent, &["run"]);
    assert!(wait_for(Duration::from_secs(60), || (admin.checkin_count(&vm) >= 1).then_some(())).is_some());

    let id = admin.queue(&vm, "FreezeFilesystems", json!({"mount_points": [mp], "thaw_after_seconds": 8}));
    let j = admin.wait_job(&id, "final", 30);
    assert_eq!(j["status"], "succeeded", "{j:#}");
    let r = admin.results(&id);
    let text = r.to_string();
    assert!(text.contains(mp.to_str().unwrap()), "the result names the frozen mount point: {r:#}");
    let thaw_at = now_unix() + 8;

    let mut wr = writer(&mp, "blocked");
    std::thread::sleep(Duration::from_secs(1));
    assert!(wr.try_wait().unwrap().is_none(), "a write went through while frozen");

    // The agent is not stuck on its frozen state dir: it still answers.
    let id2 = admin.queue(&vm, "RunScript", json!({"script": "true"}));
    let j2 = admin.wait_job(&id2, "final", 20);
    assert_eq!(j2["status"], "refused", "{j2:#}");
    let id3 = admin.queue(&vm, "FreezeFilesystems", json!({"mount_points": [mp], "thaw_after_seconds": 5}));
    let j3 = admin.wait_job(&id3, "final", 20);
    assert_eq!(j3["status"], "no_change", "a freeze in force is answered with what is frozen: {j3:#}");
    assert!(admin.results(&id3).to_string().contains("until"), "{:#}", admin.results(&id3));

    d.signal(nix::sys::signal::Signal::SIGKILL);
    assert!(d.wait_timeout(Duration::from_secs(10)).is_some(), "SIGKILL did not stop the agent");
    assert!(now_unix() + 1 < thaw_at, "test too slow: the deadline passed before the agent was killed");
    assert!(wr.try_wait().unwrap().is_none(), "the write went through before the deadline");
    let t =
        finished_within(&mut wr, Duration::from_secs(20)).expect("the filesystem never thawed after the agent died");
    let _ = t;
    assert!(now_unix() + 1 >= thaw_at, "thawed before the deadline ({} < {thaw_at})", now_unix());
    assert!(now_unix() <= thaw_at + 3, "thawed late ({} > {thaw_at} + 3)", now_unix());

    // A restarted agent carries on; the server keeps the first results.
    let n = admin.checkin_count(&vm);
    let _d2 = w.spawn_agent(&agent, &["run"]);
    assert!(wait_for(Duration::from_secs(60), || (admin.checkin_count(&vm) >= n + 2).then_some(())).is_some());
    assert_eq!(admin.job(&id)["status"], "succeeded");
    assert!(!record_exists(), "the freeze record outlived the guard");
}

#[test]
#[ignore = "root tier: needs root and loop devices (cargo xtask test runs it with --ignored)"]
fn freeze_then_thaw_releases_at_once_and_the_report_shows_it() {
    test_env();
    let (_l, mp) = ext4_loop();
    let a = util::Agent::new();
    let o = a.exec("FreezeFilesystems", json!({"mount_points": [mp], "thaw_after_seconds": 120}));
    o.expect("succeeded");
    assert_eq!(o.result["details"]["frozen"][0]["mount_point"].as_str(), Some(mp.to_str().unwrap()), "{o}");
    assert!(record_exists());

    let inv = Command::new(util::agent_bin()).arg("--config").arg(&a.config).args(["inventory", "--json"]).output();
    let inv: Value = serde_json::from_slice(&inv.unwrap().stdout).expect("inventory --json");
    let fs = inv["filesystems"].as_array().expect("filesystems in the inventory").clone();
    let e = fs.iter().find(|f| f["mount_point"] == mp.to_str().unwrap()).unwrap_or_else(|| panic!("{inv:#}"));
    assert_eq!(e["frozen"], true, "{e}");
    assert_eq!(e["type"], "ext4");
    let uuid = sh("blkid", &["-p", "-s", "UUID", "-o", "value", &_l.dev]).trim().to_string();
    assert_eq!(e["uuid"], uuid.as_str(), "{e}");
    assert!(e["size_bytes"].as_u64().unwrap() > 50 << 20 && e["free_bytes"].as_u64().unwrap() > 0, "{e}");

    let mut wr = writer(&mp, "blocked");
    std::thread::sleep(Duration::from_millis(700));
    assert!(wr.try_wait().unwrap().is_none(), "a write went through while frozen");
    let t0 = Instant::now();
    let o = a.exec("ThawFilesystems", json!({}));
    o.expect("succeeded");
    finished_within(&mut wr, Duration::from_secs(3)).expect("ThawFilesystems did not release the write");
    assert!(t0.elapsed() < Duration::from_secs(3));
    assert!(!record_exists());
    a.exec("ThawFilesystems", json!({})).expect("no_change");
    a.exec("ThawFilesystems", json!({"mount_points": [mp]})).expect("no_change");
}

#[test]
#[ignore = "root tier: needs root and loop devices (cargo xtask test runs it with --ignored)"]
fn bad_freeze_inputs_are_refused_with_the_disk_untouched() {
    let (run, _) = test_env();
    let (l, mp) = ext4_loop();
    std::fs::create_dir_all(mp.join("sub")).unwrap();
    let tmpfs = l.dir.path().join("tmpfs");
    std::fs::create_dir_all(&tmpfs).unwrap();
    sh("mount", &["-t", "tmpfs", "tmpfs", tmpfs.to_str().unwrap()]);
    struct Umount(PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Umount(tmpfs.clone());
    // A read-only filesystem: "writable" only (docs/protocol.md); it was
    // frozen before that check existed.
    let (_ro_loop, ro) = ext4_loop();
    sh("mount", &["-o", "remount,ro", ro.to_str().unwrap()]);
    sh("sync", &[]);
    let before = l.sha();
    let a = util::Agent::new();
    let cases: Vec<(&str, Value, &str)> = vec![
        ("FreezeFilesystems", json!({"mount_points": [mp]}), "thaw_after_seconds"),
        ("FreezeFilesystems", json!({"mount_points": [mp], "thaw_after_seconds": 0}), "1 to 600"),
        ("FreezeFilesystems", json!({"mount_points": [mp], "thaw_after_seconds": 601}), "1 to 600"),
        ("FreezeFilesystems", json!({"mount_points": [mp], "thaw_after_seconds": "10"}), "thaw_after_seconds"),
        ("FreezeFilesystems", json!({"mount_points": [mp], "thaw_after_seconds": 5, "x": 1}), "unknown field"),
        ("FreezeFilesystems", json!({"mount_points": [], "thaw_after_seconds": 5}), "empty"),
        ("FreezeFilesystems", json!({"mount_points": ["/proc"], "thaw_after_seconds": 5}), "virtual"),
        ("FreezeFilesystems", json!({"mount_points": ["/sys"], "thaw_after_seconds": 5}), "virtual"),
        ("FreezeFilesystems", json!({"mount_points": [tmpfs], "thaw_after_seconds": 5}), "tmpfs"),
        ("FreezeFilesystems", json!({"mount_points": [mp, tmpfs], "thaw_after_seconds": 5}), "nothing was done"),
        ("FreezeFilesystems", json!({"mount_points": [mp.join("sub")], "thaw_after_seconds": 5}), "not a mount point"),
        ("FreezeFilesystems", json!({"mount_points": [mp, "/nonexistent"], "thaw_after_seconds": 5}), "not a mount"),
        ("FreezeFilesystems", json!({"mount_points": [run], "thaw_after_seconds": 5}), ""),
        ("FreezeFilesystems", json!({"mount_points": [ro], "thaw_after_seconds": 5}), "read-only"),
        ("ThawFilesystems", json!({"mount_points": ["/proc"]}), "proc"),
        ("ThawFilesystems", json!({"mount_points": [mp.join("sub")]}), "not a mount point"),
        ("TrimFilesystems", json!({"mount_points": ["/proc"]}), "virtual"),
        ("Reboot", json!({"delay_seconds": 99999}), "at most"),
        ("Shutdown", json!({"delay_seconds": -1}), "delay_seconds"),
    ];
    for (op, params, needle) in cases {
        let o = a.exec(op, params.clone());
        o.expect("refused").expect_message(needle);
        assert!(!record_exists(), "{op} {params}: a freeze record appeared");
    }
    sh("sync", &[]);
    assert_eq!(l.sha(), before, "a refused job changed the disk");
    let mut wr = writer(&mp, "free");
    finished_within(&mut wr, Duration::from_secs(5)).expect("the filesystem is frozen after refusals");
    assert!(!a.dir.path().join("state/power-pending.json").exists());
}

#[test]
#[ignore = "root tier: needs root and loop devices (cargo xtask test runs it with --ignored)"]
fn trim_reports_the_bytes_trimmed() {
    test_env();
    let (_l, mp) = ext4_loop();
    let f = mp.join("big");
    sh("dd", &["if=/dev/urandom", &format!("of={}", f.display()), "bs=1M", "count=16", "conv=fsync", "status=none"]);
    std::fs::remove_file(&f).unwrap();
    sh("sync", &[]);
    let a = util::Agent::new();
    let dry = a.exec_with("TrimFilesystems", json!({"mount_points": [mp]}), true, None);
    dry.expect("succeeded");
    assert!(dry.stdout.contains("FITRIM"), "{dry}");
    let o = a.exec("TrimFilesystems", json!({"mount_points": [mp]}));
    o.expect("succeeded");
    assert!(o.detail_u64("bytes_trimmed") >= 16 << 20, "{o}");
}

/// Lines the power hook recorded.
fn power_calls() -> Vec<String> {
    std::fs::read_to_string(test_env().1.join("power-calls")).unwrap_or_default().lines().map(str::to_string).collect()
}

#[test]
fn reboot_and_shutdown_run_once_after_their_result_is_delivered() {
    let (_, d) = test_env();
    let release = d.join("power-release");
    let _ = std::fs::remove_file(&release);
    let w = World::new("power-once", SERVER);
    let server = w.start_server("server-state", &[]);
    let agent = w.agent("agent", server.api, json!({}));
    let vm = w.vm_uuid(&agent);
    let admin = server.admin();

    // --dry-run prints the plan and asks nobody.
    let job = agent.dir.join("reboot.json");
    std::fs::write(&job, json!({"id": "dry", "operation": "Reboot", "params": {"delay_seconds": 1}}).to_string())
        .unwrap();
    let o = w.agent_cmd(&agent, &["exec", "--dry-run", "--job", job.to_str().unwrap()], Duration::from_secs(30));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && out.contains("once this result is delivered") && out.contains("plan"), "{out}");
    assert!(power_calls().is_empty(), "a dry run asked the init system");
    assert!(!agent.state_dir.join("power-pending.json").exists());

    let mut dproc = w.spawn_agent(&agent, &["run"]);
    let id = admin.queue(&vm, "Reboot", json!({"delay_seconds": 1}));
    let calls = wait_for(Duration::from_secs(60), || Some(power_calls()).filter(|c| !c.is_empty()))
        .expect("the init system was never asked");
    // The hook is running now ("the init system is asked"): the result must
    // already be stored by the server.
    let j = admin.job(&id);
    assert_eq!(j["status"], "succeeded", "result not delivered before the reboot: {j:#}");
    assert_eq!(calls.len(), 1);
    assert!(calls[0].contains("reboot") || calls[0].contains("-r"), "{calls:?}");
    std::fs::write(&release, "").unwrap();

    // Delivered again, and after a restart (as after the reboot): never twice.
    admin.redeliver(&id);
    let n = admin.checkin_count(&vm);
    assert!(wait_for(Duration::from_secs(60), || (admin.checkin_count(&vm) >= n + 3).then_some(())).is_some());
    dproc.signal(nix::sys::signal::Signal::SIGKILL);
    dproc.wait_timeout(Duration::from_secs(10));
    let _d2 = w.spawn_agent(&agent, &["run"]);
    let n = admin.checkin_count(&vm);
    assert!(wait_for(Duration::from_secs(60), || (admin.checkin_count(&vm) >= n + 3).then_some(())).is_some());
    assert_eq!(power_calls().len(), 1, "Reboot acted on twice: {:?}", power_calls());
    assert!(!agent.state_dir.join("power-pending.json").exists());

    let id = admin.queue(&vm, "Shutdown", json!({"delay_seconds": 0}));
    let calls = wait_for(Duration::from_secs(60), || Some(power_calls()).filter(|c| c.len() >= 2))
        .expect("Shutdown never asked the init system");
    assert_eq!(admin.job(&id)["status"], "succeeded");
    assert!(!calls[1].contains("reboot") && calls[1] != calls[0], "{calls:?}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(power_calls().len(), 2);
}

#[test]
fn guest_schemas_match_the_agent() {
    let c = vm_tests::schema::Checker::new(&vm_tests::schema::schemas_dir());
    // The report of this machine's real mounts.
    c.validate("filesystem-report.json", &xcp_vm_agent::guest::fsreport::report()).unwrap();
    c.validate("freeze-params.json", &json!({"mount_points": ["/data"], "thaw_after_seconds": 30})).unwrap();
    c.validate("freeze-params.json", &json!({"thaw_after_seconds": 600})).unwrap();
    assert!(c.validate("freeze-params.json", &json!({"mount_points": ["/data"]})).is_err());
    assert!(c.validate("freeze-params.json", &json!({"thaw_after_seconds": 0})).is_err());
    c.validate("thaw-params.json", &json!({})).unwrap();
    c.validate("trim-params.json", &json!({"mount_points": ["/"]})).unwrap();
    c.validate("power-params.json", &json!({"delay_seconds": 0})).unwrap();
    assert!(c.validate("power-params.json", &json!({"delay": 3})).is_err());
    for op in ["FreezeFilesystems", "ThawFilesystems", "TrimFilesystems", "Reboot", "Shutdown"] {
        assert!(xcp_vm_agent::jobs::OPERATIONS.contains(&op), "{op} is not an operation");
        let s = std::fs::read_to_string(vm_tests::schema::schemas_dir().join("job.json")).unwrap();
        assert!(s.contains(op), "job.json does not name {op}");
    }
}
