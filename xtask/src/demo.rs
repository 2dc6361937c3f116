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
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::{cargo, root, run as run_cmd, step};

const HELP: &str = "\
cargo xtask demo [--release] [--keep]

Builds xcp-vm-agent and mgmt-server, makes a fresh test PKI in a scratch
directory, starts mgmt-server on free loopback ports (HTTPS with client
certificates for the agent, plain HTTP admin API), runs the agent daemon
against it, queues a RunScript job through the admin API, waits for the result
and prints it, then stops the agent (SIGTERM) and the server.

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
    server: Option<Child>,
    agent: Option<Child>,
    /// `127.0.0.1:PORT` of the admin API.
    pub admin: String,
    // The VM UUID the agent reported, set once it has checked in.
}

impl Demo {
    fn run_all(&mut self) -> Result<()> {
        step("demo: making a fresh test PKI");
        let pki = self.dir.join("pki");
        run_cmd(Command::new(&self.server_bin).arg("init-pki").arg(&pki).stdout(Stdio::null()))?;
        info(&format!("CA, server and agent certificates in {}", pki.display()));

        step("demo: starting mgmt-server on loopback");
        let (https, admin) = self.start_server(&pki)?;
        self.admin = admin.clone();
        info(&format!("agent API  https://{https}  (client certificate required)"));
        info(&format!("admin API  http://{admin}"));

        step("demo: writing the agent config and starting the agent daemon");
        let agent_dir = self.dir.join("agent");
        std::fs::create_dir_all(&agent_dir)?;
        let config = json!({
            "server_url": format!("https://{https}"),
            "check_in_interval": 5,
            "client_cert": [pki.join("agent-cert.pem"), pki.join("agent-key.pem")],
            "server_cert": pki.join("ca.pem"),
            "state_dir": agent_dir.join("state"),
            "log_file": agent_dir.join("agent.log"),
            "long_poll_seconds": 25,
        });
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

    fn start_server(&mut self, pki: &Path) -> Result<(String, String)> {
        let log = self.dir.join("server.log");
        let mut child = Command::new(&self.server_bin)
            .args(["serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--pki"])
            .arg(pki)
            .arg("--state")
            .arg(self.dir.join("server-state"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("cannot start {}", self.server_bin.display()))?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("server stdout")?).read_line(&mut line)?;
        self.server = Some(child);
        // listening https://127.0.0.1:PORT admin http://127.0.0.1:PORT2
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["listening", https, "admin", admin] => {
                Ok((https.trim_start_matches("https://").to_string(), admin.trim_start_matches("http://").to_string()))
            }
            _ => bail!(
                "mgmt-server did not announce its addresses (got {line:?}); log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ),
        }
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
        let mut s = std::net::TcpStream::connect(&self.admin)
            .with_context(|| format!("cannot connect to the admin API at {}", self.admin))?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.admin,
            body.len()
        )?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        let (head, rest) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
        let code: u16 = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        if code != 200 {
            bail!("admin {method} {path} answered {code}: {rest}");
        }
        serde_json::from_str(rest).with_context(|| format!("admin {method} {path} answered non-JSON: {rest}"))
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
        if let Some(mut s) = self.server.take() {
            let _ = s.kill();
            let _ = s.wait();
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

/// Further demo jobs, run after the RunScript one against the same agent.
/// The disk issue adds its loop-device jobs (ExtendPartition,
/// InitializeDisk) here with `demo.show_job(vm, title, operation, params)`.
fn more_jobs(_demo: &mut Demo, _vm: &str) -> Result<()> {
    Ok(())
}
