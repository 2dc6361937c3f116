//! Logging: a small `tracing` subscriber that writes one line per event to
//! stderr (the journal under systemd) and, when configured, appends it to the
//! log file. A log file that cannot be opened is a warning on stderr, never a
//! reason not to run.
//!
//! Written here rather than taken from tracing-subscriber: the agent uses no
//! spans, and the fmt layer alone cost about 150 KB of the 2.2 MB budget.
//! Logging: the agent's own log macros (`error!`, `warn!`, `info!`,
//! `debug!`, `trace!`) and the sink that writes one line per event to stderr
//! (the journal under systemd) and, when configured, appends it to the log
//! file. A log file that cannot be opened is a warning on stderr, never a
//! reason not to run.
//!
//! Written here rather than taken from the `tracing` crate (and before it
//! tracing-subscriber, whose fmt layer alone cost about 150 KB): the agent
//! uses no spans, and tracing's per-callsite metadata and dispatch cost about
//! 46 KB of the 2.2 MB budget (docs/performance.md). The macros take the
//! tracing syntax the code uses: fields `name = %display`, `name = ?debug`,
//! `name = value` (Debug), bare `name`, `%name`, `?name`, then a format
//! string and its arguments. The line is `TIME LEVEL message name=value...`.
//! Arguments are formatted only when the level is enabled.
//!
//! lib.rs has `extern crate self as tracing`, so `tracing::info!(...)` in
//! the agent names these macros.
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};

/// Log levels, most severe first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error = 1,
    Warn,
    Info,
    Debug,
    Trace,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"][self as usize - 1]
    }
}

/// The most verbose level logged; 0 (nothing) until [`init`].
static MAX: AtomicU8 = AtomicU8::new(0);
/// The log file, set once by the first [`init`].
static FILE: OnceLock<Option<Mutex<File>>> = OnceLock::new();

/// Whether events of `level` are logged (checked before any formatting).
#[inline]
pub fn enabled(level: Level) -> bool {
    level as u8 <= MAX.load(Ordering::Relaxed)
}

/// `TIME LEVEL message fields` with its newline.
pub fn line(secs: u64, level: Level, event: std::fmt::Arguments<'_>) -> String {
    format!("{} {:>5} {event}\n", rfc3339(secs), level.as_str())
}

/// The clock of every log line (and of the rest of the agent: `jobs`
/// re-exports it): seconds since the Unix epoch, 0 before it.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Unix time until which the log file is not written (0: none): a freeze
/// (`guest::freeze`) may hold the file's filesystem until then. An atomic,
/// read on every line; set by the freeze code, so logging imports nothing
/// of it.
static FILE_HELD_UNTIL: AtomicU64 = AtomicU64::new(0);

/// Hold the log file until `until` (Unix time; 0 releases it).
pub fn hold_file_until(until: u64) {
    FILE_HELD_UNTIL.store(until, Ordering::Relaxed);
}

/// Until when the log file is held (0: not held).
pub fn file_held_until() -> u64 {
    FILE_HELD_UNTIL.load(Ordering::Relaxed)
}

/// Whether the log file must not be written now.
fn file_held() -> bool {
    let until = file_held_until();
    until != 0 && now_unix() < until
}

/// Write one event (the macros call this after [`enabled`]).
#[doc(hidden)]
pub fn emit(level: Level, event: std::fmt::Arguments<'_>) {
    let line = line(now_unix(), level, event);
    let _ = std::io::stderr().write_all(line.as_bytes());
    // Not while a freeze is in force: the log file may be on it.
    if let Some(f) = FILE.get().and_then(Option::as_ref).filter(|_| !file_held()) {
        if let Ok(mut f) = f.lock() {
            let _ = f.write_all(line.as_bytes());
        }
    }
}

