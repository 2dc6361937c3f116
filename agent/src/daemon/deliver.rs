//! Result delivery: spooled results (and those kept in memory when the
//! spool could not take them) go to the server in batches of at most
//! [`REQUEST_BUDGET`] bytes; a batch refused for good is sent one result at
//! a time, and a result refused for good is replaced by a small `failed`
//! note, dropped only once the note is acknowledged (docs/architecture.md,
//! "The spool always drains"). Also the best-effort "running" report.
use anyhow::{bail, Result};
use serde_json::json;

use super::agent::Agent;
use crate::jobs::{self, Job, JobResult, Status};
use crate::protocol::ResultsReport;
use crate::state::Spooled;

/// Most bytes of results in one results request (the server takes 4 MiB).
pub const REQUEST_BUDGET: usize = 1 << 20;
/// Results requests made before a check-in, so a long spool does not delay
/// it; the rest go after it.
pub(super) const REQUESTS_BEFORE_CHECKIN: usize = 4;
/// How many results from the start of `rs` go in one request: up to 16,
/// within [`REQUEST_BUDGET`], at least one.
fn batch_len(rs: &mut dyn Iterator<Item = &JobResult>) -> usize {
    let mut bytes = 0;
    let mut n = 0;
    for r in rs.take(16) {
        bytes += serde_json::to_vec(r).map(|v| v.len()).unwrap_or(0);
        if n > 0 && bytes > REQUEST_BUDGET {
            break;
        }
        n += 1;
    }
    n
}

/// How a result the server refused for good begins once replaced.
const REFUSED_NOTE: &str = "the server refused this job's result for good";

fn is_final_refusal(e: &anyhow::Error) -> bool {
    e.downcast_ref::<crate::client::HttpRefusal>().is_some_and(|r| r.is_final())
}
impl Agent {
    /// Send spooled results (and those that could not be spooled), at most
    /// `max_requests` requests of at most [`REQUEST_BUDGET`] bytes each;
    /// drop those the server acknowledged. A batch refused for good is sent
    /// again one result at a time; a result refused for good is replaced by
    /// a small `failed` note saying why, dropped only once the note is
    /// acknowledged, so the spool drains and no result is lost to a server
    /// that refuses everything.
    pub fn deliver_results(&mut self, max_requests: usize) -> Result<usize> {
        let mut delivered = 0;
        let mut requests = 0;
        while !self.unspooled.is_empty() && requests < max_requests {
            let n = batch_len(&mut self.unspooled.iter());
            requests += 1;
            let batch: Vec<JobResult> = self.unspooled[..n].to_vec();
            let ours = match self.send(batch.clone()) {
                Ok(ours) => ours,
                Err(e) if is_final_refusal(&e) => {
                    for r in &batch {
                        requests += 1;
                        self.deliver_alone(r)?;
                        self.unspooled_done(&r.job_id)?;
                        delivered += 1;
                    }
                    continue;
                }
                Err(e) => return Err(e.context("delivering job results")),
            };
            for id in &ours {
                self.unspooled_done(id)?;
            }
            delivered += ours.len();
            if ours.len() < n {
                bail!("the server acknowledged {} of {n} results; the rest are sent again", ours.len());
            }
        }
        if crate::guest::freeze::blocks(&self.cfg.state_dir) {
            return Ok(delivered); // acknowledging would write to a frozen state dir
        }
        let pending = self.state.pending();
        let mut i = 0;
        while i < pending.len() && requests < max_requests {
            let batch: Vec<&Spooled> =
                pending[i..i + batch_len(&mut pending[i..].iter().map(|s| &s.result))].iter().collect();
            i += batch.len();
            requests += 1;
            let done: Vec<&Spooled> = match self.send(batch.iter().map(|s| s.result.clone()).collect()) {
                Ok(ours) => batch.iter().copied().filter(|s| ours.contains(&s.result.job_id)).collect(),
                Err(e) if is_final_refusal(&e) => {
                    // Find the culprit: one by one, each refused one replaced.
                    for s in &batch {
                        requests += 1;
                        self.deliver_alone(&s.result)?;
                        self.state.acknowledge(&[s])?;
                        delivered += 1;
                    }
                    continue;
                }
                Err(e) => return Err(e.context("delivering job results")),
            };
            delivered += done.len();
            self.state.acknowledge(&done)?;
            if done.len() < batch.len() {
                bail!("the server acknowledged {} of {} results; the rest stay in the spool", done.len(), batch.len());
            }
        }
        if delivered > 0 {
            tracing::info!(delivered, "job results delivered");
        }
        Ok(delivered)
    }

