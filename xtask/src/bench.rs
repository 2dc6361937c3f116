//! `cargo xtask bench`: the speed and size figures of docs/performance.md,
//! measured against the reference server on loopback. A benchmark, not a
//! test: it prints numbers and writes `target/bench/results.json`; nothing
//! here fails on a slow machine.
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::{self, cargo, http_json, root, step, Server};

const HELP: &str = "cargo xtask bench [--jobs N] [--binary PATH]

Builds the static release binary (or takes PATH, e.g. an older build to
compare with) and measures, against mgmt-server on loopback:
  binary_size_bytes        size of the static agent binary
  idle_rss_kib             resident memory of the idle daemon after 10 check-ins
  cpu_ms_per_idle_checkin  CPU time (all threads, from schedstat) per idle check-in
  pickup_latency_ms_p50/99 job queued -> job running, over N jobs (default 50), long-poll
  qemu_ga_idle_rss_kib     the same for Debian's qemu-ga on a unix socket
  freeze_thaw_ms, qemu_ga_freeze_thaw_ms (as root: FreezeFilesystems+ThawFilesystems
                           vs guest-fsfreeze-freeze-list+thaw on the same loop mount)
  extend_overhead_ratio, initialize_overhead_ratio (as root: disk jobs on a 1 GiB
                           loop device / the same tool commands run by hand)
Prints them and writes target/bench/results.json.";

fn cpu_ns(pid: u32) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in rd.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) {
                total += s.split_whitespace().next().and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
            }
        }
    }
    total
}

pub fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|x| x.parse().ok())
        .unwrap_or(0)
}

fn checkins(srv: &Server) -> u64 {
    http_json("GET", &srv.admin, "/admin/v1/agents", None)
        .ok()
        .and_then(|v| {
            let list = v.get("agents").cloned().unwrap_or(v);
            list.as_array().and_then(|a| a.first().cloned())
        })
        .and_then(|a| a["checkin_count"].as_u64())
        .unwrap_or(0)
}

