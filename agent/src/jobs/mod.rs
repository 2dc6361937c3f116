//! The job model: what the server sends ([`Job`]), what the agent answers
//! ([`JobResult`], [`Status`]), the allowlist, and dispatch to the operations.
//!
//! To add an operation: add its name to [`OPERATIONS`], a module with a
//! `run(&JobContext, &serde_json::Value) -> JobResult` function, and an arm in
//! [`execute`]. Everything else (spool, dedup, allowlist, CLI `exec`) is shared.
pub mod run_script;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::PathBuf;

use crate::runner::Runner;

/// Every operation this agent can run, in the names the protocol uses.
#[cfg(feature = "guest")]
pub const OPERATIONS: &[&str] = &[
    "RunScript",
    "ExtendPartition",
    "InitializeDisk",
    "FreezeFilesystems",
    "ThawFilesystems",
    "TrimFilesystems",
    "Reboot",
    "Shutdown",
];
/// Every operation this agent can run (built without the `guest` feature).
#[cfg(not(feature = "guest"))]
pub const OPERATIONS: &[&str] = &["RunScript", "ExtendPartition", "InitializeDisk"];

/// A job as the server sends it, and as a job file for `exec --job` holds it.
/// Unknown fields are ignored, so a later protocol version can add fields to
/// a job without older agents refusing it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Job {
    pub id: String,
    pub operation: String,
    #[serde(default)]
    pub params: Value,
}

/// The states a job goes through. `Running` is reported when a job starts;
/// the others are final.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Running,
    Succeeded,
    NoChange,
    Refused,
    Failed,
    Interrupted,
}

impl Status {
    /// Exit code of `xcp-vm-agent exec` for this status.
    pub fn exit_code(self) -> i32 {
        match self {
            Status::Succeeded | Status::NoChange | Status::Running => 0,
            Status::Failed | Status::Interrupted => 1,
            Status::Refused => 3,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Succeeded => "succeeded",
            Status::NoChange => "no_change",
            Status::Refused => "refused",
            Status::Failed => "failed",
            Status::Interrupted => "interrupted",
        }
    }
}

/// What the agent reports about one job.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobResult {
    pub job_id: String,
    pub operation: String,
    pub status: Status,
    pub message: String,
    #[serde(default)]
    pub details: Value,
    /// Unix seconds.
    #[serde(default)]
    pub started_at: u64,
    #[serde(default)]
    pub finished_at: u64,
    #[serde(default)]
    pub duration_ms: u64,
}

impl JobResult {
    pub fn new(status: Status, message: impl Into<String>) -> Self {
        JobResult {
            job_id: String::new(),
            operation: String::new(),
            status,
            message: message.into(),
            details: Value::Object(Default::default()),
            started_at: 0,
            finished_at: 0,
            duration_ms: 0,
        }
    }
    pub fn succeeded(message: impl Into<String>) -> Self {
        Self::new(Status::Succeeded, message)
    }
    pub fn no_change(message: impl Into<String>) -> Self {
        Self::new(Status::NoChange, message)
    }
    pub fn refused(message: impl Into<String>) -> Self {
        Self::new(Status::Refused, message)
    }
    pub fn failed(message: impl Into<String>) -> Self {
        Self::new(Status::Failed, message)
    }
    pub fn with_details(mut self, details: Value) -> Self {
        self.details = details;
        self
    }

    fn json_len(&self) -> usize {
        serde_json::to_vec(self).map(|v| v.len()).unwrap_or(usize::MAX)
    }

    /// This result cut to at most `max` bytes of JSON: the longest string
    /// among `details` loses its middle (head and tail kept, the cut said in
    /// place) until it fits, and `details.result_original_bytes` says how big
    /// it was. Binary output, which JSON escapes up to six times over, is what
    /// usually needs it. If strings alone cannot make it fit, details are
    /// replaced by a note and the message is shortened.
    pub fn bounded(mut self, max: usize) -> JobResult {
        let original = self.json_len();
        if original <= max {
            return self;
        }
        for _ in 0..64 {
            let Value::Object(m) = &mut self.details else { break };
            let Some((key, chars)) = m
                .iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.chars().count())))
                .max_by_key(|(_, n)| *n)
            else {
                break;
            };
            if chars < 256 {
                break;
            }
            let s = m[&key].as_str().unwrap_or_default().to_string();
            let keep = chars / 4;
            let head: String = s.chars().take(keep).collect();
            let tail: String = s.chars().skip(chars - keep).collect();
            let cut = chars - 2 * keep;
            m.insert(
                key,
                Value::from(format!(
                    "{head}\n[... {cut} characters cut by xcp-vm-agent: result over {} KiB ...]\n{tail}",
                    max / 1024
                )),
            );
            m.insert("result_original_bytes".into(), Value::from(original as u64));
            if self.json_len() <= max {
                return self;
            }
        }
        self.details = serde_json::json!({
            "result_original_bytes": original as u64,
            "result_cut": format!("details of {original} bytes removed: over the {} KiB result bound", max / 1024),
        });
        if self.message.len() > 4096 {
            let mut end = 4096;
            while !self.message.is_char_boundary(end) {
                end -= 1;
            }
            self.message.truncate(end);
            self.message.push_str(" [...]");
        }
        self
    }
}

