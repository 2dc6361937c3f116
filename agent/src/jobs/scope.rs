//! Jobs outside the agent's lifetime and sandbox (RunScript, ExtendPartition,
//! InitializeDisk): each runs in a process of its own, the *runner*
//! (`xcp-vm-agent __job STATE_DIR STEM FSTAB`, not in `--help`), so a
//! restart, upgrade or crash of the agent never ends it.
//!
//! - On systemd the runner is started by PID 1 as the transient service
//!   `xcp-vm-agent-job-<stem>` (`systemd-run --collect`): its own cgroup,
//!   none of the agent unit's hardening, `KillMode=control-group` (when the
//!   runner exits, on timeout or not, whatever its job left is killed).
//! - Elsewhere (or when `systemd-run` fails) the agent forks it in a session
//!   of its own (`setsid`): an init script's stop signals the agent's pid
//!   only, so the runner lives on; RunScript makes it the subreaper of its
//!   script.
//!
//! The runner and the agent meet in `running/`: `<stem>.json` is the job
//! (the agent's start marker), `<stem>.lock` is `flock`ed by the runner for
//! its whole life and holds what happened: empty (not started), `run` (the
//! job started: it is never started again) or `gone` (the agent gave up on
//! a runner that had not started, which then never starts it). The runner
//! spools the result itself (`state::finish_in`: spool, then marker, then
//! lock). The agent, now or after a restart, waits while the lock is held;
//! a free lock with the marker still there means the runner died (or never
//! started): the job is reported `interrupted`, never run again. A runner
//! that cannot spool its result (full disk) writes it after `run` in its
//! lock file, where room for it was reserved (`fallocate`) at the start;
//! the agent takes it from there. This module is the runner's side and the
//! launch; reading where a job stands (`check`, `Runner`) is the state
//! layer's (`state::running`, re-exported here), so `state` imports nothing
//! from `jobs`.
use std::fs;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::jobs::{execute, Job, JobContext};
use crate::protocol::Operation;
pub use crate::state::running::{check, Runner};
use crate::state::running::{lock, running};

/// The operations run by a runner of their own.
pub const SCOPED: &[Operation] = &[Operation::RunScript, Operation::ExtendPartition, Operation::InitializeDisk];

/// Start the runner of the job whose marker is `running/<stem>.json`.
pub fn launch(dir: &Path, stem: &str, fstab: &Path) -> std::io::Result<()> {
    // After an upgrade replaced the file, /proc/self/exe reads "... (deleted)":
    // the new binary runs the job then, which is what an upgrade means.
    let exe = std::env::current_exe()?;
    let exe = PathBuf::from(exe.to_string_lossy().trim_end_matches(" (deleted)"));
    let args = [exe.as_os_str(), "__job".as_ref(), dir.as_os_str(), stem.as_ref(), fstab.as_os_str()];
    if crate::disk::mount::systemd_is_pid1() {
        let o = Command::new("systemd-run")
            .args([
                "--quiet",
                "--collect",
                &format!("--unit=xcp-vm-agent-job-{}", stem.trim_start_matches('=')),
                "--description=xcp-vm-agent job",
                "--property=KillMode=control-group",
            ])
            .args(args)
            .stdin(Stdio::null())
            .output();
        match o {
            Ok(o) if o.status.success() => return Ok(()),
            Ok(o) => {
                tracing::warn!(
                    "systemd-run failed ({}), running the job under the agent",
                    String::from_utf8_lossy(&o.stderr).trim()
                )
            }
            Err(e) => tracing::warn!("cannot run systemd-run ({e}), running the job under the agent"),
        }
    }
    let mut c = Command::new(args[0]);
    c.args(&args[1..]).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    // SAFETY: setsid is async-signal-safe.
    unsafe { c.pre_exec(|| nix::unistd::setsid().map(drop).map_err(Into::into)) };
    c.spawn().map(drop)
}

