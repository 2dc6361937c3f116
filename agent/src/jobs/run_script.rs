//! RunScript: run a bash script with a timeout and capture its output.
//!
//! The script is written to a private file (0700) in `state_dir/scripts` and
//! run as `/bin/bash FILE ARGS...` in its own process group. On timeout (or
//! agent shutdown) the whole group gets SIGTERM, then SIGKILL after a grace
//! period. stdout and stderr are each capped at [`CAP`] bytes, keeping the
//! head and the tail and saying what was cut. Nothing from the job ever
//! reaches a shell command line: script text goes into a file, args and env
//! are passed as vectors.
use serde::Deserialize;
use serde_json::json;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::jobs::{parse_params, JobContext, JobResult, Status};

/// Bytes kept of each output stream.
pub const CAP: usize = 64 * 1024;
/// Time between SIGTERM and SIGKILL.
const GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    script: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default = "default_timeout")]
    timeout_seconds: u64,
}

fn default_timeout() -> u64 {
    3600
}

/// Keeps the first and last `cap/2` bytes of a stream and counts the rest.
#[derive(Debug, Default)]
pub struct HeadTail {
    cap: usize,
    head: Vec<u8>,
    tail: std::collections::VecDeque<u8>,
    total: u64,
}

impl HeadTail {
    pub fn new(cap: usize) -> Self {
        HeadTail { cap, ..Default::default() }
    }

    pub fn push(&mut self, mut data: &[u8]) {
        self.total += data.len() as u64;
        let head_cap = self.cap / 2;
        if self.head.len() < head_cap {
            let n = (head_cap - self.head.len()).min(data.len());
            self.head.extend_from_slice(&data[..n]);
            data = &data[n..];
        }
        let tail_cap = self.cap - head_cap;
        self.tail.extend(data);
        while self.tail.len() > tail_cap {
            let extra = self.tail.len() - tail_cap;
            self.tail.drain(..extra);
        }
    }

    pub fn truncated(&self) -> bool {
        self.total > (self.head.len() + self.tail.len()) as u64
    }

    /// The text kept, with a marker where bytes were cut.
    pub fn text(&self) -> String {
        let mut out = String::from_utf8_lossy(&self.head).into_owned();
        let tail: Vec<u8> = self.tail.iter().copied().collect();
        if self.truncated() {
            let cut = self.total - (self.head.len() + self.tail.len()) as u64;
            out.push_str(&format!(
                "\n[... {cut} bytes cut by xcp-vm-agent: output over {} KiB ...]\n",
                self.cap / 1024
            ));
        }
        out.push_str(&String::from_utf8_lossy(&tail));
        out
    }
}

fn reader(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<HeadTail> {
    std::thread::spawn(move || {
        let mut ht = HeadTail::new(CAP);
        let mut buf = [0u8; 8192];
        loop {
            match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => ht.push(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        ht
    })
}

fn signal_group(pgid: i32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), sig);
}

fn group_alive(pgid: i32) -> bool {
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), None).is_ok()
}

