//! The job model: what the server sends ([`Job`]), what the agent answers
//! ([`JobResult`], [`Status`]), the allowlist, and dispatch to the operations.
//!
//! To add an operation: a variant of `protocol::Operation` (its one list), a
//! module with a `run(&JobContext, &serde_json::Value) -> JobResult`
//! function, and the arm in [`execute`] that the compiler then asks for.
//! Everything else (spool, dedup, allowlist, CLI `exec`) is shared.
pub mod run_script;
pub mod scope;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::PathBuf;

use crate::protocol::Operation;
use crate::runner::Runner;

/// Every operation this agent can run, in the names the protocol uses
/// (`protocol::Operation::NAMES`; without the `guest` feature, the three
/// that are not guest control).
pub const OPERATIONS: &[&str] = Operation::NAMES;

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
    let mut r = match Operation::parse(&job.operation) {
        None => JobResult::refused(format!(
            "unknown operation {:?}; this agent offers {}",
            job.operation,
            OPERATIONS.join(", ")
        )),
        Some(_) if !allowed.iter().any(|a| a == &job.operation) => JobResult::refused(format!(
            "operation {} is not in allowed_operations ({}) of this agent's config",
            job.operation,
            allowed.join(", ")
        )),
        Some(op) => match op {
            Operation::RunScript => run_script::run(ctx, &job.params),
            Operation::ExtendPartition => crate::disk::extend::run(ctx, &job.params),
            Operation::InitializeDisk => crate::disk::initialize::run(ctx, &job.params),
            #[cfg(feature = "guest")]
            Operation::FreezeFilesystems => crate::guest::freeze::run(ctx, &job.params),
            #[cfg(feature = "guest")]
            Operation::ThawFilesystems => crate::guest::freeze::thaw(ctx, &job.params),
            #[cfg(feature = "guest")]
            Operation::TrimFilesystems => crate::guest::fsreport::trim(ctx, &job.params),
            #[cfg(feature = "guest")]
            Operation::Reboot => crate::guest::power::run(ctx, &job.params, "reboot"),
            #[cfg(feature = "guest")]
            Operation::Shutdown => crate::guest::power::run(ctx, &job.params, "poweroff"),
        },
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
    r.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ALL: [Status; 6] =
        [Status::Running, Status::Succeeded, Status::NoChange, Status::Refused, Status::Failed, Status::Interrupted];

    #[test]
    fn exit_codes_and_names_of_every_status() {
        let codes: Vec<i32> = ALL.iter().map(|s| s.exit_code()).collect();
        assert_eq!(codes, [0, 0, 0, 3, 1, 1]);
        for s in ALL {
            // as_str is the protocol's name: the one serde writes.
            assert_eq!(json!(s.as_str()), serde_json::to_value(s).unwrap(), "{s:?}");
        }
        let names: Vec<&str> = ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(names, ["running", "succeeded", "no_change", "refused", "failed", "interrupted"]);
    }

    #[test]
    fn constructors_set_status_message_and_details() {
        for (r, s) in [
            (JobResult::succeeded("m"), Status::Succeeded),
            (JobResult::no_change("m"), Status::NoChange),
            (JobResult::refused("m"), Status::Refused),
            (JobResult::failed("m"), Status::Failed),
        ] {
            assert_eq!((r.status, r.message.as_str(), &r.details), (s, "m", &json!({})));
        }
        assert_eq!(JobResult::failed("m").with_details(json!({"a": 1})).details, json!({"a": 1}));
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct P {
        #[serde(default)]
        n: u64,
        #[serde(default)]
        s: Option<String>,
    }

    #[derive(Debug, serde::Deserialize)]
    struct Required {
        #[allow(dead_code)]
        device: String,
    }

    #[test]
    fn parse_params_takes_null_as_no_params_and_names_the_field() {
        let p: P = parse_params("Op", &Value::Null).unwrap();
        assert_eq!((p.n, p.s), (0, None));
        let p: P = parse_params("Op", &json!({"n": 7, "s": "x"})).unwrap();
        assert_eq!((p.n, p.s.as_deref()), (7, Some("x")));
        let e = parse_params::<P>("Op", &json!({"n": "7"})).unwrap_err();
        assert_eq!(e.status, Status::Refused);
        assert!(
            e.message.starts_with("invalid parameters for Op: field `n`: invalid type: string \"7\""),
            "{}",
            e.message
        );
        // An error of the whole object has no field path to name.
        let e = parse_params::<Required>("Op", &json!({})).unwrap_err();
        assert_eq!(e.message, "invalid parameters for Op: missing field `device`");
        let e = parse_params::<P>("Op", &json!("x")).unwrap_err();
        assert!(e.message.starts_with("invalid parameters for Op: invalid type: string \"x\""), "{}", e.message);
    }

    #[test]
    fn now_unix_is_the_clock() {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        assert!(now_unix().abs_diff(t) <= 2, "{} vs {t}", now_unix());
    }

    fn with_string(len: usize) -> JobResult {
        let s: String = "H".repeat(len / 4) + &"M".repeat(len - len / 2) + &"T".repeat(len / 4);
        JobResult::failed("m").with_details(json!({"stdout": s, "exit_code": 2, "short": "kept"}))
    }

    #[test]
    fn bounded_keeps_a_result_that_fits() {
        let r = with_string(4000);
        let n = r.json_len();
        assert_eq!(r.clone().bounded(n), r, "exactly at the bound is within it");
        assert_ne!(r.clone().bounded(n - 1), r);
        assert!(n > 4000 && n < 4200, "{n}");
    }

    #[test]
    fn bounded_cuts_the_middle_of_the_longest_string() {
        let r = with_string(4000);
        let original = r.json_len() as u64;
        let b = r.bounded(3000);
        assert!(b.json_len() <= 3000);
        let want = format!(
            "{}\n[... 2000 characters cut by xcp-vm-agent: result over 2 KiB ...]\n{}",
            "H".repeat(1000),
            "T".repeat(1000)
        );
        assert_eq!(b.details["stdout"], json!(want));
        assert_eq!(b.details["short"], "kept");
        assert_eq!(b.details["exit_code"], 2);
        assert_eq!(b.details["result_original_bytes"], original);
        assert_eq!((b.status, b.message.as_str()), (Status::Failed, "m"));
        // A cut that lands exactly on the bound is not cut again.
        let at = with_string(4000).bounded(b.json_len());
        assert_eq!(at, b);
    }

    #[test]
    fn bounded_cuts_again_until_it_fits() {
        let r = with_string(100_000);
        let b = r.bounded(2048);
        assert!(b.json_len() <= 2048, "{}", b.json_len());
        let s = b.details["stdout"].as_str().unwrap();
        assert!(s.starts_with('H') && s.ends_with('T'), "{s}");
        assert!(s.contains("characters cut by xcp-vm-agent"), "{s}");
        assert_eq!(b.details["short"], "kept");
    }

    #[test]
    fn bounded_cuts_a_string_of_256_characters_but_not_of_255() {
        // 256 characters is long enough to cut: one cut fits.
        let r = JobResult::failed("m").with_details(json!({"s": "x".repeat(256)}));
        let b = r.clone().bounded(r.json_len() - 1);
        assert!(b.details["s"].as_str().unwrap().contains("characters cut"), "{:?}", b.details);
        // Below 256 strings are left alone: the details go.
        let r = JobResult::failed("m").with_details(json!({"s": "x".repeat(255)}));
        let b = r.clone().bounded(r.json_len() - 1);
        assert!(b.details.get("s").is_none(), "{:?}", b.details);
        assert!(b.details["result_cut"].as_str().unwrap().contains("removed"), "{:?}", b.details);
    }

    #[test]
    fn bounded_drops_details_and_shortens_the_message_when_strings_cannot_fit() {
        let numbers: Vec<u64> = (0..2000).collect();
        let r = JobResult::failed("€".repeat(2000)).with_details(json!({"n": numbers}));
        let original = r.json_len();
        let b = r.bounded(4096);
        assert_eq!(
            b.details,
            json!({"result_original_bytes": original,
                   "result_cut": format!("details of {original} bytes removed: over the 4 KiB result bound")})
        );
        // 6000 bytes of 3-byte characters: cut at the last boundary at or
        // below 4096 bytes (4095), then marked.
        assert_eq!(b.message.len(), 4095 + " [...]".len());
        assert!(b.message.ends_with("€ [...]"));
        // A message of exactly 4096 bytes stays whole.
        let r = JobResult::failed("a".repeat(4096)).with_details(json!({"n": numbers}));
        assert_eq!(r.bounded(4096).message, "a".repeat(4096));
    }

    fn job(op: &str, params: Value) -> Job {
        Job { id: "j-1".into(), operation: op.into(), params }
    }

    #[test]
    fn execute_refuses_unknown_and_not_allowed_operations() {
        let d = tempfile::tempdir().unwrap();
        let ctx = JobContext::new(d.path().into(), "/nonexistent/fstab".into(), false);
        let all: Vec<String> = OPERATIONS.iter().map(|s| s.to_string()).collect();
        let r = execute(&ctx, &job("Format", json!({})), &all);
        assert_eq!(r.status, Status::Refused);
        assert!(r.message.starts_with("unknown operation \"Format\"; this agent offers RunScript, "), "{}", r.message);
        let r = execute(&ctx, &job("RunScript", json!({"script": "true"})), &["InitializeDisk".to_string()]);
        assert_eq!(r.status, Status::Refused);
        assert_eq!(
            r.message,
            "operation RunScript is not in allowed_operations (InitializeDisk) of this agent's config"
        );
        assert_eq!((r.job_id.as_str(), r.operation.as_str()), ("j-1", "RunScript"));
    }

    #[test]
    fn execute_dispatches_every_operation() {
        // Each operation answers an unknown parameter with its own refusal:
        // the job reached it, and nothing ran.
        let d = tempfile::tempdir().unwrap();
        let ctx = JobContext::new(d.path().into(), "/nonexistent/fstab".into(), true);
        let all: Vec<String> = OPERATIONS.iter().map(|s| s.to_string()).collect();
        for op in OPERATIONS {
            let r = execute(&ctx, &job(op, json!({"no_such_parameter": 1})), &all);
            assert_eq!(r.status, Status::Refused, "{op}: {}", r.message);
            assert!(r.message.contains(op) && r.message.contains("no_such_parameter"), "{op}: {}", r.message);
            assert_eq!((r.job_id.as_str(), r.operation.as_str()), ("j-1", *op));
        }
    }

    #[test]
    fn execute_times_the_job_and_marks_a_dry_run() {
        let d = tempfile::tempdir().unwrap();
        let all = vec!["RunScript".to_string()];
        let ctx = JobContext::new(d.path().into(), "/nonexistent/fstab".into(), false);
        let before = now_unix();
        let r = execute(&ctx, &job("RunScript", json!({"script": "sleep 0.2; echo hi"})), &all);
        assert_eq!(r.status, Status::Succeeded, "{}", r.message);
        assert_eq!(r.details["stdout"], "hi\n");
        assert!(r.details.get("dry_run").is_none());
        assert!(r.duration_ms >= 200, "{}", r.duration_ms);
        assert!(r.started_at >= before && r.finished_at >= r.started_at && r.finished_at <= now_unix());
        let ctx = JobContext::new(d.path().into(), "/nonexistent/fstab".into(), true);
        let r = execute(&ctx, &job("RunScript", json!({"script": "echo hi"})), &all);
        assert_eq!(r.status, Status::Succeeded, "{}", r.message);
        assert_eq!(r.details["dry_run"], true);
        assert_eq!(r.details["plan"], json!(["/bin/bash SCRIPT"]));
    }
}
