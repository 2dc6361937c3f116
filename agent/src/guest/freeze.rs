//! FreezeFilesystems and ThawFilesystems (`FIFREEZE`/`FITHAW`), the thaw
//! guard, and how the agent keeps off a frozen state directory.
//!
//! **The guard.** A freeze is made by a small process forked (twice, so it
//! belongs to init, not to the agent) before anything is frozen: it holds
//! an open descriptor of each mount point, freezes them deepest first,
//! reports each outcome through a pipe, then waits for the deadline (or
//! SIGTERM/SIGINT/SIGHUP) and thaws what it froze, shallowest first. It
//! calls nothing but system calls (no allocation after `fork`), closes every
//! other descriptor (the state directory's lock is not kept alive by it),
//! and is named `xcp-thaw-guard`. So the thaw happens at the deadline
//! whatever becomes of the agent: SIGKILL, restart, a server that never
//! answers. Under systemd the guard execs `systemd-run --scope` which execs
//! `xcp-vm-agent __thaw-guard` (same pid, same descriptors): a scope unit of
//! its own. In the service's cgroup, systemd ended it with the rest of the
//! cgroup when the SIGKILLed agent was restarted (or the service stopped),
//! and the filesystem thawed at once instead of at the deadline (found by
//! the VM matrix's `freeze-deadline`). When `systemd-run` is missing or
//! fails, the guard is the forked process itself. A guard whose agent is
//! gone before it froze anything (its pipe has no reader) freezes nothing.
//!
//! **The record.** `freeze.json` in the run directory (`/run/xcp-vm-agent`,
//! a tmpfs; `XCP_AGENT_RUN_DIR` for tests) says what is frozen, until when
//! and by which guard. It is never on a frozen filesystem: the filesystem
//! holding it is not frozen (refused when named, skipped otherwise). A
//! record whose guard is gone before the deadline is thawed at once by the
//! next agent that reads it (someone SIGKILLed the whole service).
//!
//! **Never blocking on a frozen filesystem.** While the state directory's
//! filesystem is frozen ([`blocks`]), the daemon writes nothing there: the
//! result of the freeze job and of jobs arriving meanwhile are kept in
//! memory ([`defer`]) and sent to the server from there; only Freeze and
//! Thaw run (other jobs are refused, saying why); once thawed, [`settle`]
//! writes them to the state directory as usual. The log file is not written
//! while a freeze is in force (lines still go to stderr). Reading (stat,
//! open for ioctl, reading the spool) does not block on a frozen filesystem;
//! only writes do.
use anyhow::{anyhow, bail, Context, Result};
use nix::libc;
use serde_json::{json, Value};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use crate::context::JobContext;
use crate::logging::{now_unix, rfc3339};
use crate::protocol::{Job, JobResult};

const FIFREEZE: u64 = 0xC004_5877; // _IOWR('X', 119, int)
const FITHAW: u64 = 0xC004_5878; // _IOWR('X', 120, int)
/// Longest freeze a job may ask for.
pub const MAX_THAW_AFTER: u64 = 600;
const GUARD_NAME: &str = "xcp-thaw-guard";
/// The hidden subcommand the guard runs as under systemd (not in `--help`).
pub const GUARD_ARG: &str = "__thaw-guard";

/// One frozen filesystem in the record.
#[derive(Debug, Clone, PartialEq)]
pub struct Frozen {
    pub mount_point: String,
    pub device: String,
    pub fstype: String,
    /// `st_dev` of the mount point: what a path on it stats to.
    pub dev: u64,
}

/// `freeze.json` in the run directory. (JSON by hand, through
/// `serde_json::Value`: derives cost binary size.)
#[derive(Debug, Clone)]
pub struct Record {
    pub frozen: Vec<Frozen>,
    pub frozen_at: u64,
    pub thaw_at: u64,
    pub guard_pid: i32,
}

impl Record {
    fn to_json(&self) -> Value {
        let f: Vec<Value> = self
            .frozen
            .iter()
            .map(|f| json!({"mount_point": f.mount_point, "device": f.device, "type": f.fstype, "dev": f.dev}))
            .collect();
        json!({"frozen": f, "frozen_at": self.frozen_at, "thaw_at": self.thaw_at, "guard_pid": self.guard_pid})
    }
    fn from_json(v: &Value) -> Option<Record> {
        let s = |v: &Value, k: &str| v[k].as_str().map(str::to_string);
        let mut frozen = Vec::new();
        for f in v["frozen"].as_array()? {
            frozen.push(Frozen {
                mount_point: s(f, "mount_point")?,
                device: s(f, "device")?,
                fstype: s(f, "type")?,
                dev: f["dev"].as_u64()?,
            });
        }
        Some(Record {
            frozen,
            frozen_at: v["frozen_at"].as_u64()?,
            thaw_at: v["thaw_at"].as_u64()?,
            guard_pid: i32::try_from(v["guard_pid"].as_i64()?).ok()?,
        })
    }
}