/// TERM the group, wait up to the grace period, then KILL what is left.
fn terminate_group(pgid: i32) {
    signal_group(pgid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + GRACE;
    while group_alive(pgid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if group_alive(pgid) {
        signal_group(pgid, nix::sys::signal::Signal::SIGKILL);
    }
}

pub fn run(ctx: &JobContext, params: &serde_json::Value) -> JobResult {
    let p: Params = match parse_params("RunScript", params) {
        Ok(p) => p,
        Err(r) => return r,
    };
    if p.timeout_seconds == 0 {
        return JobResult::refused("invalid parameters for RunScript: timeout_seconds must be at least 1");
    }
    if let Some(k) = p.env.keys().find(|k| k.is_empty() || k.contains('=') || k.contains('\0')) {
        return JobResult::refused(format!("invalid parameters for RunScript: env name {k:?} is not a variable name"));
    }
    if p.script.contains('\0') || p.args.iter().chain(p.env.values()).any(|a| a.contains('\0')) {
        return JobResult::refused("invalid parameters for RunScript: script, args and env must not contain NUL bytes");
    }
    if ctx.runner.dry_run() {
        ctx.runner.note(crate::runner::render("/bin/bash", &[&["SCRIPT".to_string()][..], &p.args].concat()));
        return JobResult::succeeded("dry run: the script would be run by /bin/bash").with_details(json!({
            "timeout_seconds": p.timeout_seconds, "script_bytes": p.script.len()
        }));
    }
    let dir = ctx.state_dir.join("scripts");
    if let Err(e) = std::fs::create_dir_all(&dir) {
        return JobResult::failed(format!("cannot create {}: {e}", dir.display()));
    }
    let path = dir.join(format!("job-{}-{}.sh", std::process::id(), crate::backoff::Rng::from_entropy().hex_id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o700)
        .open(&path)
        .and_then(|mut f| f.write_all(p.script.as_bytes()).and_then(|_| f.sync_all()));
    if let Err(e) = written {
        return JobResult::failed(format!("cannot write script file {}: {e}", path.display()));
    }
    struct Remove<'a>(&'a std::path::Path);
    impl Drop for Remove<'_> {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(self.0);
        }
    }
    let _cleanup = Remove(&path);

    let start = Instant::now();
    let mut cmd = Command::new("/bin/bash");
    cmd.arg(&path)
        .args(&p.args)
        .envs(&p.env)
        .env("XCP_VM_AGENT_JOB", "1")
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return JobResult::failed(format!("cannot start /bin/bash: {e}")),
    };
    let pgid = child.id() as i32;
    let out = reader(child.stdout.take().unwrap());
    let err = reader(child.stderr.take().unwrap());
    let timeout = Duration::from_secs(p.timeout_seconds);
    let mut timed_out = false;
    let mut cancelled = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) => {}
            Err(_) => break None,
        }
        if start.elapsed() >= timeout {
            timed_out = true;
        } else if ctx.cancel.load(Ordering::SeqCst) {
            cancelled = true;
        }
        if timed_out || cancelled {
            terminate_group(pgid);
            break child.wait().ok();
        }
        std::thread::sleep(
            Duration::from_millis(20).min(timeout.saturating_sub(start.elapsed())).max(Duration::from_millis(1)),
        );
    };
    // Background children still holding the pipes: give them a moment, then
    // end the group so the output can be collected.
    let mut leftover = false;
    let deadline = Instant::now() + Duration::from_secs(1);
    while group_alive(pgid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if group_alive(pgid) {
        leftover = true;
        terminate_group(pgid);
    }
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    let duration = start.elapsed();
    let code = status.and_then(|s| s.code());
    let signal = status.and_then(|s| s.signal());
    let details = json!({
        "exit_code": code,
        "signal": signal,
        "stdout": stdout.text(),
        "stderr": stderr.text(),
        "stdout_truncated": stdout.truncated(),
        "stderr_truncated": stderr.truncated(),
        "stdout_bytes": stdout.total,
        "stderr_bytes": stderr.total,
        "timed_out": timed_out,
        "leftover_processes_terminated": leftover,
        "duration_ms": duration.as_millis() as u64,
    });
    let r = if cancelled {
        JobResult::new(
            Status::Interrupted,
            "the agent was stopped while the script ran; its process group was terminated",
        )
    } else if timed_out {
        JobResult::failed(format!("script timed out after {} s; its process group was terminated", p.timeout_seconds))
    } else {
        match (code, signal) {
            (Some(0), _) => JobResult::succeeded("script exited with 0"),
            (Some(c), _) => JobResult::failed(format!("script exited with {c}")),
            (None, Some(s)) => JobResult::failed(format!("script was killed by signal {s}")),
            _ => JobResult::failed("script ended in an unknown way"),
        }
    };
    r.with_details(details)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(d: &std::path::Path) -> JobContext {
        JobContext::new(d.to_path_buf(), "/nonexistent/fstab".into(), false)
    }

    #[test]
    fn head_tail_keeps_both_ends() {
        let mut h = HeadTail::new(10);
        h.push(b"0123456789abcdefghij");
        assert!(h.truncated());
        let t = h.text();
        assert!(t.starts_with("01234") && t.ends_with("fghij") && t.contains("10 bytes cut"), "{t}");
        let mut s = HeadTail::new(10);
        s.push(b"abc");
        assert_eq!(s.text(), "abc");
        assert!(!s.truncated());
    }

    #[test]
    fn runs_with_args_env_and_exit_code() {
        let d = tempfile::tempdir().unwrap();
        let r = run(
            &ctx(d.path()),
            &json!({"script": "echo \"$1-$FOO\"; echo err >&2; exit 4", "args": ["a b"], "env": {"FOO": "bar"}}),
        );
        assert_eq!(r.status, Status::Failed);
        assert_eq!(r.details["exit_code"], 4);
        assert_eq!(r.details["stdout"], "a b-bar\n");
        assert_eq!(r.details["stderr"], "err\n");
        // The script file is gone afterwards.
        assert_eq!(std::fs::read_dir(d.path().join("scripts")).unwrap().count(), 0);
    }

    #[test]
    fn timeout_kills_the_group() {
        let d = tempfile::tempdir().unwrap();
        let r = run(&ctx(d.path()), &json!({"script": "sleep 30 & sleep 30; echo never", "timeout_seconds": 1}));
        assert_eq!(r.status, Status::Failed);
        assert_eq!(r.details["timed_out"], true);
        assert!(r.message.contains("timed out"));
        assert!(r.details["duration_ms"].as_u64().unwrap() < 10_000);
    }

    #[test]
    fn big_output_is_capped() {
        let d = tempfile::tempdir().unwrap();
        let r = run(&ctx(d.path()), &json!({"script": "head -c 300000 /dev/zero | tr '\\0' x; echo END"}));
        assert_eq!(r.status, Status::Succeeded);
        assert_eq!(r.details["stdout_truncated"], true);
        assert_eq!(r.details["stdout_bytes"], 300004);
        let s = r.details["stdout"].as_str().unwrap();
        assert!(s.len() < CAP + 200 && s.ends_with("END\n"));
    }

    #[test]
    fn bad_params_are_refused_naming_the_field() {
        let d = tempfile::tempdir().unwrap();
        let r = run(&ctx(d.path()), &json!({"script": 5}));
        assert_eq!(r.status, Status::Refused);
        assert!(r.message.contains("invalid type"), "{}", r.message);
        let r = run(&ctx(d.path()), &json!({"script": "true", "timeout": 3}));
        assert!(r.message.contains("timeout"), "{}", r.message);
        let r = run(&ctx(d.path()), &json!({}));
        assert!(r.message.contains("script"), "{}", r.message);
    }
}