fn start_agent(bin: &Path, srv: &Server, dir: &Path, extra: Value) -> Result<Child> {
    let state = dir.join("agent-state");
    std::fs::create_dir_all(&state)?;
    let cfg = dir.join("agent.json");
    std::fs::write(&cfg, serde_json::to_vec_pretty(&srv.agent_config(&state, extra))?)?;
    Command::new(bin)
        .arg("--config")
        .arg(&cfg)
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let t = Instant::now();
    while !f() {
        if t.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn run(args: &[String]) -> Result<()> {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{HELP}");
        return Ok(());
    }
    let njobs: usize = match args.iter().position(|a| a == "--jobs") {
        Some(i) => args.get(i + 1).context("--jobs needs a number")?.parse().context("--jobs needs a number")?,
        None => 50,
    };
    crate::setup::run_setup(true)?;
    let (bin, target) = match args.iter().position(|a| a == "--binary") {
        Some(i) => (std::path::PathBuf::from(args.get(i + 1).context("--binary needs a path")?), "given"),
        None => crate::dist::build_binary(crate::dist::source_date_epoch()?)?,
    };
    step("bench: building mgmt-server (release)");
    util::run(cargo().args(["build", "--release", "-p", "vm-tests", "--bin", "mgmt-server"]))?;
    let server_bin = root().join("target/release/mgmt-server");
    let mut results = serde_json::Map::new();
    let size = std::fs::metadata(&bin)?.len();
    results.insert("binary_size_bytes".into(), json!(size));
    results.insert("binary_target".into(), json!(target));

    let tmp = tempfile_dir()?;
    let srv = Server::start(&server_bin, &tmp)?;

    step("bench: idle daemon, 10 check-ins (long-poll off, 1 s interval)");
    let idle_dir = tmp.join("idle");
    let mut agent = start_agent(&bin, &srv, &idle_dir, json!({"check_in_interval": 1, "long_poll_seconds": 0}))?;
    let pid = agent.id();
    wait_for("the first check-in", Duration::from_secs(30), || checkins(&srv) >= 1)?;
    let cpu0 = cpu_ns(pid);
    let n0 = checkins(&srv);
    wait_for("10 more check-ins", Duration::from_secs(60), || checkins(&srv) >= n0 + 10)?;
    let cpu1 = cpu_ns(pid);
    let n1 = checkins(&srv);
    let rss = rss_kib(pid);
    let cpu_ms = (cpu1 - cpu0) as f64 / 1e6 / (n1 - n0) as f64;
    let _ = agent.kill();
    let _ = agent.wait();
    results.insert("idle_rss_kib".into(), json!(rss));
    results.insert("cpu_ms_per_idle_checkin".into(), json!((cpu_ms * 1000.0).round() / 1000.0));
    eprintln!("    idle RSS {rss} KiB, {cpu_ms:.3} ms CPU per check-in over {} check-ins", n1 - n0);
    step("bench: qemu-ga side by side (idle RSS; as root, freeze-to-thaw on one loop-mounted ext4)");
    crate::bench_guest::measure(&tmp.join("guest"), &mut results)?;

    step(&format!("bench: job pickup latency over {njobs} jobs (long-poll 55 s)"));
    let lp_dir = tmp.join("longpoll");
    let mut agent = start_agent(&bin, &srv, &lp_dir, json!({"check_in_interval": 30, "long_poll_seconds": 55}))?;
    let vm = {
        let c0 = checkins(&srv);
        wait_for("the long-poll agent's check-in", Duration::from_secs(60), || checkins(&srv) > c0)?;
        let v = http_json("GET", &srv.admin, "/admin/v1/agents", None)?;
        let list = v.get("agents").cloned().unwrap_or(v);
        list[0]["vm_uuid"].as_str().context("agent listing has no vm_uuid")?.to_string()
    };
    let mut lat = Vec::new();
    for i in 0..njobs {
        // Let the agent settle into its held check-in, as an idle agent would be.
        std::thread::sleep(Duration::from_millis(50));
        let id = http_json(
            "POST",
            &srv.admin,
            "/admin/v1/jobs",
            Some(&json!({"vm_uuid": vm, "operation": "RunScript", "params": {"script": "true"}})),
        )?["id"]
            .as_str()
            .context("no job id")?
            .to_string();
        let mut job = Value::Null;
        wait_for(&format!("job {i} to finish"), Duration::from_secs(60), || {
            job = http_json("GET", &srv.admin, &format!("/admin/v1/jobs/{id}"), None).unwrap_or(Value::Null);
            job["status"] == "succeeded"
        })?;
        let created = job["created_at_ms"].as_f64().context("job has no created_at_ms")?;
        let running = job["running_at_ms"].as_f64().context("job has no running_at_ms")?;
        lat.push(running - created);
    }
    let _ = agent.kill();
    let _ = agent.wait();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    results.insert("pickup_latency_ms_p50".into(), json!(percentile(&lat, 50.0)));
    results.insert("pickup_latency_ms_p99".into(), json!(percentile(&lat, 99.0)));
    results.insert("pickup_jobs".into(), json!(lat.len()));
    drop(srv);

    if util::is_root() {
        step("bench: ExtendPartition and InitializeDisk on a 1 GiB loop device vs the same commands by hand");
        let d = tmp.join("disk");
        std::fs::create_dir_all(&d)?;
        let (extend, init) = crate::bench_disk::measure(&bin, &d)?;
        results.insert("extend_overhead_ratio".into(), json!((extend * 1000.0).round() / 1000.0));
        results.insert("initialize_overhead_ratio".into(), json!((init * 1000.0).round() / 1000.0));
    } else {
        eprintln!("    not root: the disk-operation ratios need loop devices and are left out");
    }
    let _ = std::fs::remove_dir_all(&tmp);

    let out = root().join("target/bench");
    std::fs::create_dir_all(&out)?;
    let v = Value::Object(results);
    std::fs::write(out.join("results.json"), serde_json::to_vec_pretty(&v)?)?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    eprintln!("wrote {}", out.join("results.json").display());
    Ok(())
}

/// A fresh scratch directory under target/ (not /tmp: agent state and PKI
/// keys stay inside the build tree).
fn tempfile_dir() -> Result<std::path::PathBuf> {
    let d = root().join("target/bench/work").join(format!("{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
