//! The server's state: agents, jobs and received results, kept in memory and
//! persisted as JSON files in the state directory (every write atomic and
//! fsync'd), reloaded on start so a restart loses nothing.
//!
//! Layout of the state directory:
//! - `agents/<vm_uuid>.json`: the last check-in of each agent ([`AgentRecord`]).
//! - `jobs/<id>.json`: each job with its status and result ([`JobRecord`]).
//! - `results/<job_id>.json`: the results received for that job id, in
//!   arrival order, including ignored duplicates and other VMs' attempts, at
//!   most [`MAX_RESULTS_PER_JOB`] ([`ResultLog`]). Results for ids this
//!   server never issued are acknowledged but not stored.
//!
//! One mutex guards everything; a condition variable is notified on every
//! change, which wakes held long-poll check-ins and admin waits.
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use xcp_vm_agent::protocol::CheckIn;
use xcp_vm_agent::protocol::{Job, JobResult, Status};

use super::util::{now_ms, safe_file_stem, uuid_v4, write_json};

/// Most results kept in one job's result log (applied, duplicates, other
/// VMs'); more are acknowledged, logged and dropped.
pub const MAX_RESULTS_PER_JOB: usize = 64;

/// A job's state on the server. `queued` and `delivered` are the server's
/// own; the others mirror the agent's [`Status`].
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Delivered,
    Running,
    Succeeded,
    NoChange,
    Refused,
    Failed,
    Interrupted,
}

impl JobState {
    pub fn is_final(self) -> bool {
        self >= JobState::Succeeded
    }
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Delivered => "delivered",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::NoChange => "no_change",
            JobState::Refused => "refused",
            JobState::Failed => "failed",
            JobState::Interrupted => "interrupted",
        }
    }
    pub fn parse(s: &str) -> Option<JobState> {
        serde_json::from_value(Value::String(s.to_string())).ok()
    }
}

impl From<Status> for JobState {
    fn from(s: Status) -> Self {
        match s {
            Status::Running => JobState::Running,
            Status::Succeeded => JobState::Succeeded,
            Status::NoChange => JobState::NoChange,
            Status::Refused => JobState::Refused,
            Status::Failed => JobState::Failed,
            Status::Interrupted => JobState::Interrupted,
        }
    }
}

/// One job as the admin API shows it and as `jobs/<id>.json` stores it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub vm_uuid: String,
    pub operation: String,
    pub params: Value,
    pub status: JobState,
    /// The result that decided `status` (the `running` report until a final
    /// one arrives); null before any.
    pub result: Option<JobResult>,
    /// Queue order.
    pub seq: u64,
    /// Unix seconds.
    pub created_at: u64,
    pub first_delivered_at: Option<u64>,
    pub last_delivered_at: Option<u64>,
    pub running_at: Option<u64>,
    pub finished_at: Option<u64>,
    /// Unix milliseconds of queueing, first delivery and the `running` report
    /// (job pickup latency for the benchmark).
    pub created_at_ms: u64,
    pub first_delivered_at_ms: Option<u64>,
    pub running_at_ms: Option<u64>,
    pub finished_at_ms: Option<u64>,
    /// How many check-in answers carried this job.
    pub delivery_count: u64,
    /// Set by `POST /admin/v1/jobs/{id}/redeliver`: deliver once more even
    /// though a result has arrived (tests of the agent's de-duplication).
    pub redeliver: bool,
    /// Results received for this job, and how many of them were ignored
    /// (a second final result, or a `running` report after the final one).
    pub results_received: u64,
    pub results_ignored: u64,
}

impl JobRecord {
    fn deliverable(&self) -> bool {
        self.redeliver || matches!(self.status, JobState::Queued | JobState::Delivered)
    }
    pub fn job(&self) -> Job {
        Job { id: self.id.clone(), operation: self.operation.clone(), params: self.params.clone() }
    }
}