/// The message then ` name=value` per field, as `format_args!`: the fields
/// (written first, as in tracing) are munched into a `concat!`ed format
/// string and an argument list.
#[doc(hidden)]
#[macro_export]
macro_rules! __log_args {
    (@ [$($f:tt)*] [$($a:tt)*] $n:ident = % $e:expr, $($rest:tt)+) => {
        $crate::__log_args!(@ [$($f)* , " ", stringify!($n), "={}"] [$($a)* , $e] $($rest)+)
    };
    (@ [$($f:tt)*] [$($a:tt)*] $n:ident = ? $e:expr, $($rest:tt)+) => {
        $crate::__log_args!(@ [$($f)* , " ", stringify!($n), "={:?}"] [$($a)* , $e] $($rest)+)
    };
    (@ [$($f:tt)*] [$($a:tt)*] $n:ident = $e:expr, $($rest:tt)+) => {
        $crate::__log_args!(@ [$($f)* , " ", stringify!($n), "={:?}"] [$($a)* , $e] $($rest)+)
    };
    (@ [$($f:tt)*] [$($a:tt)*] % $n:ident, $($rest:tt)+) => {
        $crate::__log_args!(@ [$($f)* , " ", stringify!($n), "={}"] [$($a)* , $n] $($rest)+)
    };
    (@ [$($f:tt)*] [$($a:tt)*] ? $n:ident, $($rest:tt)+) => {
        $crate::__log_args!(@ [$($f)* , " ", stringify!($n), "={:?}"] [$($a)* , $n] $($rest)+)
    };
    (@ [$($f:tt)*] [$($a:tt)*] $n:ident, $($rest:tt)+) => {
        $crate::__log_args!(@ [$($f)* , " ", stringify!($n), "={:?}"] [$($a)* , $n] $($rest)+)
    };
    (@ [$($f:tt)*] [$($a:tt)*] $($msg:tt)+) => {
        format_args!(concat!("{}" $($f)*), format_args!($($msg)+) $($a)*)
    };
    ($($t:tt)+) => { $crate::__log_args!(@ [] [] $($t)+) };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __log {
    ($level:ident, $($t:tt)+) => {
        if $crate::logging::enabled($crate::logging::Level::$level) {
            $crate::logging::emit($crate::logging::Level::$level, $crate::__log_args!($($t)+))
        }
    };
}

/// Log at ERROR: `error!(field = %value, "format {args}")`.
#[macro_export]
macro_rules! error { ($($t:tt)+) => { $crate::__log!(Error, $($t)+) }; }
/// Log at WARN (see [`error!`] for the syntax).
#[macro_export]
macro_rules! warn { ($($t:tt)+) => { $crate::__log!(Warn, $($t)+) }; }
/// Log at INFO (see [`error!`] for the syntax).
#[macro_export]
macro_rules! info { ($($t:tt)+) => { $crate::__log!(Info, $($t)+) }; }
/// Log at DEBUG (see [`error!`] for the syntax).
#[macro_export]
macro_rules! debug { ($($t:tt)+) => { $crate::__log!(Debug, $($t)+) }; }
/// Log at TRACE (see [`error!`] for the syntax).
#[macro_export]
macro_rules! trace { ($($t:tt)+) => { $crate::__log!(Trace, $($t)+) }; }

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01, in the
/// proleptic Gregorian calendar (Howard Hinnant's civil-from-days).
#[allow(clippy::cast_possible_truncation, reason = "the day is 1..=31 and the month 1..=12 by the algorithm")]
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

pub fn level_of(s: &str) -> Level {
    match s {
        "error" => Level::Error,
        "warn" | "warning" => Level::Warn,
        "debug" => Level::Debug,
        "trace" => Level::Trace,
        _ => Level::Info,
    }
}

/// Set up logging. Later calls in the same process do nothing.
pub fn init(level: &str, log_file: Option<&Path>) {
    let mut warn = None;
    let mut first = false;
    FILE.get_or_init(|| {
        first = true;
        let p = log_file?;
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
    if !first {
        return;
    }
    MAX.store(level_of(level) as u8, Ordering::Relaxed);
    if let Some(w) = warn {
        tracing::warn!("{w}");
    }
}

#[cfg(test)]
mod tests {
    use super::Level;

    #[test]
    fn line_format_and_fields() {
        let (id, n, name, text) = ("j-1", 3u32, "a b", String::from("x"));
        let delivered = 2;
        let line = super::line(
            951_782_400,
            Level::Info,
            crate::__log_args!(job = %id, jobs = n, status = name, k = ?text, %id, delivered, "done {} {n}", 1),
        );
        assert_eq!(
            line,
            "2000-02-29T00:00:00Z  INFO done 1 3 job=j-1 jobs=3 status=\"a b\" k=\"x\" id=j-1 delivered=2\n"
        );
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(
            super::line(0, Level::Error, crate::__log_args!("{e:#}")),
            "1970-01-01T00:00:00Z ERROR outer: inner\n"
        );
        assert_eq!(format!("{:>5}|{:>5}", Level::Warn.as_str(), Level::Trace.as_str()), " WARN|TRACE");
    }

    #[test]
    fn levels_order_and_names() {
        assert_eq!(super::level_of("warning"), Level::Warn);
        assert_eq!(super::level_of("nonsense"), Level::Info);
        assert!(Level::Error < Level::Warn && Level::Debug < Level::Trace);
    }

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(super::rfc3339(1_795_350_896), "2026-11-22T12:34:56Z");
    }
}