    /// A result kept in memory was delivered: forget it, and drop the
    /// running marker that spooling it would have removed (or a restart
    /// would report the job `interrupted` as well).
    pub(super) fn unspooled_done(&mut self, id: &str) -> Result<()> {
        self.unspooled.retain(|r| r.job_id != id);
        if crate::guest::freeze::blocks(&self.cfg.state_dir) {
            return Ok(()); // an unlink would wait for the thaw; settle() spools it and drops the marker
        }
        self.state.drop_marker(id)
    }

    /// Send one result; ids the server acknowledged.
    fn send(&self, results: Vec<JobResult>) -> Result<Vec<String>> {
        let ids: Vec<String> = results.iter().map(|r| r.job_id.clone()).collect();
        let report = ResultsReport { vm_uuid: self.identity.vm_uuid.clone(), results };
        let ack = self.client.send_results(&report)?;
        Ok(ack.acknowledged.into_iter().filter(|id| ids.contains(id)).collect())
    }

    /// Deliver one result of a batch refused for good (`why`): Ok once the
    /// server acknowledged it or, when it refuses it for good too, a small
    /// `failed` note in its place. Nothing on disk changes here: when the
    /// note is refused too (the whole endpoint refuses: a wrong URL, a 404
    /// for every path), the result is kept and sent again next cycle.
    fn deliver_alone(&mut self, res: &JobResult) -> Result<()> {
        let e = match self.send(vec![res.clone()]) {
            Ok(ours) if !ours.is_empty() => return Ok(()),
            Ok(_) => bail!("the server did not acknowledge the result of job {}", res.job_id),
            Err(e) if is_final_refusal(&e) => e,
            Err(e) => return Err(e.context("delivering job results")),
        };
        let size = serde_json::to_vec(res).map(|v| v.len()).unwrap_or(0);
        tracing::error!(job = %res.job_id, "the server refused this result for good ({e:#}); sending a note instead");
        let mut r = JobResult::failed(format!(
            "{REFUSED_NOTE} ({e:#}); the agent's result (status {}, {size} bytes of JSON) was replaced by this note",
            res.status.as_str()
        ))
        .with_details(json!({"original_status": res.status.as_str(), "original_bytes": size}));
        r.job_id = res.job_id.clone();
        r.operation = res.operation.clone();
        r.started_at = res.started_at;
        r.finished_at = res.finished_at;
        r.duration_ms = res.duration_ms;
        match self.send(vec![r]) {
            Ok(ours) if !ours.is_empty() => Ok(()),
            Ok(_) => bail!("the server did not acknowledge the result of job {}", res.job_id),
            Err(e) => Err(e.context(format!(
                "the note replacing the refused result of job {} failed; the result is kept",
                res.job_id
            ))),
        }
    }

    /// Tell the server a job started (best effort; not spooled).
    pub(super) fn report_running(&self, job: &Job) {
        let mut r = JobResult::new(Status::Running, "job started");
        r.job_id = job.id.clone();
        r.operation = job.operation.clone();
        r.started_at = jobs::now_unix();
        let report = ResultsReport { vm_uuid: self.identity.vm_uuid.clone(), results: vec![r] };
        if let Err(e) = self.client.send_results(&report) {
            tracing::debug!(job = %job.id, "could not report running: {e:#}");
        }
    }

    /// Log a failed delivery once per distinct error (debug after that).
    pub(super) fn delivery_failed(&mut self, e: &anyhow::Error) {
        let text = format!("{e:#}");
        if self.delivery_error.as_deref() != Some(text.as_str()) {
            tracing::warn!("result delivery failed (results stay in the spool, check-ins go on): {text}");
        } else {
            tracing::debug!("result delivery still failing: {text}");
        }
        self.delivery_error = Some(text);
    }
}
