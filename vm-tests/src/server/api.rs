//! Protocol v1 endpoints for agents: `POST /api/v1/checkin` and
//! `POST /api/v1/results` (see docs/protocol.md).
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use xcp_vm_agent::protocol::JobResult;
use xcp_vm_agent::protocol::{CheckIn, CheckInResponse, ResultsAck, CHECKIN_PATH, RESULTS_PATH};

use super::http::{Request, Response};
use super::store::Store;
use super::util::now;

pub struct Ctx {
    pub store: Arc<Store>,
    pub peer: String,
    pub client_cert: bool,
    /// The VM UUIDs the client certificate names (`urn:uuid:` URI SANs);
    /// empty for a certificate that names none (the shared test one).
    pub cert_vms: Vec<String>,
    pub max_wait: Duration,
}

impl Ctx {
    /// Whether this connection may speak for `vm`: a certificate that names
    /// a VM speaks for that VM only. The reason when not.
    fn refuse_for(&self, vm: &str) -> Option<String> {
        match self.cert_vms.as_slice() {
            [] => None,
            [one] if one.eq_ignore_ascii_case(vm) => None,
            [one] => Some(format!("this client certificate is for VM {one} and may not speak for VM {vm:?}")),
            many => {
                Some(format!("this client certificate names several VMs ({}); it may speak for none", many.join(", ")))
            }
        }
    }
}

/// Parse a JSON body into `T`, with an error that names the problem and,
/// where serde does not, the offending top-level field.
pub fn parse_body<T: DeserializeOwned>(what: &str, body: &[u8]) -> Result<T, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("{what}: malformed JSON: {e}"))?;
    if !v.is_object() {
        return Err(format!("{what}: the body must be a JSON object"));
    }
    parse_value(what, v)
}

pub fn parse_value<T: DeserializeOwned>(what: &str, v: Value) -> Result<T, String> {
    match serde_json::from_value::<T>(v.clone()) {
        Ok(t) => Ok(t),
        Err(e) => {
            let msg = e.to_string();
            match blame::<T>(&v, &msg) {
                Some(field) => Err(format!("{what}: field {field:?}: {msg}")),
                None => Err(format!("{what}: {msg}")),
            }
        }
    }
}

/// Which top-level field makes `v` fail to deserialize: the one whose
/// removal changes the error (serde reports a wrong type while visiting the
/// field, before it checks for missing ones).
fn blame<T: DeserializeOwned>(v: &Value, msg: &str) -> Option<String> {
    if msg.starts_with("missing field") {
        return None;
    }
    let obj = v.as_object()?;
    for k in obj.keys() {
        let mut o = obj.clone();
        o.remove(k);
        match serde_json::from_value::<T>(Value::Object(o)) {
            Ok(_) => return Some(k.clone()),
            Err(e) if e.to_string() != msg => return Some(k.clone()),
            Err(_) => {}
        }
    }
    None
}

pub fn route(ctx: &Ctx, req: &Request) -> (Response, Option<String>) {
    match (req.method.as_str(), req.path.as_str()) {
        ("POST", CHECKIN_PATH) => checkin(ctx, req),
        ("POST", RESULTS_PATH) => results(ctx, req),
        (_, CHECKIN_PATH) | (_, RESULTS_PATH) => {
            (Response::error(405, format!("method {} not allowed on {}; use POST", req.method, req.path)), None)
        }
        _ => (Response::error(404, format!("no such path {:?}", req.path)), None),
    }
}

fn checkin(ctx: &Ctx, req: &Request) -> (Response, Option<String>) {
    let ci: CheckIn = match parse_body("invalid check-in", &req.body) {
        Ok(c) => c,
        Err(e) => return (Response::error(400, e.clone()), Some(e)),
    };
    if let Some(m) = ctx.refuse_for(&ci.vm_uuid) {
        return (Response::error(403, m.clone()), Some(m));
    }
    let hold = Duration::from_secs(ci.wait_seconds).min(ctx.max_wait);
    match ctx.store.check_in(&ci, &ctx.peer, ctx.client_cert, hold) {
        Ok(jobs) => {
            let note = format!(
                "check-in vm {} agent {} wait {} s, {} job(s){}",
                ci.vm_uuid,
                ci.agent_version,
                ci.wait_seconds,
                jobs.len(),
                if jobs.is_empty() {
                    String::new()
                } else {
                    format!(
                        ": {}",
                        jobs.iter().map(|j| format!("{} {}", j.id, j.operation)).collect::<Vec<_>>().join(", ")
                    )
                }
            );
            (Response::ok(&CheckInResponse { jobs, server_time: now() }), Some(note))
        }
        Err(e) => {
            let m = format!("{e:#}");
            let status = if m.contains("vm_uuid") { 400 } else { 500 };
            (Response::error(status, m.clone()), Some(m))
        }
    }
}

fn results(ctx: &Ctx, req: &Request) -> (Response, Option<String>) {
    let v: Value = match serde_json::from_slice(&req.body) {
        Ok(v) => v,
        Err(e) => {
            let m = format!("invalid results report: malformed JSON: {e}");
            return (Response::error(400, m.clone()), Some(m));
        }
    };
    let report: xcp_vm_agent::protocol::ResultsReport = match parse_value("invalid results report", v.clone()) {
        Ok(r) => r,
        Err(e) => {
            // Name the element and field inside `results` when that is where it fails.
            let mut m = e;
            if let Some(items) = v.get("results").and_then(Value::as_array) {
                for (i, item) in items.iter().enumerate() {
                    if let Err(inner) = parse_value::<JobResult>(&format!("results[{i}]"), item.clone()) {
                        m = format!("invalid results report: {inner}");
                        break;
                    }
                }
            }
            return (Response::error(400, m.clone()), Some(m));
        }
    };
    if let Some(m) = ctx.refuse_for(&report.vm_uuid) {
        return (Response::error(403, m.clone()), Some(m));
    }
    match ctx.store.record_results(&report.vm_uuid, &report.results) {
        Ok((acknowledged, notes)) => {
            let mut note = format!(
                "results from vm {}: {}",
                report.vm_uuid,
                report
                    .results
                    .iter()
                    .map(|r| format!("{} {}", r.job_id, r.status.as_str()))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            for n in notes {
                note.push_str("; ");
                note.push_str(&n);
            }
            (Response::ok(&ResultsAck { acknowledged }), Some(note))
        }
        Err(e) => {
            let m = format!("cannot store results: {e:#}");
            (Response::error(500, m.clone()), Some(m))
        }
    }
}
