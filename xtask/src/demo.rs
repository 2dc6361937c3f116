//! `cargo xtask demo`: the whole loop on one machine, on loopback.
//!
//! Builds the agent and `mgmt-server`, makes a fresh PKI in a scratch
//! directory, starts the server on free loopback ports, writes an agent
//! config, runs the agent daemon (`run`) in the background, queues jobs
//! through the admin API, waits for their results, prints them, and stops
//! everything (also on error).
//!
//! To show another operation, add a call to [`Demo::show_job`] in
//! [`more_jobs`] (the disk issue adds its loop-device jobs there).
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::{cargo, http_json, root, run as run_cmd, step, Server};

const HELP: &str = "\
cargo xtask demo [--release] [--keep]

Builds xcp-vm-agent and mgmt-server, makes a fresh test PKI in a scratch
directory, starts mgmt-server on free loopback ports (HTTPS with client
certificates for the agent, plain HTTP admin API), runs the agent daemon
against it, queues a RunScript job through the admin API, waits for the result
and prints it, then stops the agent (SIGTERM) and the server.

As root it also makes a 256 MiB loop-device disk (a sparse file in the
scratch directory), queues InitializeDisk (GPT, ext4, mounted in the scratch
directory, entry in a scratch fstab: the machine's /etc/fstab is never
touched), grows the file to 512 MiB and queues ExtendPartition, and prints
the partition and filesystem sizes before and after. The loop device is
unmounted and detached at the end, also on error.

Options:
  --release   build and run release binaries
  --keep      keep the scratch directory (PKI, configs, state, logs) and print its path
  -h, --help  this text
";

/// The second-level step lines.
fn info(msg: &str) {
    eprintln!("    {msg}");
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}
const SIGTERM: i32 = 15;

