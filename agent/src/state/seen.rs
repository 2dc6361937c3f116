//! The `seen-jobs` file of the state directory: ids of jobs already
//! started, one JSON string a line (so an id holding a newline stays one
//! id; lines of versions before 1.1 are the plain id), newest last. Held in
//! memory as a bounded queue of [`SEEN_LIMIT`] ids plus a set; on disk one
//! line is appended per job (fsynced) until the file holds twice the limit,
//! then it is rewritten atomically with the newest ids. An id is remembered
//! only once its line is written, so a failed write is done again the next
//! time.
use anyhow::{Context, Result};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;

use super::{write_atomic, State, SEEN_LIMIT};

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

impl State {
    pub(super) fn load_seen(&mut self) -> Result<()> {
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

    pub(super) fn remember(&mut self, id: String) {
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

    pub(super) fn record_seen(&mut self, id: &str) -> Result<()> {
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
}

#[cfg(test)]
mod tests {
    use super::super::tests::{fast_dir, job};
    use super::*;
    use crate::protocol::JobResult;

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
}
