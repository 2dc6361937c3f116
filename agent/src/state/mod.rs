//! The agent's durable state in `state_dir` (default `/var/lib/xcp-vm-agent`):
//!
//! - `agent.lock`: flock held by the one agent process using this directory;
//! - `seen-jobs`: ids of jobs already started, one JSON string a line (so an
//!   id holding a newline stays one id), newest last, bounded to
//!   [`SEEN_LIMIT`], so a job delivered twice runs at most once, across restarts;
//! - `running/<stem>.json`: a marker written (and fsynced) before a job starts
//!   and removed (directory fsynced) once its result is spooled; a marker
//!   found at start-up with no spooled result means the agent died mid-job,
//!   and becomes an `interrupted` result; a spooled result always wins;
//! - `spool/<stem>.json`: results not yet acknowledged by the server, each
//!   bounded to [`RESULT_MAX_BYTES`] when it is made;
//! - `scripts/`: private (0700) files for RunScript.
//!
//! Every file is written to a temporary name, fsynced, renamed and the
//! directory fsynced, so a crash leaves the old or the new file, never half
//! (`durable.rs`). The seen-jobs list is `seen.rs`; this file holds the
//! lock, the markers, the spool and the recovery of a previous life.
use anyhow::{bail, Context, Result};
use std::collections::{HashSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::protocol::{Job, JobResult, Status};

mod durable;
pub mod running;
mod seen;

pub use durable::write_atomic;
use durable::{fsync_dir, mkdir_private, remove_durably};

/// How many job ids are remembered for deduplication.
pub const SEEN_LIMIT: usize = 1000;

pub struct State {
    dir: PathBuf,
    seen: VecDeque<String>,
    seen_set: HashSet<String>,
    seen_lines_on_disk: usize,
    /// Stems of jobs of a previous life whose runner still runs.
    pub adopted: Vec<String>,
    _lock: nix::fcntl::Flock<File>,
}

/// Largest serialized result kept in the spool (and so sent in one piece);
/// larger results are cut when they are made ([`JobResult::bounded`]).
pub const RESULT_MAX_BYTES: usize = 256 * 1024;

/// A file name for a job id: the id itself when it is plain (letters,
/// digits, `-_.`, at most 100 bytes), else `=` and the SHA-256 of the whole
/// id in hex. `=` never starts a plain id, so the two kinds cannot collide,
/// and ids sharing a long prefix get different names.
pub fn file_stem(id: &str) -> String {
    if !id.is_empty()
        && id.len() <= 100
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && !id.starts_with('.')
    {
        id.to_string()
    } else {
        let d = ring::digest::digest(&ring::digest::SHA256, id.as_bytes());
        let hex: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        format!("={hex}")
    }
}

/// A result waiting in the spool, and the file that holds it.
#[derive(Debug, Clone)]
pub struct Spooled {
    pub path: PathBuf,
    pub result: JobResult,
}

/// Put a result in the spool of state dir `dir` (durably, cut to
/// [`RESULT_MAX_BYTES`]), then drop the job's running marker (durably), then
/// its runner's lock file (`jobs::scope`). Also called by a job's runner,
/// which does not hold the agent's lock.
pub fn finish_in(dir: &Path, result: &JobResult) -> Result<()> {
    let stem = file_stem(&result.job_id);
    let bounded = result.clone().bounded(RESULT_MAX_BYTES);
    write_atomic(&dir.join("spool").join(format!("{stem}.json")), &serde_json::to_vec(&bounded)?)?;
    remove_durably(&dir.join("running").join(format!("{stem}.json")))?;
    let _ = fs::remove_file(dir.join("running").join(format!("{stem}.lock")));
    Ok(())
}

impl State {
    /// Open (creating as needed) the state directory and take its lock.
    pub fn open(dir: &Path) -> Result<State> {
        for sub in ["", "spool", "running", "scripts"] {
            mkdir_private(&dir.join(sub))?;
        }
        let lock_path = dir.join("agent.lock");
        let lock = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .with_context(|| format!("cannot open {}", lock_path.display()))?;
        let lock = match nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((_, e)) => bail!(
                "another xcp-vm-agent process is using state directory {} ({e}); stop it first (for example: \
                 systemctl stop xcp-vm-agent)",
                dir.display()
            ),
        };
        let mut s = State {
            dir: dir.to_path_buf(),
            seen: VecDeque::new(),
            seen_set: HashSet::new(),
            seen_lines_on_disk: 0,
            adopted: Vec::new(),
            _lock: lock,
        };
        s.load_seen()?;
        Ok(s)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn scripts_dir(&self) -> PathBuf {
        self.dir.join("scripts")
    }

    /// Record that a job is starting: remember its id (durably) and write
    /// its running marker. Called before the job does anything.
    pub fn begin(&mut self, job: &Job) -> Result<()> {
        // Marker first: a stop between the two writes leaves a marker, which
        // becomes an `interrupted` result, never a job silently dropped.
        let stem = file_stem(&job.id);
        write_atomic(&self.dir.join("running").join(format!("{stem}.json")), &serde_json::to_vec(job)?)?;
        self.record_seen(&job.id)
    }

    /// A start [`State::begin`] could not record (full disk): drop its
    /// marker if that got written; the id is remembered for this process's
    /// life, so a redelivery is not answered twice.
    pub fn forget_start(&mut self, job: &Job) {
        let _ = remove_durably(&self.marker_path(&job.id));
        self.remember(job.id.clone());
    }

    fn spool_path(&self, id: &str) -> PathBuf {
        self.dir.join("spool").join(format!("{}.json", file_stem(id)))
    }

    fn marker_path(&self, id: &str) -> PathBuf {
        self.dir.join("running").join(format!("{}.json", file_stem(id)))
    }

    /// Put a result in the spool (durably, cut to [`RESULT_MAX_BYTES`]),
    /// then drop the job's running marker (durably).
    pub fn finish(&mut self, result: &JobResult) -> Result<()> {
        finish_in(&self.dir, result)
    }

    /// Drop a job's running marker (durably): its result, which could not
    /// be spooled, was delivered from memory.
    pub fn drop_marker(&self, id: &str) -> Result<()> {
        remove_durably(&self.marker_path(id))?;
        let _ = fs::remove_file(self.dir.join("running").join(format!("{}.lock", file_stem(id))));
        Ok(())
    }

    /// Turn the running markers of a previous life into `interrupted` results,
    /// but those whose runner still runs (`jobs::scope`): their stems go to
    /// [`State::adopted`], to be waited for. Returns how many were turned.
    pub fn recover_interrupted(&mut self) -> Result<usize> {
        let dir = self.dir.join("running");
        let mut n = 0;
        for e in fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(stem) = name.strip_suffix(".json").filter(|_| !name.starts_with('.')) else { continue };
            let job: Option<Job> = fs::read(e.path()).ok().and_then(|b| serde_json::from_slice(&b).ok());
            let (id, op) = match job {
                Some(j) => (j.id, j.operation),
                None => (stem.to_string(), String::new()),
            };
            // The job finished and its result is spooled; only the marker's
            // removal was cut off. The real result wins over `interrupted`.
            if self.spool_path(&id).exists() || self.dir.join("spool").join(&name).exists() {
                self.record_seen(&id)?;
                remove_durably(&e.path())?;
                let _ = fs::remove_file(dir.join(format!("{stem}.lock")));
                continue;
            }
            match running::check(&self.dir, stem, true) {
                running::Runner::Running => {
                    self.record_seen(&id)?;
                    self.adopted.push(stem.into());
                    continue;
                }
                running::Runner::Ended => continue,
                running::Runner::Lost(Some(r)) => {
                    // Its runner could not spool it (full disk).
                    self.record_seen(&id)?;
                    finish_in(&self.dir, &r)?;
                    continue;
                }
                running::Runner::Lost(None) => {}
            }
            let mut r = JobResult::new(
                Status::Interrupted,
                "the job stopped before its end (its runner or the agent was killed, crashed, or the machine \
                 rebooted); it was not run again",
            );
            r.job_id = id;
            r.operation = op;
            r.finished_at = crate::logging::now_unix();
            self.record_seen(&r.job_id)?;
            tracing::warn!(job = %r.job_id, "job was interrupted by an agent stop; reporting it as interrupted");
            write_atomic(&self.spool_path(&r.job_id), &serde_json::to_vec(&r)?)?;
            remove_durably(&e.path())?;
            let _ = fs::remove_file(dir.join(format!("{stem}.lock")));
            n += 1;
        }
        Ok(n)
    }

    /// Results waiting for acknowledgement, oldest first.
    pub fn pending(&self) -> Vec<Spooled> {
        let dir = self.dir.join("spool");
        let mut v: Vec<(std::time::SystemTime, Spooled)> = Vec::new();
        if let Ok(rd) = fs::read_dir(&dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !name.ends_with(".json") || name.starts_with('.') {
                    continue;
                }
                match fs::read(e.path())
                    .map_err(anyhow::Error::from)
                    .and_then(|b| Ok(serde_json::from_slice::<JobResult>(&b)?))
                {
                    Ok(r) => v.push((
                        e.metadata().and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH),
                        Spooled { path: e.path(), result: r },
                    )),
                    Err(err) => {
                        tracing::error!(file = %e.path().display(), "unreadable spooled result kept aside: {err:#}")
                    }
                }
            }
        }
        v.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.result.job_id.cmp(&b.1.result.job_id)));
        v.into_iter().map(|(_, r)| r).collect()
    }

    pub fn pending_count(&self) -> usize {
        fs::read_dir(self.dir.join("spool"))
            .map(|rd| {
                rd.flatten()
                    .filter(|e| {
                        e.file_name().to_string_lossy().ends_with(".json")
                            && !e.file_name().to_string_lossy().starts_with('.')
                    })
                    .count()
            })
            .unwrap_or(0)
    }

    /// Drop acknowledged (or given up) results from the spool.
    pub fn acknowledge(&mut self, done: &[&Spooled]) -> Result<()> {
        for s in done {
            let p = &s.path;
            match fs::remove_file(p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("cannot remove {}", p.display())),
            }
        }
        if !done.is_empty() {
            fsync_dir(&self.dir.join("spool"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn job(id: &str) -> Job {
        Job { id: id.into(), operation: "RunScript".into(), params: serde_json::json!({}) }
    }

    #[test]
    fn spool_until_acknowledged() {
        let d = tempfile::tempdir().unwrap();
        let mut s = State::open(d.path()).unwrap();
        s.begin(&job("a/b")).unwrap();
        let mut r = JobResult::failed("x");
        r.job_id = "a/b".into();
        s.finish(&r).unwrap();
        drop(s);
        let mut s = State::open(d.path()).unwrap();
        let p = s.pending();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].result.job_id, "a/b");
        s.acknowledge(&[&p[0]]).unwrap();
        assert_eq!(s.pending_count(), 0);
    }

    #[test]
    fn running_marker_becomes_interrupted() {
        let d = tempfile::tempdir().unwrap();
        {
            let mut s = State::open(d.path()).unwrap();
            s.begin(&job("k1")).unwrap();
        }
        let mut s = State::open(d.path()).unwrap();
        assert_eq!(s.recover_interrupted().unwrap(), 1);
        let p = s.pending();
        assert_eq!(p[0].result.status, Status::Interrupted);
        assert_eq!(p[0].result.operation, "RunScript");
        assert_eq!(s.recover_interrupted().unwrap(), 0);
    }

    #[test]
    fn second_process_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let _a = State::open(d.path()).unwrap();
        let e = State::open(d.path()).err().unwrap().to_string();
        assert!(e.contains("another xcp-vm-agent"), "{e}");
    }

    #[test]
    fn odd_ids_get_safe_file_names() {
        assert_eq!(file_stem("abc-1"), "abc-1");
        let s = file_stem("../x");
        assert!(s.starts_with('=') && s.len() == 65 && !s.contains('/'), "{s}");
        assert_ne!(file_stem(""), "");
    }

    /// Failed before: names were the hex of the first 100 bytes, so two
    /// long ids with a common prefix shared one spool file.
    #[test]
    fn long_ids_sharing_a_prefix_get_their_own_spool_files() {
        let d = tempfile::tempdir().unwrap();
        let mut s = State::open(d.path()).unwrap();
        let a = format!("{}-a", "p".repeat(120));
        let b = format!("{}-b", "p".repeat(120));
        assert_ne!(file_stem(&a), file_stem(&b));
        for id in [&a, &b] {
            s.begin(&job(id)).unwrap();
            let mut r = JobResult::succeeded("ok");
            r.job_id = id.clone();
            s.finish(&r).unwrap();
        }
        let mut ids: Vec<String> = s.pending().into_iter().map(|p| p.result.job_id).collect();
        ids.sort();
        assert_eq!(ids, vec![a, b]);
    }

    /// Failed before: a marker left beside a spooled result (a stop between
    /// the spool write and the marker removal) turned the real result into
    /// `interrupted`.
    #[test]
    fn recovery_prefers_a_spooled_result_over_a_marker() {
        let d = tempfile::tempdir().unwrap();
        let mut s = State::open(d.path()).unwrap();
        s.begin(&job("k2")).unwrap();
        let mut r = JobResult::succeeded("done");
        r.job_id = "k2".into();
        let marker = fs::read(d.path().join("running/k2.json")).unwrap();
        s.finish(&r).unwrap();
        fs::write(d.path().join("running/k2.json"), marker).unwrap();
        drop(s);
        let mut s = State::open(d.path()).unwrap();
        assert_eq!(s.recover_interrupted().unwrap(), 0);
        let p = s.pending();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].result.status, Status::Succeeded);
        assert!(!d.path().join("running/k2.json").exists());
    }

    #[test]
    fn a_result_is_bounded_when_it_is_spooled() {
        let d = tempfile::tempdir().unwrap();
        let mut s = State::open(d.path()).unwrap();
        let binary: String = (0..200_000u32).map(|i| char::from((i % 32) as u8)).collect();
        let mut r = JobResult::succeeded("ok")
            .with_details(serde_json::json!({"stdout": binary, "stderr": "short", "exit_code": 0}));
        r.job_id = "big".into();
        s.finish(&r).unwrap();
        let text = fs::read(d.path().join("spool/big.json")).unwrap();
        assert!(text.len() <= RESULT_MAX_BYTES, "{}", text.len());
        let p = &s.pending()[0].result;
        let out = p.details["stdout"].as_str().unwrap();
        assert!(out.starts_with("\u{0}\u{1}") && out.contains("characters cut by xcp-vm-agent"));
        assert_eq!(p.details["stderr"], "short");
        assert!(p.details["result_original_bytes"].as_u64().unwrap() > 1_000_000);
    }

    /// A tmpfs scratch directory when there is one (fsync-heavy tests).
    pub(super) fn fast_dir() -> tempfile::TempDir {
        let shm = std::path::Path::new("/dev/shm");
        if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() }.unwrap()
    }

    #[test]
    fn a_result_under_the_limit_is_spooled_whole() {
        assert_eq!(RESULT_MAX_BYTES, 256 * 1024, "docs/protocol.md gives 256 KiB");
        let d = tempfile::tempdir().unwrap();
        let mut s = State::open(d.path()).unwrap();
        let out = "x".repeat(100 * 1024);
        let mut r = JobResult::succeeded("ok").with_details(serde_json::json!({"stdout": out}));
        r.job_id = "mid".into();
        s.finish(&r).unwrap();
        assert_eq!(s.pending()[0].result.details["stdout"].as_str().unwrap().len(), 100 * 1024);
    }

    #[test]
    fn scripts_live_in_the_state_dir() {
        let d = tempfile::tempdir().unwrap();
        let s = State::open(d.path()).unwrap();
        assert_eq!(s.scripts_dir(), d.path().join("scripts"));
        assert_eq!(s.dir(), d.path());
    }

    #[test]
    fn forget_start_drops_the_marker_and_remembers_the_id() {
        let d = tempfile::tempdir().unwrap();
        let mut s = State::open(d.path()).unwrap();
        let j = job("half-started");
        write_atomic(&s.marker_path(&j.id), b"{}").unwrap();
        s.forget_start(&j);
        assert!(s.is_seen("half-started"));
        assert!(!s.marker_path(&j.id).exists(), "the marker must go");
        assert_eq!(s.recover_interrupted().unwrap(), 0);
    }

    #[test]
    fn only_json_markers_are_recovered() {
        let d = tempfile::tempdir().unwrap();
        let mut s = State::open(d.path()).unwrap();
        fs::write(d.path().join("running/notes.txt"), "x").unwrap();
        fs::write(d.path().join("running/.a.json"), "{}").unwrap();
        assert_eq!(s.recover_interrupted().unwrap(), 0);
        assert!(s.pending().is_empty());
    }

    #[test]
    fn a_spooled_result_wins_over_an_unreadable_marker() {
        // A long id gets a hashed file name; when its marker cannot be read
        // the id is unknown, so the marker's file name must find the result.
        let d = tempfile::tempdir().unwrap();
        let mut s = State::open(d.path()).unwrap();
        let id = "x".repeat(150);
        let mut r = JobResult::succeeded("done");
        r.job_id = id.clone();
        s.finish(&r).unwrap();
        fs::write(s.marker_path(&id), b"not json").unwrap();
        assert_eq!(s.recover_interrupted().unwrap(), 0);
        let p = s.pending();
        assert_eq!((p.len(), p[0].result.message.as_str()), (1, "done"));
        assert!(!s.marker_path(&id).exists());
    }

    #[test]
    fn pending_count_counts_spooled_results_only() {
        let d = tempfile::tempdir().unwrap();
        let mut s = State::open(d.path()).unwrap();
        assert_eq!(s.pending_count(), 0);
        for id in ["a", "b"] {
            let mut r = JobResult::succeeded("ok");
            r.job_id = id.into();
            s.finish(&r).unwrap();
        }
        // A temp file of write_atomic and a stray file are not results.
        fs::write(d.path().join("spool/.c.json"), "{}").unwrap();
        fs::write(d.path().join("spool/notes.txt"), "x").unwrap();
        assert_eq!(s.pending_count(), 2);
        assert_eq!(s.pending().len(), 2);
    }

    #[test]
    fn acknowledge_reports_a_removal_that_fails() {
        let d = tempfile::tempdir().unwrap();
        let mut s = State::open(d.path()).unwrap();
        let gone = Spooled { path: d.path().join("spool/gone.json"), result: JobResult::succeeded("x") };
        s.acknowledge(&[&gone]).unwrap();
        fs::create_dir(d.path().join("spool/dir.json")).unwrap();
        let dir = Spooled { path: d.path().join("spool/dir.json"), result: JobResult::succeeded("x") };
        assert!(s.acknowledge(&[&dir]).is_err());
    }

    #[test]
    fn drop_marker_removes_the_running_marker() {
        let d = tempfile::tempdir().unwrap();
        let mut s = State::open(d.path()).unwrap();
        s.begin(&job("dm-1")).unwrap();
        let marker = d.path().join("running").join("dm-1.json");
        assert!(marker.exists(), "begin writes the marker");
        s.drop_marker("dm-1").unwrap();
        assert!(!marker.exists(), "drop_marker must remove it");
    }
}