pub fn run_dir() -> PathBuf {
    std::env::var_os("XCP_AGENT_RUN_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/run/xcp-vm-agent"))
}

fn record_path() -> PathBuf {
    run_dir().join("freeze.json")
}

/// Whether `pid` is a live thaw guard (not a zombie, not a reused pid).
pub fn guard_alive(pid: i32) -> bool {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    let Some(open) = s.find('(') else { return false };
    let Some(close) = s.rfind(')') else { return false };
    let state = s[close + 1..].trim_start().chars().next().unwrap_or('X');
    &s[open + 1..close] == GUARD_NAME && !matches!(state, 'Z' | 'X' | 'x')
}

fn ioctl0(fd: i32, req: u64) -> std::result::Result<(), i32> {
    // SAFETY: FIFREEZE/FITHAW take an int argument that the kernel ignores.
    let r = unsafe { libc::ioctl(fd, req as _, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

/// FITHAW on a mount point: Ok(true) thawed, Ok(false) was not frozen.
fn thaw_path(mp: &str) -> Result<bool> {
    let fd = super::open_dir(mp).with_context(|| format!("cannot open {mp}"))?;
    match ioctl0(fd.as_raw_fd(), FITHAW) {
        Ok(()) => Ok(true),
        Err(libc::EINVAL) => Ok(false),
        Err(e) => Err(anyhow!("FITHAW {mp}: {}", std::io::Error::from_raw_os_error(e))),
    }
}

/// The freeze in force, if any. A stale record is cleaned up here: its
/// guard gone before the deadline means it was killed, and what it froze is
/// thawed now; gone after the deadline means it did its work.
pub fn in_force() -> Option<Record> {
    let p = record_path();
    let text = std::fs::read_to_string(&p).ok()?;
    let rec = match serde_json::from_str::<Value>(&text).ok().as_ref().and_then(Record::from_json) {
        Some(r) => r,
        None => {
            let _ = std::fs::remove_file(&p);
            return None;
        }
    };
    if guard_alive(rec.guard_pid) {
        crate::logging::hold_file_until(rec.thaw_at);
        return Some(rec);
    }
    if now_unix() < rec.thaw_at {
        tracing::warn!("the thaw guard is gone before its deadline: thawing now");
        for f in rec.frozen.iter().rev() {
            let _ = thaw_path(&f.mount_point);
        }
    }
    let _ = std::fs::remove_file(&p);
    crate::logging::hold_file_until(0);
    None
}

/// Whether `path` lies on a filesystem frozen now (so writing there would
/// block). Stat does not block on a frozen filesystem.
pub fn blocks(path: &Path) -> bool {
    let Some(rec) = in_force() else { return false };
    let Ok(md) = std::fs::metadata(path) else { return false };
    rec.frozen.iter().any(|f| f.dev == md.dev())
}

fn read_only(mp: &str) -> bool {
    let c = super::cpath(mp);
    // SAFETY: a valid path and a zeroed out struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    unsafe { libc::statvfs(c.as_ptr(), &mut st) == 0 && st.f_flag & libc::ST_RDONLY != 0 }
}

fn errno_text(e: i32) -> String {
    match e {
        libc::EOPNOTSUPP => "the filesystem does not support freezing".into(),
        libc::EBUSY => "already frozen (not by this agent)".into(),
        _ => std::io::Error::from_raw_os_error(e).to_string(),
    }
}

/// FreezeFilesystems.
pub fn run(ctx: &JobContext, params: &Value) -> JobResult {
    const OP: &str = "FreezeFilesystems";
    let (named, thaw_after) = match super::params(OP, params, &["mount_points", "thaw_after_seconds"])
        .and_then(|m| Ok((super::mount_points(OP, m)?, super::opt_u64(OP, m, "thaw_after_seconds")?)))
    {
        Ok(x) => x,
        Err(r) => return r,
    };
    let thaw_after = thaw_after.unwrap_or(0);
    if !(1..=MAX_THAW_AFTER).contains(&thaw_after) {
        return JobResult::refused(format!(
            "thaw_after_seconds is required, 1 to {MAX_THAW_AFTER} (got {thaw_after}): a freeze always has a deadline"
        ));
    }
    if let Some(rec) = in_force() {
        return JobResult::no_change(format!(
            "already frozen until {}: {}; send ThawFilesystems first",
            rfc3339(rec.thaw_at),
            rec.frozen.iter().map(|f| f.mount_point.as_str()).collect::<Vec<_>>().join(", ")
        ))
        .with_details(rec.to_json());
    }
    let mut targets = match super::targets(&named) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let rd = run_dir();
    let _ = std::fs::create_dir_all(&rd);
    let run_dev = std::fs::metadata(&rd).map(|m| m.dev()).ok();
    let mut skipped = Vec::new();
    if let Some(i) = targets.iter().position(|t| Some(t.1) == run_dev) {
        let why = format!("{}: holds the agent's run directory {}", targets[i].0.mount_point, rd.display());
        if named.is_some() {
            return JobResult::refused(why);
        }
        skipped.push(why);
        targets.remove(i);
    }
    // Read-only: nothing to make consistent (and docs/protocol.md promises
    // "writable" only). Refused when named, skipped otherwise.
    let mut i = 0;
    while i < targets.len() {
        if !read_only(&targets[i].0.mount_point) {
            i += 1;
            continue;
        }
        let why = format!("{}: read-only", targets[i].0.mount_point);
        if named.is_some() {
            return JobResult::refused(format!("{why}; nothing was done"));
        }
        skipped.push(why);
        targets.remove(i);
    }
    if targets.is_empty() {
        return JobResult::refused("no local filesystem to freeze").with_details(json!({"skipped": skipped}));
    }
    // Deepest first (insertion sort: a few items, and no sort code
    // instantiated for this type).
    for i in 1..targets.len() {
        let mut j = i;
        while j > 0 && super::depth(&targets[j].0.mount_point) > super::depth(&targets[j - 1].0.mount_point) {
            targets.swap(j, j - 1);
            j -= 1;
        }
    }
    let thaw_at = now_unix() + thaw_after;
    if ctx.runner.dry_run() {
        for t in &targets {
            ctx.runner.note(format!("FIFREEZE {}", t.0.mount_point));
        }
        ctx.runner.note(format!("thaw guard: FITHAW in reverse order at {}", rfc3339(thaw_at)));
        return JobResult::succeeded("dry run").with_details(json!({"skipped": skipped}));
    }
    let mut fds = Vec::new();
    for t in &targets {
        match super::open_dir(&t.0.mount_point) {
            Ok(fd) => fds.push(fd),
            Err(e) => return JobResult::failed(format!("{}: {e}; nothing was frozen", t.0.mount_point)),
        }
    }
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let scoped = spawn_guard(&raw, thaw_after, true).map_err(|e| tracing::warn!("{e:#}; the guard runs forked"));
    let (guard_pid, errs) = match scoped.or_else(|_| spawn_guard(&raw, thaw_after, false)) {
        Ok(x) => x,
        Err(e) => return JobResult::failed(format!("{e:#}")),
    };
    let mut frozen = Vec::new();
    for ((m, dev), e) in targets.into_iter().zip(errs) {
        if e == 0 {
            frozen.push(Frozen { mount_point: m.mount_point, device: m.source, fstype: m.fstype, dev });
        } else {
            skipped.push(format!("{}: {}", m.mount_point, errno_text(e)));
        }
    }
    if frozen.is_empty() {
        return JobResult::failed("no filesystem could be frozen").with_details(json!({"skipped": skipped}));
    }
    let rec = Record { frozen, frozen_at: now_unix(), thaw_at, guard_pid };
    crate::logging::hold_file_until(thaw_at);
    if let Err(e) = crate::state::write_atomic(&record_path(), rec.to_json().to_string().as_bytes()) {
        // Without the record nobody knows to thaw early: undo now.
        stop_guard(guard_pid);
        return JobResult::failed(format!("{e:#}; thawed again"));
    }
    let mut details = rec.to_json();
    details["skipped"] = json!(skipped);
    JobResult::succeeded(format!(
        "froze {} filesystem(s) until {} ({thaw_after} s)",
        rec.frozen.len(),
        rfc3339(thaw_at)
    ))
    .with_details(details)
}

/// ThawFilesystems.
pub fn thaw(ctx: &JobContext, params: &Value) -> JobResult {
    const OP: &str = "ThawFilesystems";
    let named = match super::params(OP, params, &["mount_points"]).and_then(|m| super::mount_points(OP, m)) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let rec = in_force();
    let mut order: Vec<String> =
        rec.iter().flat_map(|r| r.frozen.iter().rev().map(|f| f.mount_point.clone())).collect();
    if named.is_some() {
        match super::targets(&named) {
            Ok(t) => order.extend(t.into_iter().map(|t| t.0.mount_point)),
            Err(r) => return r,
        }
    }
    let mut thawed = Vec::new();
    let mut errors = Vec::new();
    for mp in &order {
        if ctx.runner.dry_run() {
            ctx.runner.note(format!("FITHAW {mp}"));
            continue;
        }
        match thaw_path(mp) {
            Ok(true) if !thawed.contains(mp) => thawed.push(mp.clone()),
            Ok(_) => {}
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    if let Some(r) = rec.filter(|_| !ctx.runner.dry_run()) {
        stop_guard(r.guard_pid);
        let _ = std::fs::remove_file(record_path());
        crate::logging::hold_file_until(0);
    }
    let details = json!({"thawed": thawed, "errors": errors});
    if !errors.is_empty() {
        JobResult::failed(errors.join("; ")).with_details(details)
    } else if thawed.is_empty() && !ctx.runner.dry_run() {
        JobResult::no_change("nothing was frozen").with_details(details)
    } else {
        JobResult::succeeded(format!("thawed {}", thawed.join(", "))).with_details(details)
    }
}

/// Tell a guard to thaw and exit, and wait (up to 2 s) until it has: a guard
/// thawing late must not thaw a freeze made after this one.
fn stop_guard(pid: i32) {
    if !guard_alive(pid) {
        return;
    }
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while guard_alive(pid) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

fn monotonic_now() -> libc::timespec {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts
}

fn max_fd() -> i32 {
    let mut rl = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: valid out pointer.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) };
    (rl.rlim_cur as i64).clamp(1024, 65536) as i32
}

/// Under systemd: `systemd-run --scope ... -- AGENT __thaw-guard PIPE NULL
/// SEC NSEC FD...` (see the module header); `None` elsewhere.
fn scope_argv(fds: &[i32], pipe_w: i32, nullfd: i32, deadline: &libc::timespec) -> Option<Vec<std::ffi::CString>> {
    if !Path::new("/run/systemd/system").is_dir() {
        return None;
    }
    let run = ["/usr/bin/systemd-run", "/bin/systemd-run"].into_iter().find(|p| Path::new(p).exists())?;
    // An upgraded binary reads "... (deleted)": no such file, no scope.
    let exe = std::fs::read_link("/proc/self/exe").ok().filter(|e| e.exists())?;
    let mut a: Vec<String> = ["--scope", "--quiet", "--collect"].iter().map(|s| s.to_string()).collect();
    a.insert(0, run.into());
    a.push(format!("--unit={GUARD_NAME}-{}-{}", std::process::id(), deadline.tv_nsec));
    a.extend(["--".into(), exe.to_str()?.into(), GUARD_ARG.into()]);
    a.extend([pipe_w as i64, nullfd as i64, deadline.tv_sec, deadline.tv_nsec].iter().map(i64::to_string));
    a.extend(fds.iter().map(i32::to_string));
    a.into_iter().map(|s| std::ffi::CString::new(s).ok()).collect()
}

/// `xcp-vm-agent __thaw-guard PIPE NULL SEC NSEC FD...`: the guard after
/// `systemd-run --scope` (see the module header). Never returns.
pub fn guard_exec(args: &[String]) -> ! {
    let int = |i: usize| args.get(i).and_then(|a| a.parse::<i32>().ok()).filter(|&x| x >= 0);
    let long = |i: usize| args.get(i).and_then(|a| a.parse::<i64>().ok()).filter(|&x| x >= 0);
    let fds: Option<Vec<i32>> = (4..args.len()).map(int).collect();
    match (int(0), int(1), long(2), long(3), fds) {
        (Some(pipe_w), Some(nullfd), Some(tv_sec), Some(tv_nsec), Some(fds)) if !fds.is_empty() => {
            let mut keep = fds.clone();
            keep.extend([pipe_w, nullfd]);
            let deadline = libc::timespec { tv_sec, tv_nsec };
            // SAFETY: the descriptors were handed over by the agent for this.
            unsafe { guard_main(&fds, &keep, max_fd(), nullfd, pipe_w, deadline, b"xcp-thaw-guard\0") }
        }
        // SAFETY: leaving at once, nothing to clean up.
        _ => unsafe { libc::_exit(2) },
    }
}

/// Fork the guard (see the module header; `scoped`: through `systemd-run`
/// when systemd runs). Returns its pid and, per fd, 0 (frozen) or the
/// errno of FIFREEZE.
fn spawn_guard(fds: &[i32], secs: u64, scoped: bool) -> Result<(i32, Vec<i32>)> {
    // Everything the child needs is prepared here: after fork it only makes
    // system calls.
    let null = super::cpath("/dev/null");
    // SAFETY: valid path.
    let nullfd = unsafe { libc::open(null.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if nullfd < 0 {
        bail!("cannot open /dev/null: {}", std::io::Error::last_os_error());
    }
    let mut pipe = [0i32; 2];
    // SAFETY: valid out array.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        let e = std::io::Error::last_os_error();
        unsafe { libc::close(nullfd) };
        bail!("cannot create a pipe: {e}");
    }
    let mut keep: Vec<i32> = fds.to_vec();
    keep.push(pipe[1]);
    keep.push(nullfd);
    let max_fd = max_fd();
    let mut deadline = monotonic_now();
    deadline.tv_sec += secs as i64;
    let name = *b"xcp-thaw-guard\0";
    let argv = if scoped {
        match scope_argv(fds, pipe[1], nullfd, &deadline) {
            Some(a) => a,
            None => {
                unsafe { libc::close(nullfd) };
                unsafe { libc::close(pipe[0]) };
                unsafe { libc::close(pipe[1]) };
                bail!("no systemd-run to give the thaw guard a scope of its own");
            }
        }
    } else {
        Vec::new()
    };
    let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|c| c.as_ptr()).collect();
    ptrs.push(std::ptr::null());

    // SAFETY: fork in a threaded process; the child below makes only
    // async-signal-safe system calls and leaves with _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        unsafe {
            libc::setsid();
            let p2 = libc::fork();
            if p2 != 0 {
                libc::_exit(if p2 < 0 { 1 } else { 0 });
            }
            if scoped {
                for &fd in &keep {
                    libc::fcntl(fd, libc::F_SETFD, 0);
                }
                libc::execv(ptrs[0], ptrs.as_ptr());
                libc::_exit(127);
            }
            guard_main(fds, &keep, max_fd, nullfd, pipe[1], deadline, &name);
        }
    }
    // SAFETY: closing our copies; the child has its own.
    unsafe {
        libc::close(pipe[1]);
        libc::close(nullfd);
    }
    if pid < 0 {
        let e = std::io::Error::last_os_error();
        unsafe { libc::close(pipe[0]) };
        bail!("cannot fork the thaw guard: {e}");
    }
    let mut st = 0;
    // SAFETY: reaping our own child.
    while unsafe { libc::waitpid(pid, &mut st, 0) } < 0
        && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR)
    {}
    let mut buf = vec![0u8; 4 * (fds.len() + 1)];
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: reading into our buffer.
        let n = unsafe { libc::read(pipe[0], buf[got..].as_mut_ptr().cast(), buf.len() - got) };
        if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        if n <= 0 {
            break;
        }
        got += n as usize;
    }
    unsafe { libc::close(pipe[0]) };
    if got < 4 {
        bail!("the thaw guard did not start; nothing was frozen");
    }
    let word = |i: usize| i32::from_ne_bytes([buf[4 * i], buf[4 * i + 1], buf[4 * i + 2], buf[4 * i + 3]]);
    let guard = word(0);
    if got < buf.len() {
        // The guard died while freezing: it cannot thaw. Do it here.
        for &fd in fds.iter().rev() {
            let _ = ioctl0(fd, FITHAW);
        }
        bail!("the thaw guard {guard} died while freezing; everything it may have frozen was thawed again");
    }
    Ok((guard, (1..=fds.len()).map(word).collect()))
}

