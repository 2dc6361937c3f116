//! Logging: a small `tracing` subscriber that writes one line per event to
//! stderr (the journal under systemd) and, when configured, appends it to the
//! log file. A log file that cannot be opened is a warning on stderr, never a
//! reason not to run.
//!
//! Written here rather than taken from tracing-subscriber: the agent uses no
//! spans, and the fmt layer alone cost about 150 KB of the 2.2 MB budget.
use std::fmt::Write as _;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

struct LineLogger {
    max: Level,
    file: Option<Mutex<File>>,
}

struct Fields<'a> {
    message: &'a mut String,
    rest: &'a mut String,
}

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.rest, " {}={value:?}", field.name());
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.rest, " {}={value:?}", field.name());
        }
    }
}

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01, in the
/// proleptic Gregorian calendar (Howard Hinnant's civil-from-days).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// `YYYY-MM-DDTHH:MM:SSZ` for a Unix time.
pub fn rfc3339(secs: u64) -> String {
    let (y, m, d) = civil_from_days((secs / 86400) as i64);
    let rem = secs % 86400;
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

impl Subscriber for LineLogger {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        *m.level() <= self.max
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, e: &Event<'_>) {
        let mut message = String::new();
        let mut rest = String::new();
        e.record(&mut Fields { message: &mut message, rest: &mut rest });
        let line = format!("{} {:>5} {message}{rest}\n", rfc3339(crate::jobs::now_unix()), e.metadata().level());
        let _ = std::io::stderr().write_all(line.as_bytes());
        // Not while a freeze is in force: the log file may be on it.
        if let Some(f) = self.file.as_ref().filter(|_| !crate::guest::freeze::log_suspended()) {
            if let Ok(mut f) = f.lock() {
                let _ = f.write_all(line.as_bytes());
            }
        }
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
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

/// Set up the global subscriber. Later calls in the same process do nothing.
pub fn init(level: &str, log_file: Option<&Path>) {
    let mut warn = None;
    let file = log_file.and_then(|p| {
        if let Some(d) = p.parent() {
            let _ = std::fs::create_dir_all(d);
        }
        match std::fs::OpenOptions::new().create(true).append(true).open(p) {
            Ok(f) => Some(Mutex::new(f)),
            Err(e) => {
                warn = Some(format!("cannot open log file {}: {e}; logging to stderr only", p.display()));
                None
            }
        }
    });
    let _ = tracing::subscriber::set_global_default(LineLogger { max: level_of(level), file });
    if let Some(w) = warn {
        tracing::warn!("{w}");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(super::rfc3339(1_795_350_896), "2026-11-22T12:34:56Z");
    }
}
