//! Dispatch: the allowlist, the run of one job ([`execute`]), parameter
//! parsing, and the adapters from the protocol's job to each domain module
//! and from its report back to a [`JobResult`]. The wire types (`Job`,
//! `JobResult`, `Status`) are `protocol`'s, re-exported here.
//!
//! To add an operation: a variant of `protocol::Operation` (its one list), a
//! module with a `run(&JobContext, &serde_json::Value) -> JobResult`
//! function, and the arm in [`execute`] that the compiler then asks for.
//! Everything else (spool, dedup, allowlist, CLI `exec`) is shared.
pub mod disk;
pub mod run_script;
pub mod scope;

use serde_json::Value;

pub use crate::context::JobContext;
use crate::protocol::Operation;
pub use crate::protocol::{Job, JobResult, Status};

/// Every operation this agent can run, in the names the protocol uses
/// (`protocol::Operation::NAMES`; without the `guest` feature, the three
/// that are not guest control).
pub const OPERATIONS: &[&str] = Operation::NAMES;

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

pub use crate::logging::now_unix;

/// Run one job to completion: allowlist check, dispatch, timing. Never
/// panics on bad input: every problem becomes a result.
pub fn execute(ctx: &JobContext, job: &Job, allowed: &[Operation]) -> JobResult {
    let started = std::time::Instant::now();
    let started_at = now_unix();
    let mut r = match Operation::parse(&job.operation) {
        None => JobResult::refused(format!(
            "unknown operation {:?}; this agent offers {}",
            job.operation,
            OPERATIONS.join(", ")
        )),
        Some(op) if !allowed.contains(&op) => JobResult::refused(format!(
            "operation {} is not in allowed_operations ({}) of this agent's config",
            job.operation,
            allowed.iter().map(|o| o.name()).collect::<Vec<_>>().join(", ")
        )),
        Some(op) => match op {
            Operation::RunScript => run_script::run(ctx, &job.params),
            Operation::ExtendPartition => disk::extend(ctx, &job.params),
            Operation::InitializeDisk => disk::initialize(ctx, &job.params),
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

    fn job(op: &str, params: Value) -> Job {
        Job { id: "j-1".into(), operation: op.into(), params }
    }

    #[test]
    fn execute_refuses_unknown_and_not_allowed_operations() {
        let d = tempfile::tempdir().unwrap();
        let ctx = JobContext::new(d.path().into(), "/nonexistent/fstab".into(), false);
        let all = Operation::ALL;
        let r = execute(&ctx, &job("Format", json!({})), all);
        assert_eq!(r.status, Status::Refused);
        assert!(r.message.starts_with("unknown operation \"Format\"; this agent offers RunScript, "), "{}", r.message);
        let r = execute(&ctx, &job("RunScript", json!({"script": "true"})), &[Operation::InitializeDisk]);
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
        for op in OPERATIONS {
            let r = execute(&ctx, &job(op, json!({"no_such_parameter": 1})), Operation::ALL);
            assert_eq!(r.status, Status::Refused, "{op}: {}", r.message);
            assert!(r.message.contains(op) && r.message.contains("no_such_parameter"), "{op}: {}", r.message);
            assert_eq!((r.job_id.as_str(), r.operation.as_str()), ("j-1", *op));
        }
    }

    #[test]
    fn execute_times_the_job_and_marks_a_dry_run() {
        let d = tempfile::tempdir().unwrap();
        let all = &[Operation::RunScript];
        let ctx = JobContext::new(d.path().into(), "/nonexistent/fstab".into(), false);
        let before = now_unix();
        let r = execute(&ctx, &job("RunScript", json!({"script": "sleep 0.2; echo hi"})), all);
        assert_eq!(r.status, Status::Succeeded, "{}", r.message);
        assert_eq!(r.details["stdout"], "hi\n");
        assert!(r.details.get("dry_run").is_none());
        assert!(r.duration_ms >= 200, "{}", r.duration_ms);
        assert!(r.started_at >= before && r.finished_at >= r.started_at && r.finished_at <= now_unix());
        let ctx = JobContext::new(d.path().into(), "/nonexistent/fstab".into(), true);
        let r = execute(&ctx, &job("RunScript", json!({"script": "echo hi"})), all);
        assert_eq!(r.status, Status::Succeeded, "{}", r.message);
        assert_eq!(r.details["dry_run"], true);
        assert_eq!(r.details["plan"], json!(["/bin/bash SCRIPT"]));
    }
}
