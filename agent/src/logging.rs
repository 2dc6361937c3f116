//! Logging with tracing: to stderr (the journal under systemd) and, when
//! configured, appended to the log file. A log file that cannot be opened is
//! a warning on stderr, never a reason not to run.
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tracing::Level;

#[derive(Clone)]
struct Tee {
    file: Option<Arc<Mutex<File>>>,
}

impl Write for Tee {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        if let Some(f) = &self.file {
            if let Ok(mut f) = f.lock() {
                let _ = f.write_all(buf);
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

pub fn level_of(s: &str) -> Level {
    match s {
        "error" => Level::ERROR,
        "warn" | "warning" => Level::WARN,
        "debug" => Level::DEBUG,
        "trace" => Level::TRACE,
        _ => Level::INFO,
    }
}

/// Set up the global subscriber. Safe to call once per process.
pub fn init(level: &str, log_file: Option<&Path>) {
    let mut warn = None;
    let file = log_file.and_then(|p| {
        if let Some(d) = p.parent() {
            let _ = std::fs::create_dir_all(d);
        }
        match std::fs::OpenOptions::new().create(true).append(true).open(p) {
            Ok(f) => Some(Arc::new(Mutex::new(f))),
            Err(e) => {
                warn = Some(format!("cannot open log file {}: {e}; logging to stderr only", p.display()));
                None
            }
        }
    });
    let tee = Tee { file };
    let _ = tracing_subscriber::fmt()
        .with_max_level(level_of(level))
        .with_ansi(false)
        .with_target(false)
        .with_writer(move || tee.clone())
        .try_init();
    if let Some(w) = warn {
        tracing::warn!("{w}");
    }
}
