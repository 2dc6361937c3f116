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
//! directory fsynced, so a crash leaves the old or the new file, never half.
use anyhow::{bail, Context, Result};
use std::collections::{HashSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::jobs::{Job, JobResult, Status};

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

/// One line of `seen-jobs` for an id: a JSON string.
fn seen_line(id: &str) -> String {
    serde_json::to_string(id).unwrap_or_default()
}

/// An id from one line of `seen-jobs`: a JSON string, or (written by
/// versions before 1.1) the id itself.
fn parse_seen_line(line: &str) -> String {
    if line.starts_with('"') {
        if let Ok(id) = serde_json::from_str::<String>(line) {
            return id;
        }
    }
    line.to_string()
}

/// A result waiting in the spool, and the file that holds it.
#[derive(Debug, Clone)]
pub struct Spooled {
    pub path: PathBuf,
    pub result: JobResult,
}

/// Remove a file if it is there and fsync its directory, so the removal
/// survives a crash.
fn remove_durably(p: &Path) -> Result<()> {
    match fs::remove_file(p) {
        Ok(()) => fsync_dir(p.parent().unwrap_or(Path::new("."))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot remove {}", p.display())),
    }
}

fn mkdir_private(p: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(p)
        .with_context(|| format!("cannot create directory {}", p.display()))
}

fn fsync_dir(p: &Path) -> Result<()> {
    File::open(p).and_then(|f| f.sync_all()).with_context(|| format!("cannot fsync directory {}", p.display()))
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

/// Write `data` to `path` atomically with mode 0600.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{}.tmp", path.file_name().unwrap_or_default().to_string_lossy()));
    let written = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(data).and_then(|_| f.sync_all()))
        .with_context(|| format!("cannot write {}", tmp.display()))
        .and_then(|_| {
            fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
        });
    if written.is_err() {
        // A partial temporary file would hold the space a full disk lacks.
        let _ = fs::remove_file(&tmp);
    }
    written?;
    fsync_dir(dir)
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

    fn load_seen(&mut self) -> Result<()> {
        let p = self.dir.join("seen-jobs");
        let text = match fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", p.display())),
        };
        for line in text.lines().filter(|l| !l.is_empty()) {
            self.seen_lines_on_disk += 1;
            self.remember(parse_seen_line(line));
        }
        Ok(())
    }

    fn remember(&mut self, id: String) {
        if self.seen_set.insert(id.clone()) {
            self.seen.push_back(id);
            while self.seen.len() > SEEN_LIMIT {
                if let Some(old) = self.seen.pop_front() {
                    self.seen_set.remove(&old);
                }
            }
        }
    }

    pub fn is_seen(&self, id: &str) -> bool {
        self.seen_set.contains(id)
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

    fn record_seen(&mut self, id: &str) -> Result<()> {
        if self.is_seen(id) {
            return Ok(());
        }
        // Written first, remembered after: an id whose write failed is
        // written again the next time.
        let p = self.dir.join("seen-jobs");
        if self.seen_lines_on_disk >= 2 * SEEN_LIMIT {
            // The newest SEEN_LIMIT ids, this one included.
            let ids = self.seen.iter().map(String::as_str).chain([id]);
            let text: String =
                ids.skip((self.seen.len() + 1).saturating_sub(SEEN_LIMIT)).map(|s| seen_line(s) + "\n").collect();
            write_atomic(&p, text.as_bytes())?;
            self.seen_lines_on_disk = SEEN_LIMIT.min(self.seen.len() + 1);
        } else {
            let mut f = OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o600)
                .open(&p)
                .with_context(|| format!("cannot open {}", p.display()))?;
            writeln!(f, "{}", seen_line(id))
                .and_then(|_| f.sync_all())
                .with_context(|| format!("cannot write {}", p.display()))?;
            self.seen_lines_on_disk += 1;
        }
        self.remember(id.to_string());
        Ok(())
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
            match crate::jobs::scope::check(&self.dir, stem, true) {
                crate::jobs::scope::Runner::Running => {
                    self.record_seen(&id)?;
                    self.adopted.push(stem.into());
                    continue;
                }
                crate::jobs::scope::Runner::Ended => continue,
                crate::jobs::scope::Runner::Lost(Some(r)) => {
                    // Its runner could not spool it (full disk).
                    self.record_seen(&id)?;
                    finish_in(&self.dir, &r)?;
                    continue;
                }
                crate::jobs::scope::Runner::Lost(None) => {}
            }
            let mut r = JobResult::new(
                Status::Interrupted,
                "the job stopped before its end (its runner or the agent was killed, crashed, or the machine \
                 rebooted); it was not run again",
            );
            r.job_id = id;
            r.operation = op;
            r.finished_at = crate::jobs::now_unix();
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

    fn job(id: &str) -> Job {
        Job { id: id.into(), operation: "RunScript".into(), params: serde_json::json!({}) }
    }

    #[test]
    fn seen_survives_reopen_and_is_bounded() {
        // 2100 fsyncs: on tmpfs when there is one (90 s on a busy disk,
        // which made every mutation-testing run of this module crawl).
        let shm = std::path::Path::new("/dev/shm");
        let d = if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() }.unwrap();
        {
            let mut s = State::open(d.path()).unwrap();
            for i in 0..(SEEN_LIMIT + 50) {
                s.begin(&job(&format!("j{i}"))).unwrap();
                let mut r = JobResult::succeeded("ok");
                r.job_id = format!("j{i}");
                s.finish(&r).unwrap();
            }
            assert!(s.is_seen("j1049"));
            assert!(!s.is_seen("j0"), "oldest ids are forgotten past the limit");
        }
        let s = State::open(d.path()).unwrap();
        assert!(s.is_seen("j1049") && s.is_seen("j50") && !s.is_seen("j49"));
        let lines = fs::read_to_string(d.path().join("seen-jobs")).unwrap().lines().count();
        assert!(lines <= 2 * SEEN_LIMIT, "{lines}");
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

    /// Failed before: the newline was stored as a space, so after a restart
    /// the id was not recognised and the job ran again.
    #[test]
    fn an_id_with_a_newline_stays_seen_after_reopen() {
        let d = tempfile::tempdir().unwrap();
        let id = "line1\nline2";
        {
            let mut s = State::open(d.path()).unwrap();
            s.begin(&job(id)).unwrap();
        }
        let s = State::open(d.path()).unwrap();
        assert!(s.is_seen(id));
        assert!(!s.is_seen("line1") && !s.is_seen("line1 line2"));
        // Lines of the old format still read.
        fs::write(d.path().join("seen-jobs"), "old-plain-id\n\"quoted\"\n").unwrap();
        drop(s);
        let s = State::open(d.path()).unwrap();
        assert!(s.is_seen("old-plain-id") && s.is_seen("quoted"));
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
    fn fast_dir() -> tempfile::TempDir {
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
    fn removal_and_fsync_errors_are_errors() {
        let d = tempfile::tempdir().unwrap();
        // Not there: nothing to do.
        remove_durably(&d.path().join("missing")).unwrap();
        // A directory is not a file: a real error, not "already gone".
        fs::create_dir(d.path().join("dir")).unwrap();
        assert!(remove_durably(&d.path().join("dir")).is_err());
        assert!(fsync_dir(&d.path().join("missing")).is_err());
        fsync_dir(d.path()).unwrap();
    }

    #[test]
    fn scripts_live_in_the_state_dir() {
        let d = tempfile::tempdir().unwrap();
        let s = State::open(d.path()).unwrap();
        assert_eq!(s.scripts_dir(), d.path().join("scripts"));
        assert_eq!(s.dir(), d.path());
    }

    #[test]
    fn an_unreadable_seen_list_is_an_error_not_an_empty_list() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("seen-jobs")).unwrap();
        let e = State::open(d.path()).err().expect("a seen-jobs that cannot be read must fail the open");
        assert!(format!("{e:#}").contains("seen-jobs"), "{e:#}");
    }

    #[test]
    fn lines_loaded_from_disk_count_towards_compaction() {
        // 1050 ids in a first run, 1000 more after a restart: the file must
        // be compacted (2050 lines otherwise), which needs the lines already
        // on disk counted at open.
        let d = fast_dir();
        let run = |s: &mut State, ids: std::ops::Range<usize>| {
            for i in ids {
                s.begin(&job(&format!("j{i}"))).unwrap();
                let mut r = JobResult::succeeded("ok");
                r.job_id = format!("j{i}");
                s.finish(&r).unwrap();
            }
        };
        run(&mut State::open(d.path()).unwrap(), 0..(SEEN_LIMIT + 50));
        run(&mut State::open(d.path()).unwrap(), (SEEN_LIMIT + 50)..(2 * SEEN_LIMIT + 50));
        let lines = fs::read_to_string(d.path().join("seen-jobs")).unwrap().lines().count();
        assert!(lines <= 2 * SEEN_LIMIT, "{lines} lines: not compacted");
    }

    #[test]
    fn seen_ids_are_appended_until_twice_the_limit() {
        // One line per job (no rewrite of 1000 lines per job) until the
        // file reaches 2 * SEEN_LIMIT lines, then one compaction.
        let d = fast_dir();
        let mut s = State::open(d.path()).unwrap();
        let lines = || fs::read_to_string(d.path().join("seen-jobs")).unwrap().lines().count();
        for i in 0..(2 * SEEN_LIMIT) {
            s.begin(&job(&format!("j{i}"))).unwrap();
            if i == SEEN_LIMIT + 49 {
                assert_eq!(lines(), SEEN_LIMIT + 50, "appended, not compacted yet");
            }
        }
        assert_eq!(lines(), 2 * SEEN_LIMIT);
        s.begin(&job("one-more")).unwrap();
        assert_eq!(lines(), SEEN_LIMIT, "compacted to the remembered ids");
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

    /// Failed before: the id was remembered before the write, so a write of
    /// `seen-jobs` that failed was never done again and a restart forgot
    /// the job (it could run twice).
    #[test]
    fn a_seen_id_whose_write_failed_is_written_the_next_time() {
        let d = tempfile::tempdir().unwrap();
        let mut s = State::open(d.path()).unwrap();
        // A directory where the file goes: every write of it fails.
        fs::create_dir(d.path().join("seen-jobs")).unwrap();
        assert!(s.begin(&job("s1")).is_err());
        fs::remove_dir(d.path().join("seen-jobs")).unwrap();
        s.begin(&job("s1")).unwrap();
        drop(s);
        assert!(State::open(d.path()).unwrap().is_seen("s1"), "s1 is not in seen-jobs");
    }

    /// Failed before: a failed write left its partial temporary file.
    #[test]
    fn a_failed_atomic_write_leaves_no_temporary_file() {
        let d = tempfile::tempdir().unwrap();
        // The rename fails (a non-empty directory is in the way).
        fs::create_dir_all(d.path().join("x.json/sub")).unwrap();
        assert!(write_atomic(&d.path().join("x.json"), b"data").is_err());
        assert!(!d.path().join(".x.json.tmp").exists(), "the temporary file is left");
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
