//! Durable file operations of the state directory, used by everything that
//! writes there (and by `guest`): a write goes to a temporary name (0600),
//! is fsynced, renamed and the directory fsynced; a removal fsyncs the
//! directory; so a crash leaves the old or the new file, never half, and a
//! removal done is never undone.
use anyhow::{Context, Result};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

/// Remove a file if it is there and fsync its directory, so the removal
/// survives a crash.
pub(crate) fn remove_durably(p: &Path) -> Result<()> {
    match fs::remove_file(p) {
        Ok(()) => fsync_dir(p.parent().unwrap_or(Path::new("."))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot remove {}", p.display())),
    }
}

pub(crate) fn mkdir_private(p: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(p)
        .with_context(|| format!("cannot create directory {}", p.display()))
}

pub(crate) fn fsync_dir(p: &Path) -> Result<()> {
    File::open(p).and_then(|f| f.sync_all()).with_context(|| format!("cannot fsync directory {}", p.display()))
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

#[cfg(test)]
mod tests {
    use super::*;

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

    /// Failed before: a failed write left its partial temporary file.
    #[test]
    fn a_failed_atomic_write_leaves_no_temporary_file() {
        let d = tempfile::tempdir().unwrap();
        // The rename fails (a non-empty directory is in the way).
        fs::create_dir_all(d.path().join("x.json/sub")).unwrap();
        assert!(write_atomic(&d.path().join("x.json"), b"data").is_err());
        assert!(!d.path().join(".x.json.tmp").exists(), "the temporary file is left");
    }
}