/// `xcp-vm-agent __job STATE_DIR STEM FSTAB`: run the job of marker
/// `running/<stem>.json` once, spool its result. Returns the exit code.
pub fn runner(dir: &Path, stem: &str, fstab: &Path) -> i32 {
    let Ok(Some(mut l)) = lock(dir, stem, true) else { return 1 };
    let job: Option<Job> = fs::read(running(dir, stem, "json")).ok().and_then(|b| serde_json::from_slice(&b).ok());
    let Some(job) = job else {
        // Ended, or given up on and reported: nothing to run.
        let _ = fs::remove_file(running(dir, stem, "lock"));
        return 0;
    };
    let mut s = String::new();
    let _ = l.read_to_string(&mut s);
    // Started before (never twice), or given up on.
    if !s.is_empty() || l.write_all(b"run").and_then(|_| l.sync_all()).is_err() {
        return 1;
    }
    // Room for the result in the lock file, should the spool be full when
    // the job ends (a script filling the disk).
    let room = crate::state::RESULT_MAX_BYTES as i64 + 4096;
    let _ = nix::fcntl::fallocate(&*l, nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE, 0, room);
    let ctx = JobContext::new(dir.into(), fstab.into(), false);
    // The agent checked the allowlist before it started this runner.
    let r = execute(&ctx, &job, Operation::parse(&job.operation).as_slice());
    match crate::state::finish_in(dir, &r) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(job = %job.id, "cannot spool the result, leaving it to the agent in the lock file: {e:#}");
            let b = serde_json::to_vec(&r.bounded(crate::state::RESULT_MAX_BYTES)).unwrap_or_default();
            let _ = l.write_all(b"\n").and_then(|_| l.write_all(&b)).and_then(|_| l.sync_all());
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_runs_once_and_a_runner_given_up_on_never_starts_it() {
        let d = tempfile::tempdir().unwrap();
        let st = crate::state::State::open(d.path()).unwrap();
        let out = d.path().join("out");
        let job = |id: &str| Job {
            id: id.into(),
            operation: "RunScript".into(),
            params: serde_json::json!({"script": format!("echo {id} >> {}", out.display())}),
        };
        let write =
            |j: &Job| crate::state::write_atomic(&running(d.path(), &j.id, "json"), &serde_json::to_vec(j).unwrap());
        let fstab = Path::new("/nonexistent");
        write(&job("a")).unwrap();
        // Not started yet: running unless given up on.
        assert_eq!(check(d.path(), "a", false), Runner::Running);
        assert_eq!(runner(d.path(), "a", fstab), 0);
        assert_eq!(check(d.path(), "a", true), Runner::Ended);
        assert_eq!(st.pending().len(), 1);
        assert!(!running(d.path(), "a", "lock").exists());
        // A marker whose runner started and died: lost, and a second runner
        // does not run it again.
        write(&job("b")).unwrap();
        fs::write(running(d.path(), "b", "lock"), "run").unwrap();
        assert_eq!(check(d.path(), "b", false), Runner::Lost(None));
        assert_eq!(runner(d.path(), "b", fstab), 1);
        // Given up on before it started: never runs.
        write(&job("c")).unwrap();
        assert_eq!(check(d.path(), "c", true), Runner::Lost(None));
        assert_eq!(runner(d.path(), "c", fstab), 1);
        assert_eq!(fs::read_to_string(&out).unwrap(), "a\n");
        // A result left in the lock file is taken from there.
        let mut r = crate::jobs::JobResult::succeeded("ok");
        r.job_id = "b".into();
        fs::write(running(d.path(), "b", "lock"), format!("run\n{}", serde_json::to_string(&r).unwrap())).unwrap();
        assert_eq!(check(d.path(), "b", false), Runner::Lost(Some(r)));
        // A held lock is a running job.
        let _held = lock(d.path(), "b", false).unwrap().unwrap();
        assert_eq!(check(d.path(), "b", true), Runner::Running);
    }
}