/// The guard's life, after the second fork. Never returns.
unsafe fn guard_main(
    fds: &[i32],
    keep: &[i32],
    max_fd: i32,
    nullfd: i32,
    pipe_w: i32,
    deadline: libc::timespec,
    name: &[u8; 15],
) -> ! {
    // SAFETY: the caller's contract (the forked guard, async-signal-safe
    // calls only on descriptors it was given) covers every call below.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, name.as_ptr() as libc::c_ulong, 0, 0, 0);
        libc::dup2(nullfd, 0);
        libc::dup2(nullfd, 1);
        libc::dup2(nullfd, 2);
        for fd in 3..max_fd {
            if !keep.contains(&fd) {
                libc::close(fd);
            }
        }
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        let me = libc::getpid();
        if libc::write(pipe_w, (&me as *const i32).cast(), 4) != 4 {
            // Nobody reads: the agent gave up on this guard. Freeze nothing.
            libc::_exit(1);
        }
        // At most 64 filesystems are tracked for the thaw (more are reported
        // as not frozen).
        let mut froze = [false; 64];
        for (i, &fd) in fds.iter().enumerate() {
            let err: i32 = if i >= froze.len() {
                libc::EMFILE
            } else if libc::ioctl(fd, FIFREEZE as _, 0) == 0 {
                froze[i] = true;
                0
            } else {
                *libc::__errno_location()
            };
            libc::write(pipe_w, (&err as *const i32).cast(), 4);
        }
        libc::close(pipe_w);
        if froze.iter().any(|f| *f) {
            loop {
                let now = monotonic_now();
                if (now.tv_sec, now.tv_nsec) >= (deadline.tv_sec, deadline.tv_nsec) {
                    break;
                }
                let mut left =
                    libc::timespec { tv_sec: deadline.tv_sec - now.tv_sec, tv_nsec: deadline.tv_nsec - now.tv_nsec };
                if left.tv_nsec < 0 {
                    left.tv_sec -= 1;
                    left.tv_nsec += 1_000_000_000;
                }
                if libc::sigtimedwait(&set, std::ptr::null_mut(), &left) > 0 {
                    break;
                }
            }
            for (i, &fd) in fds.iter().enumerate().rev() {
                if i < froze.len() && froze[i] {
                    libc::ioctl(fd, FITHAW as _, 0);
                }
            }
        }
        libc::_exit(0)
    }
}

