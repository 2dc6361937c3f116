//! Where a job given to a runner of its own (`jobs::scope`) stands, read
//! from `running/`: `<stem>.json` is the job (the agent's start marker),
//! `<stem>.lock` is `flock`ed by the runner for its whole life and holds
//! what happened: empty (not started), `run` (the job started: it is never
//! started again, followed by its result when the runner could not spool
//! it) or `gone` (the agent gave up on a runner that had not started).
//! Here, in the state layer, so the recovery at start-up (`State::open`)
//! and the daemon read it without importing `jobs`; the runner itself, and
//! its launch, are `jobs::scope`'s.
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::protocol::JobResult;

/// `running/<stem>.<ext>` of the state directory `dir`.
pub(crate) fn running(dir: &Path, stem: &str, ext: &str) -> PathBuf {
    dir.join("running").join(format!("{stem}.{ext}"))
}

/// The job's lock file, opened and `flock`ed (`wait`: blocking). Err: it
/// cannot be opened or created; Ok(None): another process holds it.
pub(crate) fn lock(dir: &Path, stem: &str, wait: bool) -> std::io::Result<Option<nix::fcntl::Flock<File>>> {
    use nix::fcntl::{Flock, FlockArg::*};
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(running(dir, stem, "lock"))?;
    Ok(Flock::lock(f, if wait { LockExclusive } else { LockExclusiveNonblock }).ok())
}

/// Where a job given to a runner stands.
#[derive(Debug, PartialEq)]
pub enum Runner {
    /// Its runner holds the lock (or, unless given up on, has not started).
    Running,
    /// Its marker is gone: the result is in the spool.
    Ended,
    /// The runner died, or never started and was given up on: the job is
    /// to be reported `interrupted`; or it ended with a result it could not
    /// spool (full disk), which it left in its lock file: here.
    Lost(Option<JobResult>),
}

/// Where the job of marker `running/<stem>.json` stands. `give_up`: a
/// runner that has not started yet never will (after a restart, or past
/// the start deadline); it is marked so it cannot start the job later.
pub fn check(dir: &Path, stem: &str, give_up: bool) -> Runner {
    let mut l = match lock(dir, stem, false) {
        Ok(Some(l)) => l,
        Ok(None) => return Runner::Running,
        Err(_) if !running(dir, stem, "json").exists() => return Runner::Ended,
        Err(_) => return if give_up { Runner::Lost(None) } else { Runner::Running },
    };
    if !running(dir, stem, "json").exists() {
        let _ = fs::remove_file(running(dir, stem, "lock"));
        return Runner::Ended;
    }
    let mut s = String::new();
    let _ = l.read_to_string(&mut s);
    if s.is_empty() {
        if !give_up {
            return Runner::Running;
        }
        let _ = l.write_all(b"gone").and_then(|_| l.sync_all());
    }
    Runner::Lost(s.strip_prefix("run\n").and_then(|j| serde_json::from_str(j).ok()))
}