/// Everything an operation may use besides its parameters.
pub struct JobContext {
    pub state_dir: PathBuf,
    pub fstab_path: PathBuf,
    pub runner: Runner,
    /// Where xenstore lives, for `{"xen_vbd": N}` targets (None: autodetect).
    pub xenstore_path: Option<PathBuf>,
    /// Set when the agent is shutting down: long jobs (RunScript) stop and
    /// answer `interrupted`.
    pub cancel: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl JobContext {
    pub fn new(state_dir: PathBuf, fstab_path: PathBuf, dry_run: bool) -> Self {
        JobContext {
            state_dir,
            fstab_path,
            runner: Runner::new(dry_run),
            xenstore_path: None,
            cancel: Default::default(),
        }
    }
}

/// Parse a job's params into a typed struct, answering `refused` with the
/// serde message (which names the field) when they do not fit.
pub fn parse_params<T: serde::de::DeserializeOwned>(op: &str, params: &Value) -> Result<T, JobResult> {
    let v = if params.is_null() { Value::Object(Default::default()) } else { params.clone() };
    // serde_path_to_error names the field of a type error ("timeout_seconds:
    // invalid type: string, expected u64"), which serde alone does not.
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path.is_empty() || path == "." {
            JobResult::refused(format!("invalid parameters for {op}: {inner}"))
        } else {
            JobResult::refused(format!("invalid parameters for {op}: field `{path}`: {inner}"))
        }
    })
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Run one job to completion: allowlist check, dispatch, timing. Never
/// panics on bad input: every problem becomes a result.
pub fn execute(ctx: &JobContext, job: &Job, allowed: &[String]) -> JobResult {
    let started = std::time::Instant::now();
    let started_at = now_unix();
    let mut r = if !OPERATIONS.contains(&job.operation.as_str()) {
        JobResult::refused(format!(
            "unknown operation {:?}; this agent offers {}",
            job.operation,
            OPERATIONS.join(", ")
        ))
    } else if !allowed.iter().any(|a| a == &job.operation) {
        JobResult::refused(format!(
            "operation {} is not in allowed_operations ({}) of this agent's config",
            job.operation,
            allowed.join(", ")
        ))
    } else {
        match job.operation.as_str() {
            "RunScript" => run_script::run(ctx, &job.params),
            "ExtendPartition" => crate::disk::extend::run(ctx, &job.params),
            "InitializeDisk" => crate::disk::initialize::run(ctx, &job.params),
            #[cfg(feature = "guest")]
            "FreezeFilesystems" => crate::guest::freeze::run(ctx, &job.params),
            #[cfg(feature = "guest")]
            "ThawFilesystems" => crate::guest::freeze::thaw(ctx, &job.params),
            #[cfg(feature = "guest")]
            "TrimFilesystems" => crate::guest::fsreport::trim(ctx, &job.params),
            #[cfg(feature = "guest")]
            "Reboot" => crate::guest::power::run(ctx, &job.params, "reboot"),
            #[cfg(feature = "guest")]
            "Shutdown" => crate::guest::power::run(ctx, &job.params, "poweroff"),
            _ => unreachable!(),
        }
    };
    if ctx.runner.dry_run() {
        if let Value::Object(m) = &mut r.details {
            m.insert("dry_run".into(), Value::Bool(true));
            m.insert("plan".into(), Value::from(ctx.runner.plan()));
        }
    }
    r.job_id = job.id.clone();
    r.operation = job.operation.clone();
    r.started_at = started_at;
    r.finished_at = now_unix();
    r.duration_ms = started.elapsed().as_millis() as u64;
    r
}