/// The last check-in of one agent, as `agents/<vm_uuid>.json` stores it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentRecord {
    pub vm_uuid: String,
    pub agent_version: String,
    pub protocol_version: u32,
    pub identity: Value,
    pub capabilities: Vec<String>,
    pub metrics: Value,
    pub network: Value,
    #[serde(default)]
    pub inventory: Value,
    pub wait_seconds: u64,
    pub pending_results: u64,
    /// Unix seconds.
    pub first_seen: u64,
    pub last_checkin: u64,
    pub last_checkin_ms: u64,
    pub checkin_count: u64,
    /// Address the last check-in came from.
    pub peer: String,
    /// Whether the TLS connection presented a client certificate the CA signed.
    pub client_certificate: bool,
}

/// One entry of `results/<job_id>.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReceivedResult {
    pub received_at: u64,
    pub vm_uuid: String,
    /// `applied`, `ignored_duplicate` (the job already had a final result),
    /// or `wrong_vm` (the job belongs to another VM).
    pub disposition: String,
    pub result: JobResult,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct ResultLog {
    pub job_id: String,
    pub results: Vec<ReceivedResult>,
}

#[derive(Default)]
struct Inner {
    agents: BTreeMap<String, AgentRecord>,
    jobs: BTreeMap<String, JobRecord>,
    results: BTreeMap<String, ResultLog>,
    next_seq: u64,
}

pub struct Store {
    dir: PathBuf,
    inner: Mutex<Inner>,
    changed: Condvar,
}

fn load_dir<T: serde::de::DeserializeOwned>(dir: &Path) -> Result<Vec<T>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let p = e?.path();
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if name.starts_with('.') || !name.ends_with(".json") {
            continue;
        }
        let text = std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?;
        out.push(serde_json::from_slice(&text).with_context(|| format!("invalid state file {}", p.display()))?);
    }
    Ok(out)
}

impl Store {
    /// Open (creating if needed) the state directory and load what it holds.
    pub fn open(dir: &Path) -> Result<Store> {
        for sub in ["agents", "jobs", "results"] {
            std::fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("cannot create {}", dir.join(sub).display()))?;
        }
        let mut inner = Inner::default();
        for a in load_dir::<AgentRecord>(&dir.join("agents"))? {
            inner.agents.insert(a.vm_uuid.clone(), a);
        }
        for j in load_dir::<JobRecord>(&dir.join("jobs"))? {
            inner.next_seq = inner.next_seq.max(j.seq + 1);
            inner.jobs.insert(j.id.clone(), j);
        }
        for r in load_dir::<ResultLog>(&dir.join("results"))? {
            inner.results.insert(r.job_id.clone(), r);
        }
        Ok(Store { dir: dir.to_path_buf(), inner: Mutex::new(inner), changed: Condvar::new() })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn save_job(&self, j: &JobRecord) -> Result<()> {
        write_json(&self.dir.join("jobs").join(format!("{}.json", j.id)), j)
    }

    /// Queue a new job; returns its record.
    pub fn create_job(&self, vm_uuid: &str, operation: &str, params: Value) -> Result<JobRecord> {
        if !safe_file_stem(vm_uuid) {
            bail!("vm_uuid {vm_uuid:?} is not a plain identifier (letters, digits, '-', '_', '.')");
        }
        if operation.is_empty() {
            bail!("operation must not be empty");
        }
        let mut g = self.lock();
        let seq = g.next_seq;
        g.next_seq += 1;
        let t = now_ms();
        let j = JobRecord {
            id: uuid_v4(),
            vm_uuid: vm_uuid.to_string(),
            operation: operation.to_string(),
            params,
            status: JobState::Queued,
            result: None,
            seq,
            created_at: t / 1000,
            first_delivered_at: None,
            last_delivered_at: None,
            running_at: None,
            finished_at: None,
            created_at_ms: t,
            first_delivered_at_ms: None,
            running_at_ms: None,
            finished_at_ms: None,
            delivery_count: 0,
            redeliver: false,
            results_received: 0,
            results_ignored: 0,
        };
        self.save_job(&j)?;
        g.jobs.insert(j.id.clone(), j.clone());
        drop(g);
        self.changed.notify_all();
        Ok(j)
    }