// ---- the daemon while its state directory is frozen ----

/// Results of jobs started before the freeze: their running marker is on
/// the frozen filesystem, so they are spooled (and the marker dropped) once
/// it thaws. Meanwhile the daemon delivers them from memory.
static UNFINISHED: Mutex<Vec<JobResult>> = Mutex::new(Vec::new());

pub fn defer(r: &JobResult) {
    UNFINISHED.lock().unwrap_or_else(PoisonError::into_inner).push(r.clone());
}

/// A job that arrived while the state directory is frozen (nothing is
/// recorded for it): Freeze and Thaw run (both are safe to repeat: None,
/// the daemon runs it through `jobs::execute`); anything else is refused
/// (the result).
pub fn refuse_while_frozen(job: &Job) -> Option<JobResult> {
    if matches!(job.operation.as_str(), "FreezeFilesystems" | "ThawFilesystems") {
        return None;
    }
    let mut r = JobResult::refused(format!(
        "the agent's state directory is frozen until {}; only ThawFilesystems and FreezeFilesystems run meanwhile",
        rfc3339(crate::logging::file_held_until())
    ));
    r.job_id = job.id.clone();
    r.operation = job.operation.clone();
    r.finished_at = now_unix();
    Some(r)
}

/// Once the state directory is writable again, spool what was kept in
/// memory for it (dropping the copy in `unspooled`).
pub fn settle(state: &mut crate::state::State, unspooled: &mut Vec<JobResult>) -> Result<()> {
    if UNFINISHED.lock().unwrap_or_else(PoisonError::into_inner).is_empty() || blocks(state.dir()) {
        return Ok(());
    }
    let list = std::mem::take(&mut *UNFINISHED.lock().unwrap_or_else(PoisonError::into_inner));
    for r in list {
        state.finish(&r)?;
        unspooled.retain(|u| u.job_id != r.job_id);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn ioctl_numbers_match_linux() {
        // _IOWR('X', 119, int) and _IOWR('X', 120, int) from <linux/fs.h>.
        let iowr = |nr: u64, size: u64| (3u64 << 30) | (size << 16) | ((b'X' as u64) << 8) | nr;
        assert_eq!(super::FIFREEZE, iowr(119, 4));
        assert_eq!(super::FITHAW, iowr(120, 4));
    }

    #[test]
    fn a_missing_guard_is_not_alive() {
        assert!(!super::guard_alive(i32::MAX));
        assert!(!super::guard_alive(std::process::id() as i32), "the test process is not a guard");
    }
}
