//! RunScript: run a bash script with a timeout and capture its output.
//!
//! The script is written to a private file (0700) in `state_dir/scripts` and
//! run as `/bin/bash FILE ARGS...` in its own process group, with a random
//! token in `XCP_VM_AGENT_JOB`. The job ends when bash ends: output is
//! collected for [`OUTPUT_GRACE`] more, then every process the script
//! started and left running is ended, even one that called `setsid` or
//! double-forked: this process is a child subreaper while a script runs, so
//! orphans come back to it, and the tree is walked in `/proc` (bash's
//! descendants, and returned orphans carrying the token, with theirs). On
//! timeout (or agent shutdown) the same tree gets SIGTERM, then SIGKILL
//! after [`GRACE`]. The result says how many processes were killed
//! (`processes_killed`). A reader blocked on a pipe held by a process out of
//! reach is left behind, never waited for, so no script can wedge the agent.
//! stdout and stderr are each capped at [`CAP`] bytes, keeping the
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
use std::sync::PoisonError;
use std::time::{Duration, Instant};

use crate::jobs::{parse_params, JobContext, JobResult, Status};

/// Bytes kept of each output stream.
pub const CAP: usize = 64 * 1024;
/// Time between SIGTERM and SIGKILL.
const GRACE: Duration = Duration::from_secs(5);
/// How long output is still collected after bash has exited.
const OUTPUT_GRACE: Duration = Duration::from_secs(2);

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

type Capture = std::sync::Arc<std::sync::Mutex<HeadTail>>;

/// Read a pipe into a shared capture; `done` counts the pipes at their end.
/// A reader blocked on a pipe some escaped process still holds is left
/// behind, never waited for.
fn reader(mut r: impl Read + Send + 'static, done: std::sync::Arc<std::sync::atomic::AtomicUsize>) -> Capture {
    let cap: Capture = std::sync::Arc::new(std::sync::Mutex::new(HeadTail::new(CAP)));
    let c = cap.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => c.lock().unwrap_or_else(PoisonError::into_inner).push(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        done.fetch_add(1, Ordering::SeqCst);
    });
    cap
}

/// How many scripts run in this process: it is a child subreaper while
/// at least one does, so processes a script orphans (`setsid cmd &`, double
/// forks, `nohup`) become our children instead of init's and stay in reach.
static SCRIPTS_RUNNING: std::sync::Mutex<usize> = std::sync::Mutex::new(0);

struct Subreaper;
impl Subreaper {
    fn enter() -> Subreaper {
        let mut n = SCRIPTS_RUNNING.lock().unwrap_or_else(PoisonError::into_inner);
        if *n == 0 {
            let _ = nix::sys::prctl::set_child_subreaper(true);
        }
        *n += 1;
        Subreaper
    }
}
impl Drop for Subreaper {
    fn drop(&mut self) {
        let mut n = SCRIPTS_RUNNING.lock().unwrap_or_else(PoisonError::into_inner);
        *n -= 1;
        if *n == 0 {
            let _ = nix::sys::prctl::set_child_subreaper(false);
        }
    }
}

/// (pid, parent pid, process group, zombie) of every process, from /proc.
fn process_table() -> Vec<(i32, i32, i32, bool)> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        // "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else { continue };
        let mut f = rest.split_whitespace();
        let dead = matches!(f.next(), Some("Z" | "X"));
        if let (Some(Ok(ppid)), Some(Ok(pgrp))) = (f.next().map(str::parse), f.next().map(str::parse)) {
            v.push((pid, ppid, pgrp, dead));
        }
    }
    v
}

/// Reap the zombies among this process's children outside its own process
/// group, but `keep`: orphans of scripts that came back to the subreaper and
/// ended by themselves (else each stays a zombie for ever). A command another
/// thread runs stays in the agent's group and is waited for by its owner.
pub fn reap_orphans(keep: i32) {
    let me = std::process::id() as i32;
    let group = nix::unistd::getpgrp().as_raw();
    for (pid, ppid, pgrp, dead) in process_table() {
        if dead && ppid == me && pgrp != group && pid != keep {
            let _ =
                nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), Some(nix::sys::wait::WaitPidFlag::WNOHANG));
        }
    }
}

fn has_token(pid: i32, token: &str) -> bool {
    let want = format!("XCP_VM_AGENT_JOB={token}");
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|env| env.split(|b| *b == 0).any(|kv| kv == want.as_bytes()))
        .unwrap_or(false)
}

/// Every live process the script started: bash and its descendants, and
/// the orphans that came back to this process (the subreaper) carrying the
/// job's token in their environment, with their descendants.
fn script_processes(bash: i32, token: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let table = process_table();
    // Dead ones: nothing to kill, only to reap.
    let live = || table.iter().filter(|p| !p.3);
    let mut set: Vec<i32> =
        live().filter(|p| p.0 == bash || (p.1 == me && has_token(p.0, token))).map(|p| p.0).collect();
    let mut i = 0;
    while i < set.len() {
        let parent = set[i];
        for &(pid, ppid, ..) in live() {
            if ppid == parent && !set.contains(&pid) {
                set.push(pid);
            }
        }
        i += 1;
    }
    set
}

