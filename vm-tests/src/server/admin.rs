//! The admin API (plain HTTP, loopback only): queue jobs, read jobs, results
//! and agents. Documented in docs/protocol.md, "Admin API"; bodies have
//! schemas in docs/schemas/admin-*.json.
//!
//! - `POST /admin/v1/jobs` `{"vm_uuid","operation","params"}` -> `{"id"}`
//! - `GET /admin/v1/jobs?vm_uuid=U` -> `{"jobs": [job...]}`
//! - `GET /admin/v1/jobs/{id}[?wait=S&until=STATE]` -> job (waits up to S
//!   seconds for the job to reach STATE, default: any final state)
//! - `POST /admin/v1/jobs/{id}/redeliver` -> job (deliver it once more)
//! - `GET /admin/v1/results/{job_id}` -> every result received for that id
//! - `GET /admin/v1/agents` -> `{"agents": [agent...]}`
//!
//! [`refuse`] comes first: a Host that is not the listen address, or a POST
//! that is not `application/json`, is refused (what a web page could send).
use serde::Deserialize;
use serde_json::{json, Value};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use super::api::parse_body;
use super::http::{Request, Response};
use super::store::{JobState, Store};

/// Longest an admin `?wait=` may hold.
const MAX_ADMIN_WAIT: u64 = 600;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewJob {
    pub vm_uuid: String,
    pub operation: String,
    #[serde(default)]
    pub params: Value,
}

/// Requests a web page could make: a Host that is not this listener's
/// address (DNS rebinding: a page of evil.example whose name now resolves to
/// 127.0.0.1) answers 403; a POST whose body is not declared
/// `application/json` (a form or `text/plain` POST, which browsers send
/// cross-origin without asking) answers 415. `localhost` and the loopback
/// literals count as this address when the port is the listener's.
pub fn refuse(req: &Request, local: SocketAddr) -> Option<Response> {
    let host = req.header("host").unwrap_or("");
    let ok_host = match host.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().ok() == Some(local.port()) => {
            let h = h.trim_start_matches('[').trim_end_matches(']');
            h.eq_ignore_ascii_case("localhost")
                || h.parse::<IpAddr>().is_ok_and(|ip| ip == local.ip() || ip.is_loopback())
        }
        _ => false,
    };
    if !ok_host {
        return Some(Response::error(
            403,
            format!("Host {host:?} is not this admin API's address {local}: refused (DNS rebinding protection)"),
        ));
    }
    let json = req
        .header("content-type")
        .and_then(|c| c.split(';').next())
        .is_some_and(|c| c.trim().eq_ignore_ascii_case("application/json"));
    if (req.method == "POST" || !req.body.is_empty()) && !json {
        return Some(Response::error(
            415,
            format!(
                "the admin API takes application/json bodies only (Content-Type: {:?})",
                req.header("content-type").unwrap_or("")
            ),
        ));
    }
    None
}

pub fn route(store: &Store, req: &Request) -> (Response, Option<String>) {
    let path = req.path.trim_end_matches('/');
    let parts: Vec<&str> = path.split('/').skip(1).collect();
    let m = req.method.as_str();
    let r = match parts.as_slice() {
        ["admin", "v1", "jobs"] => match m {
            "POST" => create(store, req),
            "GET" => Response::ok(&json!({ "jobs": store.jobs(req.query_param("vm_uuid").as_deref()) })),
            _ => method(req, "GET, POST"),
        },
        ["admin", "v1", "jobs", id] => match m {
            "GET" => get_job(store, req, id),
            _ => method(req, "GET"),
        },
        ["admin", "v1", "jobs", id, "redeliver"] => match m {
            "POST" => match store.redeliver(id) {
                Ok(j) => Response::ok(&j),
                Err(e) => Response::error(404, format!("{e:#}")),
            },
            _ => method(req, "POST"),
        },
        ["admin", "v1", "results", id] => match m {
            "GET" => match store.results(id) {
                Some(l) => Response::ok(&l),
                None => Response::error(404, format!("no result received for job id {id:?}")),
            },
            _ => method(req, "GET"),
        },
        ["admin", "v1", "agents"] => match m {
            "GET" => Response::ok(&json!({ "agents": store.agents() })),
            _ => method(req, "GET"),
        },
        _ => Response::error(404, format!("no such path {:?}", req.path)),
    };
    let note = if r.status >= 400 {
        serde_json::from_slice::<Value>(&r.body).ok().map(|v| v["error"].to_string())
    } else {
        None
    };
    (r, note)
}

fn method(req: &Request, allowed: &str) -> Response {
    Response::error(405, format!("method {} not allowed on {}; use {allowed}", req.method, req.path))
}

fn create(store: &Store, req: &Request) -> Response {
    let nj: NewJob = match parse_body("invalid job", &req.body) {
        Ok(j) => j,
        Err(e) => return Response::error(400, e),
    };
    match store.create_job(&nj.vm_uuid, &nj.operation, nj.params) {
        Ok(j) => Response::ok(&json!({ "id": j.id })),
        Err(e) => Response::error(400, format!("invalid job: {e:#}")),
    }
}

fn get_job(store: &Store, req: &Request, id: &str) -> Response {
    let wait = match req.query_param("wait").map(|w| w.parse::<u64>()) {
        None => 0,
        Some(Ok(w)) => w.min(MAX_ADMIN_WAIT),
        Some(Err(_)) => return Response::error(400, "wait must be a whole number of seconds"),
    };
    let until = match req.query_param("until") {
        None => JobState::Succeeded,
        Some(s) => match JobState::parse(&s) {
            Some(st) => st,
            None => return Response::error(400, format!("unknown state {s:?} in until")),
        },
    };
    match store.wait_job(id, until, Duration::from_secs(wait)) {
        Some(j) => Response::ok(&j),
        None => Response::error(404, format!("no job with id {id:?}")),
    }
}