pub fn run(args: &[String]) -> Result<()> {
    let mut release = false;
    let mut keep = false;
    for a in args {
        match a.as_str() {
            "-h" | "--help" => {
                print!("{HELP}");
                return Ok(());
            }
            "--release" => release = true,
            "--keep" => keep = true,
            other => bail!("unknown option {other:?}\n\n{HELP}"),
        }
    }

    // A fresh machine lacks the disk tools: install what the demo needs
    // (and only that) before anything runs them. Without root the demo
    // makes no loop-device disk and needs none of them.
    if crate::util::is_root() {
        step("demo: checking the tools the demo's disk jobs run");
        crate::setup::install_missing(crate::setup::DEMO_PACKAGES)?;
    }
    step("demo: building xcp-vm-agent and mgmt-server");
    let mut c = cargo();
    c.args(["build", "-p", "xcp-vm-agent", "--bin", "xcp-vm-agent", "-p", "vm-tests", "--bin", "mgmt-server"]);
    if release {
        c.arg("--release");
    }
    run_cmd(&mut c)?;
    let bin_dir = target_dir().join(if release { "release" } else { "debug" });
    let agent_bin = bin_dir.join("xcp-vm-agent");
    let server_bin = bin_dir.join("mgmt-server");

    let dir = std::env::temp_dir().join(format!("xcp-vm-agent-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut demo = Demo { dir: dir.clone(), agent_bin, server_bin, server: None, agent: None, admin: String::new() };
    let r = demo.run_all();
    demo.stop();
    if keep || r.is_err() {
        eprintln!("\n    scratch directory kept: {}", dir.display());
        eprintln!("      server log {}", dir.join("server.log").display());
        eprintln!("      agent log  {}", dir.join("agent/agent.log").display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    r
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("target"))
}

/// The running demo: its scratch dir, processes and the admin address.
pub struct Demo {
    pub dir: PathBuf,
    agent_bin: PathBuf,
    server_bin: PathBuf,
    server: Option<Server>,
    agent: Option<Child>,
    /// `http://127.0.0.1:PORT` of the admin API.
    pub admin: String,
    // The VM UUID the agent reported, set once it has checked in.
}

impl Demo {
    fn run_all(&mut self) -> Result<()> {
        step("demo: making a fresh test PKI and starting mgmt-server on loopback");
        let srv = Server::start(&self.server_bin, &self.dir)?;
        let pki = self.dir.join("pki");
        info(&format!("CA, server and agent certificates in {}", pki.display()));
        info(&format!("agent API  {}  (client certificate required)", srv.https));
        info(&format!("admin API  {}", srv.admin));
        self.admin = srv.admin.clone();

        step("demo: writing the agent config and starting the agent daemon");
        let agent_dir = self.dir.join("agent");
        std::fs::create_dir_all(&agent_dir)?;
        let config = srv.agent_config(
            &agent_dir.join("state"),
            json!({
                "check_in_interval": 5,
                "log_file": agent_dir.join("agent.log"),
                "long_poll_seconds": 25,
                // Disk jobs write this fstab, never the machine's own.
                "fstab_path": agent_dir.join("fstab"),
            }),
        );
        self.server = Some(srv);
        std::fs::write(agent_dir.join("fstab"), "# scratch fstab of cargo xtask demo\n")?;
        let config_path = agent_dir.join("config.json");
        std::fs::write(&config_path, serde_json::to_vec_pretty(&config)?)?;
        info(&format!("config {}", config_path.display()));
        let child = Command::new(&self.agent_bin)
            .arg("--config")
            .arg(&config_path)
            .arg("run")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(agent_dir.join("daemon.stderr"))?)
            .spawn()
            .with_context(|| format!("cannot start {}", self.agent_bin.display()))?;
        info(&format!("$ {} --config {} run   (pid {})", self.agent_bin.display(), config_path.display(), child.id()));
        self.agent = Some(child);

        step("demo: waiting for the agent's first check-in");
        let agent = self.wait_for_agent(Duration::from_secs(60))?;
        let vm = agent["vm_uuid"].as_str().unwrap_or("").to_string();
        let id = &agent["identity"];
        info(&format!("vm_uuid   {vm} (from {})", id["source"].as_str().unwrap_or("?")));
        info(&format!(
            "host      {} / {} / kernel {} / hypervisor {}",
            id["hostname"].as_str().unwrap_or("?"),
            id["os"]["pretty_name"].as_str().unwrap_or("?"),
            id["kernel"].as_str().unwrap_or("?"),
            id["hypervisor"].as_str().unwrap_or("?")
        ));
        let m = &agent["metrics"];
        info(&format!(
            "metrics   cpu {}%  memory {}% of {} kB  load {}  {} processes",
            m["cpu_usage_percent"],
            m["memory_usage_percent"],
            m["memory_total_kb"],
            m["load_average"],
            m["process_count"]
        ));
        info(&format!(
            "agent     version {}, offers {}",
            agent["agent_version"].as_str().unwrap_or("?"),
            agent["capabilities"]
        ));

        let r = self.show_job(
            &vm,
            "a RunScript job",
            "RunScript",
            json!({"script": "echo hello from $(hostname); uname -a", "timeout_seconds": 60}),
        )?;
        if r["status"] != "succeeded" {
            bail!("the RunScript job ended {}: {}", r["status"], r["result"]["message"]);
        }
        more_jobs(self, &vm)?;
        step("demo: done, the script's output came back through the server");
        Ok(())
    }

    fn wait_for_agent(&mut self, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.admin_call("GET", "/admin/v1/agents", None)?;
            if let Some(a) = v["agents"].as_array().and_then(|a| a.first()) {
                return Ok(a.clone());
            }
            if let Some(st) = self.agent.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!(
                    "the agent exited ({st}) before checking in; its log:\n{}",
                    std::fs::read_to_string(self.dir.join("agent/daemon.stderr")).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent did not check in within {timeout:?}; see {}",
                    self.dir.join("agent/daemon.stderr").display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Queue one job for `vm`, follow it to its final state printing each
    /// state change, print the result, and return the final job record.
    pub fn show_job(&mut self, vm: &str, title: &str, operation: &str, params: Value) -> Result<Value> {
        step(&format!("demo: queueing {title}"));
        info(&format!("operation {operation}"));
        for (k, v) in params.as_object().into_iter().flatten() {
            info(&format!("  {k}: {v}"));
        }
        let body = json!({"vm_uuid": vm, "operation": operation, "params": params});
        let id = self.admin_call("POST", "/admin/v1/jobs", Some(&body))?["id"].as_str().unwrap_or("").to_string();
        info(&format!("job id {id}"));
        let t0 = Instant::now();
        let mut last = String::new();
        let job = loop {
            let j = self.admin_call("GET", &format!("/admin/v1/jobs/{id}?wait=1&until=running"), None)?;
            let st = j["status"].as_str().unwrap_or("?").to_string();
            if st != last {
                info(&format!("{:>6} ms  {st}", t0.elapsed().as_millis()));
                last = st.clone();
            }
            if !matches!(st.as_str(), "queued" | "delivered" | "running") {
                break j;
            }
            if st == "running" {
                // Wait for the final state now.
                let j = self.admin_call("GET", &format!("/admin/v1/jobs/{id}?wait=2"), None)?;
                let st2 = j["status"].as_str().unwrap_or("?");
                if st2 != "running" {
                    info(&format!("{:>6} ms  {st2}", t0.elapsed().as_millis()));
                    break j;
                }
            }
            if t0.elapsed() > Duration::from_secs(600) {
                bail!("job {id} did not finish within 10 minutes (status {st})");
            }
        };
        print_result(&job);
        Ok(job)
    }

    fn admin_call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        http_json(method, &self.admin, path, body).with_context(|| format!("admin API {method} {path}"))
    }

    fn stop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            step("demo: stopping the agent (SIGTERM) and the server");
            let t0 = Instant::now();
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc_kill(a.id() as i32, SIGTERM) };
            let mut stopped = false;
            while t0.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(st)) = a.try_wait() {
                    info(&format!("agent stopped in {} ms ({st})", t0.elapsed().as_millis()));
                    stopped = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if !stopped {
                info("agent still running 10 s after SIGTERM; killing it");
                let _ = a.kill();
                let _ = a.wait();
            }
        }
        if self.server.take().is_some() {
            info("server stopped");
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        self.stop();
    }
}

fn print_result(job: &Value) {
    let r = &job["result"];
    let d = &r["details"];
    eprintln!();
    info(&format!("status    {}", job["status"].as_str().unwrap_or("?")));
    info(&format!("message   {}", r["message"].as_str().unwrap_or("")));
    if let (Some(c), Some(f)) = (job["created_at_ms"].as_u64(), job["running_at_ms"].as_u64()) {
        info(&format!("pickup    {} ms from queueing to start", f.saturating_sub(c)));
    }
    info(&format!("duration  {} ms on the agent", r["duration_ms"]));
    if !d["exit_code"].is_null() {
        info(&format!("exit code {}", d["exit_code"]));
    }
    for stream in ["stdout", "stderr"] {
        if let Some(text) = d[stream].as_str().filter(|t| !t.is_empty()) {
            info(&format!("{stream}:"));
            for line in text.lines() {
                eprintln!("      | {line}");
            }
        }
    }
    // Operations without stdout (disk jobs): show their details as JSON.
    if d["stdout"].is_null() && d.as_object().is_some_and(|o| !o.is_empty()) {
        info("details:");
        for line in serde_json::to_string_pretty(d).unwrap_or_default().lines() {
            eprintln!("      {line}");
        }
    }
}

/// Further demo jobs, run after the RunScript one against the same agent:
/// as root, the disk jobs on a loop device.
fn more_jobs(demo: &mut Demo, vm: &str) -> Result<()> {
    if !crate::util::is_root() {
        step("demo: skipping the disk jobs (InitializeDisk, ExtendPartition): they need root for a loop device");
        return Ok(());
    }
    disk_jobs(demo, vm)
}

/// `blockdev --getsize64`.
fn dev_size(dev: &str) -> Result<u64> {
    let o = Command::new("blockdev").args(["--getsize64", dev]).output().context("cannot run blockdev")?;
    if !o.status.success() {
        bail!("blockdev --getsize64 {dev} failed: {}", String::from_utf8_lossy(&o.stderr).trim());
    }
    String::from_utf8_lossy(&o.stdout).trim().parse().with_context(|| format!("size of {dev}"))
}

/// Run a setup command, echoing it.
fn demo_cmd(prog: &str, args: &[&str]) -> Result<String> {
    info(&format!("$ {prog} {}", args.join(" ")));
    let o = Command::new(prog).args(args).output().with_context(|| format!("cannot run {prog}"))?;
    if !o.status.success() {
        bail!("`{prog} {}` failed: {}", args.join(" "), String::from_utf8_lossy(&o.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// "511.0 MiB (535822336 bytes)".
fn human(b: Option<u64>) -> String {
    match b {
        Some(b) => format!("{:.1} MiB ({b} bytes)", b as f64 / (1u64 << 20) as f64),
        None => "?".into(),
    }
}

/// The demo's loop device: unmounted and detached on drop, also on error.
struct DemoDisk {
    dev: String,
    mount_point: PathBuf,
}

impl Drop for DemoDisk {
    fn drop(&mut self) {
        step("demo: removing the demo disk");
        if is_mounted(&self.mount_point) {
            let ok = Command::new("umount").arg(&self.mount_point).status().map(|s| s.success()).unwrap_or(false);
            info(&format!("umount {}: {}", self.mount_point.display(), if ok { "ok" } else { "FAILED" }));
        }
        let ok = Command::new("losetup").args(["-d", &self.dev]).status().map(|s| s.success()).unwrap_or(false);
        info(&format!("losetup -d {}: {}", self.dev, if ok { "ok" } else { "FAILED" }));
    }
}

fn is_mounted(mp: &Path) -> bool {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let want = mp.to_string_lossy().replace(' ', "\\040");
    text.lines().any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

fn disk_jobs(demo: &mut Demo, vm: &str) -> Result<()> {
    step("demo: making a 256 MiB loop-device disk (sparse file in the scratch directory)");
    let img = demo.dir.join("disk.img");
    let img_s = img.to_string_lossy().into_owned();
    demo_cmd("truncate", &["-s", "256M", &img_s])?;
    let dev = demo_cmd("losetup", &["--find", "--show", "--partscan", &img_s])?.trim().to_string();
    let mount_point = demo.dir.join("data");
    let disk = DemoDisk { dev: dev.clone(), mount_point: mount_point.clone() };
    let disk_before = dev_size(&dev)?;
    info(&format!("{dev}: {}", human(Some(disk_before))));

    let init = demo.show_job(
        vm,
        "InitializeDisk on the loop device",
        "InitializeDisk",
        json!({"device": dev, "filesystem": "ext4", "mount_point": mount_point, "label": "demo"}),
    )?;
    if init["status"] != "succeeded" {
        bail!("InitializeDisk ended {}: {}", init["status"], init["result"]["message"]);
    }
    let d = &init["result"]["details"];
    let part = d["partition"].as_str().context("InitializeDisk gave no partition")?.to_string();
    info(&format!("fstab     {}", d["fstab_line"].as_str().unwrap_or("?")));
    let probe = demo.dir.join("data/hello.txt");
    let text = "written before ExtendPartition\n";
    std::fs::write(&probe, text).with_context(|| format!("cannot write {}", probe.display()))?;
    info(&format!("wrote {} on the new filesystem", probe.display()));

    step("demo: growing the backing file to 512 MiB");
    demo_cmd("truncate", &["-s", "512M", &img_s])?;
    demo_cmd("losetup", &["-c", &dev])?;
    // The first open after a capacity change rescans the table; a kernel
    // without table parsers then drops the partitions not in use, which a
    // normal kernel would re-read. Re-add them, as the disk tests do.
    demo_cmd("blockdev", &["--getsize64", &dev])?;
    demo_cmd("partx", &["--update", &dev])?;
    info(&format!("{dev}: {}", human(Some(dev_size(&dev)?))));

    let mut runs = vec![demo.show_job(
        vm,
        "ExtendPartition on the mounted filesystem",
        "ExtendPartition",
        json!({"mount_point": mount_point}),
    )?];
    let first = &runs[0];
    if first["status"] == "failed" && first["result"]["message"].as_str().unwrap_or("").contains("Permission denied") {
        // Online resize2fs needs CAP_SYS_RESOURCE, which containers often
        // lack; the partition has grown already. Finish offline: the rerun
        // runs the filesystem step (e2fsck, resize2fs) and nothing else.
        step("demo: online resize2fs was refused here (no CAP_SYS_RESOURCE); finishing offline");
        demo_cmd("umount", &[&mount_point.to_string_lossy()])?;
        runs.push(demo.show_job(vm, "ExtendPartition again, unmounted", "ExtendPartition", json!({"device": part}))?);
        let fstab = demo.dir.join("agent/fstab");
        demo_cmd("mount", &["--fstab", &fstab.to_string_lossy(), &mount_point.to_string_lossy()])?;
    }
    let last = runs.last().unwrap();
    if last["status"] != "succeeded" {
        bail!("ExtendPartition ended {}: {}", last["status"], last["result"]["message"]);
    }
    let back = std::fs::read_to_string(&probe).with_context(|| format!("cannot read {}", probe.display()))?;
    if back != text {
        bail!("{} changed across the extend: {back:?}", probe.display());
    }

    let (a, z) = (&runs[0]["result"]["details"], &last["result"]["details"]);
    let n = |v: &Value| v.as_u64();
    step("demo: sizes before and after");
    info(&format!("disk        {dev}: {} -> {}", human(Some(disk_before)), human(n(&z["disk_bytes"]))));
    info(&format!(
        "partition   {part}: {} -> {}",
        human(n(&a["partition_bytes_before"])),
        human(n(&z["partition_bytes_after"]))
    ));
    info(&format!(
        "filesystem  {} on {}: {} -> {}",
        z["filesystem"].as_str().unwrap_or("?"),
        mount_point.display(),
        human(n(&z["filesystem_bytes_before"])),
        human(n(&z["filesystem_bytes_after"]))
    ));
    info(&format!("{} read back unchanged", probe.display()));
    drop(disk);
    Ok(())
}