    pub fn job(&self, id: &str) -> Option<JobRecord> {
        self.lock().jobs.get(id).cloned()
    }

    /// Jobs in queue order, optionally only those of one VM.
    pub fn jobs(&self, vm_uuid: Option<&str>) -> Vec<JobRecord> {
        let g = self.lock();
        let mut v: Vec<JobRecord> =
            g.jobs.values().filter(|j| vm_uuid.is_none_or(|u| j.vm_uuid == u)).cloned().collect();
        v.sort_by_key(|j| j.seq);
        v
    }

    pub fn agents(&self) -> Vec<AgentRecord> {
        self.lock().agents.values().cloned().collect()
    }

    pub fn results(&self, job_id: &str) -> Option<ResultLog> {
        self.lock().results.get(job_id).cloned()
    }

    /// Mark a job for one more delivery. Errors when the id is unknown.
    pub fn redeliver(&self, id: &str) -> Result<JobRecord> {
        let mut g = self.lock();
        let j = g.jobs.get_mut(id).with_context(|| format!("no job with id {id:?}"))?;
        j.redeliver = true;
        let j = j.clone();
        self.save_job(&j)?;
        drop(g);
        self.changed.notify_all();
        Ok(j)
    }

    /// Wait up to `timeout` for job `id` to reach at least `until`
    /// (`running` counts any final state too). Returns the job as it is then.
    pub fn wait_job(&self, id: &str, until: JobState, timeout: Duration) -> Option<JobRecord> {
        let deadline = Instant::now() + timeout;
        let mut g = self.lock();
        let mut first = true;
        loop {
            let j = g.jobs.get(id)?;
            let reached = if until.is_final() { j.status.is_final() } else { j.status >= until };
            let left = deadline.saturating_duration_since(Instant::now());
            if reached || left.is_zero() {
                return Some(j.clone());
            }
            if first {
                // Logged under the lock, before the first wait: a test that
                // sees this line knows a change from now on wakes this waiter.
                super::log(format!(
                    "admin: waiting up to {} s for job {id} to reach {} (now {})",
                    left.as_secs_f64().round(),
                    if until.is_final() { "a final state" } else { until.as_str() },
                    j.status.as_str()
                ));
                first = false;
            }
            g = self.changed.wait_timeout(g, left).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Record a check-in, then hold it until a job for this VM is
    /// deliverable or `hold` has passed; mark what is returned as delivered.
    pub fn check_in(&self, ci: &CheckIn, peer: &str, client_cert: bool, hold: Duration) -> Result<Vec<Job>> {
        if !safe_file_stem(&ci.vm_uuid) {
            bail!("vm_uuid {:?} is not a plain identifier (letters, digits, '-', '_', '.')", ci.vm_uuid);
        }
        let deadline = Instant::now() + hold;
        let mut g = self.lock();
        let t = now_ms();
        let prev = g.agents.get(&ci.vm_uuid);
        let rec = AgentRecord {
            vm_uuid: ci.vm_uuid.clone(),
            agent_version: ci.agent_version.clone(),
            protocol_version: ci.protocol_version,
            identity: ci.identity.clone(),
            capabilities: ci.capabilities.clone(),
            metrics: ci.metrics.clone(),
            network: ci.network.clone(),
            inventory: ci.inventory.clone(),
            wait_seconds: ci.wait_seconds,
            pending_results: ci.pending_results,
            first_seen: prev.map(|p| p.first_seen).unwrap_or(t / 1000),
            last_checkin: t / 1000,
            last_checkin_ms: t,
            checkin_count: prev.map(|p| p.checkin_count).unwrap_or(0) + 1,
            peer: peer.to_string(),
            client_certificate: client_cert,
        };
        write_json(&self.dir.join("agents").join(format!("{}.json", rec.vm_uuid)), &rec)?;
        g.agents.insert(rec.vm_uuid.clone(), rec);
        drop(g);
        self.changed.notify_all();

        let mut g = self.lock();
        loop {
            let mut ids: Vec<(u64, String)> = g
                .jobs
                .values()
                .filter(|j| j.vm_uuid == ci.vm_uuid && j.deliverable())
                .map(|j| (j.seq, j.id.clone()))
                .collect();
            let left = deadline.saturating_duration_since(Instant::now());
            if !ids.is_empty() {
                ids.sort();
                let t = now_ms();
                let mut out = Vec::new();
                for (_, id) in ids {
                    let j = g.jobs.get_mut(&id).expect("id from the map");
                    j.delivery_count += 1;
                    j.redeliver = false;
                    if j.status == JobState::Queued {
                        j.status = JobState::Delivered;
                    }
                    j.first_delivered_at.get_or_insert(t / 1000);
                    j.first_delivered_at_ms.get_or_insert(t);
                    j.last_delivered_at = Some(t / 1000);
                    let j = j.clone();
                    self.save_job(&j)?;
                    out.push(j.job());
                }
                drop(g);
                self.changed.notify_all();
                return Ok(out);
            }
            if left.is_zero() {
                return Ok(Vec::new());
            }
            g = self.changed.wait_timeout(g, left).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Store results durably; returns the ids to acknowledge (all of them:
    /// unknown jobs and duplicates are acknowledged too, and logged; results
    /// for unknown jobs are not stored).
    pub fn record_results(&self, vm_uuid: &str, results: &[JobResult]) -> Result<(Vec<String>, Vec<String>)> {
        let mut acked = Vec::new();
        let mut notes = Vec::new();
        let mut g = self.lock();
        for r in results {
            let t = now_ms();
            let disposition = match g.jobs.get_mut(&r.job_id) {
                None => "unknown_job",
                Some(j) if j.vm_uuid != vm_uuid => "wrong_vm",
                Some(j) => {
                    j.results_received += 1;
                    let new = JobState::from(r.status);
                    let applied = if j.status.is_final() {
                        false
                    } else if new == JobState::Running {
                        if j.status != JobState::Running {
                            j.status = JobState::Running;
                            j.running_at = Some(t / 1000);
                            j.running_at_ms = Some(t);
                            j.result = Some(r.clone());
                        }
                        true
                    } else {
                        j.status = new;
                        j.finished_at = Some(t / 1000);
                        j.finished_at_ms = Some(t);
                        j.result = Some(r.clone());
                        true
                    };
                    if !applied {
                        j.results_ignored += 1;
                    }
                    let j = j.clone();
                    self.save_job(&j)?;
                    if applied {
                        "applied"
                    } else {
                        "ignored_duplicate"
                    }
                }
            };
            if disposition != "applied" {
                notes.push(format!("result for job {} ({}): {disposition}", r.job_id, r.status.as_str()));
            }
            // Only results for jobs this server issued are kept, at most
            // MAX_RESULTS_PER_JOB of them: a peer cannot grow the state
            // directory with made-up ids or repeats. Refused ones are still
            // acknowledged (so the agent's spool drains) and logged.
            let kept = g.results.get(&r.job_id).map_or(0, |l| l.results.len());
            if disposition == "unknown_job" {
                notes.push(format!("job id {:?} is not a job of this server; result not stored", r.job_id));
            } else if kept >= MAX_RESULTS_PER_JOB {
                notes.push(format!("job {} already has {kept} results stored; this one is not", r.job_id));
            } else if safe_file_stem(&r.job_id) {
                let log = g
                    .results
                    .entry(r.job_id.clone())
                    .or_insert_with(|| ResultLog { job_id: r.job_id.clone(), results: Vec::new() });
                log.results.push(ReceivedResult {
                    received_at: t / 1000,
                    vm_uuid: vm_uuid.to_string(),
                    disposition: disposition.to_string(),
                    result: r.clone(),
                });
                let log = log.clone();
                write_json(&self.dir.join("results").join(format!("{}.json", r.job_id)), &log)?;
            } else {
                notes.push(format!("job id {:?} is not a plain identifier; result not stored", r.job_id));
            }
            acked.push(r.job_id.clone());
        }
        drop(g);
        self.changed.notify_all();
        Ok((acked, notes))
    }
}