/// End every process the script started: SIGTERM, up to `grace` for them to
/// go, then SIGKILL, again until none is left (a process may fork while we
/// look). `bash` while it is not reaped (never signalled after: its pid
/// may be another process's by then), else 0. Returns how many distinct
/// processes were signalled.
fn kill_tree(bash: i32, token: &str, grace: Duration) -> usize {
    use nix::sys::signal::{kill, Signal};
    let pid = |p: i32| nix::unistd::Pid::from_raw(p);
    let mut killed: Vec<i32> = script_processes(bash, token);
    if killed.is_empty() {
        return 0;
    }
    for p in &killed {
        let _ = kill(pid(*p), Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        reap_orphans(bash);
        if script_processes(bash, token).is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for _ in 0..100 {
        reap_orphans(bash);
        let left = script_processes(bash, token);
        if left.is_empty() {
            break;
        }
        for p in left {
            let _ = kill(pid(p), Signal::SIGKILL);
            if !killed.contains(&p) {
                killed.push(p);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    reap_orphans(bash);
    killed.len()
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
    let _subreaper = Subreaper::enter();
    let token = crate::backoff::Rng::from_entropy().hex_id();
    let mut cmd = Command::new("/bin/bash");
    cmd.arg(&path)
        .args(&p.args)
        .envs(&p.env)
        .env("XCP_VM_AGENT_JOB", &token)
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return JobResult::failed(format!("cannot start /bin/bash: {e}")),
    };
    let bash = child.id() as i32;
    let done: std::sync::Arc<std::sync::atomic::AtomicUsize> = Default::default();
    let out = reader(child.stdout.take().expect("stdout is piped above"), done.clone());
    let err = reader(child.stderr.take().expect("stderr is piped above"), done.clone());
    // Both pipes at their end, or `until` passed.
    let wait_pipes = |until: Instant| {
        while done.load(Ordering::SeqCst) < 2 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let timeout = Duration::from_secs(p.timeout_seconds);
    let mut timed_out = false;
    let mut cancelled = false;
    let mut killed = 0;
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
            killed = kill_tree(bash, &token, GRACE);
            break child.wait().ok();
        }
        std::thread::sleep(
            Duration::from_millis(20).min(timeout.saturating_sub(start.elapsed())).max(Duration::from_millis(1)),
        );
    };
    // bash has ended, and the job with it. Output still in the pipes is
    // collected for a short grace; whatever the script left running is then
    // ended, whether it holds the pipes or not.
    wait_pipes(Instant::now() + OUTPUT_GRACE);
    // bash is reaped: its pid may be another process's now.
    let leftover = kill_tree(0, &token, GRACE);
    killed += leftover;
    // Pipes held only by what was just killed are at their end now.
    wait_pipes(Instant::now() + Duration::from_millis(500));
    let ended = done.load(Ordering::SeqCst);
    let stdout = std::mem::take(&mut *out.lock().unwrap_or_else(PoisonError::into_inner));
    let stderr = std::mem::take(&mut *err.lock().unwrap_or_else(PoisonError::into_inner));
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
        "leftover_processes_terminated": leftover > 0,
        "processes_killed": killed,
        "output_complete": ended == 2,
        "duration_ms": u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
    });
    let r = if cancelled {
        JobResult::new(
            Status::Interrupted,
            format!("the agent was stopped while the script ran; {killed} process(es) it started were killed"),
        )
    } else if timed_out {
        JobResult::failed(format!(
            "script timed out after {} s; {killed} process(es) it started were killed",
            p.timeout_seconds
        ))
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

    /// Failed before: the reader threads waited for the pipes the escaped
    /// `setsid sleep` held, so the job (and the agent) never ended.
    #[test]
    fn a_script_ends_when_bash_ends_even_with_escaped_children() {
        let d = tempfile::tempdir().unwrap();
        let t0 = Instant::now();
        let r = run(
            &ctx(d.path()),
            &json!({"script": "setsid sleep 1000 & nohup sleep 1000 & (setsid sh -c 'sleep 1000 &') ; echo bye",
                    "timeout_seconds": 600}),
        );
        assert_eq!(r.status, Status::Succeeded, "{r:?}");
        assert_eq!(
            r.details["stdout"],
            "bye
"
        );
        assert!(t0.elapsed() < Duration::from_secs(15), "took {:?}", t0.elapsed());
        assert_eq!(r.details["processes_killed"], 3, "{r:?}");
    }

    /// Failed before: `setsid` put a child out of the process group, so the
    /// timeout killed bash and left it running (and the job wedged on it).
    #[test]
    fn timeout_kills_every_process_including_setsid_ones() {
        let d = tempfile::tempdir().unwrap();
        let pidfile = d.path().join("pids");
        let r = run(
            &ctx(d.path()),
            &json!({"script": format!(
                "setsid sh -c 'echo $$ >> {p}; exec sleep 1000' &\n(sleep 1000 & echo $! >> {p})\nsleep 1000",
                p = pidfile.display()), "timeout_seconds": 2}),
        );
        assert_eq!(r.status, Status::Failed);
        assert_eq!(r.details["timed_out"], true);
        assert!(r.details["processes_killed"].as_u64().unwrap() >= 3, "{r:?}");
        assert!(r.message.contains("killed"), "{}", r.message);
        for pid in std::fs::read_to_string(&pidfile).unwrap().lines() {
            let pid: i32 = pid.trim().parse().unwrap();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let alive = !stat.is_empty() && !stat.contains(") Z ");
            assert!(!alive, "process {pid} survived the timeout: {stat}");
        }
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
        assert_eq!(r.status, Status::Refused);
        assert!(r.message.contains("unknown field `timeout`"), "{}", r.message);
        // Every RunScript message names RunScript: the field must be named
        // as the missing one.
        let r = run(&ctx(d.path()), &json!({}));
        assert_eq!(r.status, Status::Refused);
        assert!(r.message.contains("missing field `script`"), "{}", r.message);
    }
}
