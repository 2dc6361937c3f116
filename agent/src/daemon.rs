//! The check-in loop: `run` (the daemon) and `once`.
//!
//! One cycle: deliver spooled results, check in (long-poll), run the jobs
//! that arrived one after another, deliver their results. Between cycles the
//! loop waits for the rest of `check_in_interval` (not at all when the
//! server held the request, or when jobs arrived), or for the backoff delay
//! after an error. State changes (server unreachable, back again) are logged
//! once, not on every retry.
//!
//! Shutdown: a signal thread handles SIGTERM/SIGINT/SIGHUP (blocked in every
//! other thread). On TERM it exits within 10 s: a job in a runner of its own
//! (`jobs::scope`) goes on and the next start waits for it and reports it;
//! a job run in this process is cancelled. Everything on disk is written
//! atomically, so exiting at any point loses nothing: a job cut off leaves
//! its running marker and is reported `interrupted` after restart.
#![allow(
    clippy::unwrap_used,
    reason = "mutex and condvar locks (panic = abort: none is ever poisoned) and piped child handles"
)]
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::backoff::{first_checkin_delay, Backoff, Rng};
use crate::client::Client;
use crate::config::Config;
use crate::jobs::{self, scope, Job, JobContext, JobResult, Status};
use crate::protocol::{CheckIn, ResultsReport, PROTOCOL_VERSION};
use crate::state::{Spooled, State};

/// Most bytes of results in one results request (the server takes 4 MiB).
pub const REQUEST_BUDGET: usize = 1 << 20;
/// Results requests made before a check-in, so a long spool does not delay
/// it; the rest go after it.
const REQUESTS_BEFORE_CHECKIN: usize = 4;
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

/// What a failed I/O call said, with its errno name: "No space left on
/// device (os error 28, ENOSPC)".
fn io_cause(e: &anyhow::Error) -> String {
    for c in e.chain() {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if let Some(n) = io.raw_os_error() {
                // The names a state directory write meets (a table, not
                // Errno's Debug: that costs kilobytes of the size budget).
                let name = match n {
                    28 => "ENOSPC",
                    122 => "EDQUOT",
                    30 => "EROFS",
                    13 => "EACCES",
                    1 => "EPERM",
                    5 => "EIO",
                    24 => "EMFILE",
                    23 => "ENFILE",
                    _ => "",
                };
                let text = io.to_string();
                let t = text.strip_suffix(&format!(" (os error {n})")).unwrap_or(&text);
                return if name.is_empty() { format!("{t} (errno {n})") } else { format!("{t} (errno {n}, {name})") };
            }
        }
    }
    format!("{e:#}")
}

/// What the status endpoint reports.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Health {
    pub healthy: bool,
    pub server_url: Option<String>,
    pub last_successful_checkin: Option<u64>,
    pub last_error: Option<String>,
    pub pending_results: usize,
    pub jobs_run: u64,
}

/// State shared between the loop, the signal thread and the status endpoint.
#[derive(Default)]
pub struct Shared {
    pub shutdown: AtomicBool,
    pub reload: AtomicBool,
    pub cancel: Arc<AtomicBool>,
    /// True while a job runs; guarded so no job starts after shutdown.
    pub busy: Mutex<bool>,
    pub cv: Condvar,
    pub health: Mutex<Health>,
    /// The configuration in force, replaced on every successful reload;
    /// threads other than the loop (the Xen publisher) read it from here.
    pub config: Mutex<Option<Config>>,
}

impl Shared {
    /// Sleep up to `d`, waking early on shutdown or reload.
    pub fn sleep(&self, d: Duration) {
        self.sleep_while(d, || !self.shutdown.load(Ordering::SeqCst) && !self.reload.load(Ordering::SeqCst))
    }

    /// Sleep up to `d`, waking early only on shutdown.
    pub fn sleep_unless_shutdown(&self, d: Duration) {
        self.sleep_while(d, || !self.shutdown.load(Ordering::SeqCst))
    }

    fn sleep_while(&self, d: Duration, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + d;
        let mut g = self.busy.lock().unwrap();
        while cond() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            g = self.cv.wait_timeout(g, deadline - now).unwrap().0;
        }
    }
}

pub struct Agent {
    pub cfg: Config,
    client: Client,
    pub state: State,
    sampler: crate::metrics::Sampler,
    pub shared: Arc<Shared>,
    identity: crate::identity::Identity,
    /// The disk inventory and when it was taken; refreshed at most every
    /// [`INVENTORY_MAX_AGE`], and after every job.
    inventory: Option<(Instant, Value)>,
    /// Results that could not be written to the spool (full disk): sent
    /// from memory.
    unspooled: Vec<JobResult>,
    /// Markers of a previous life not yet turned into results (the disk
    /// was full at start-up): retried every cycle.
    recovery_due: bool,
    /// Why the last result delivery failed, while it keeps failing.
    delivery_error: Option<String>,
}

/// How long a disk inventory is reused between check-ins.
const INVENTORY_MAX_AGE: Duration = Duration::from_secs(300);

impl Agent {
    pub fn new(cfg: Config, shared: Arc<Shared>) -> Result<Agent> {
        let client = Client::new(&cfg)?;
        let state = State::open(&cfg.state_dir)?;
        let identity = crate::identity::current();
        for w in &identity.warnings {
            tracing::warn!("{w}");
        }
        Ok(Agent {
            cfg,
            client,
            state,
            sampler: Default::default(),
            shared,
            identity,
            inventory: None,
            unspooled: Vec::new(),
            recovery_due: true,
            delivery_error: None,
        })
    }

    /// Take a new configuration (SIGHUP): a new client, and a new state
    /// directory only if it moved (this process already holds the old one's
    /// lock). Nothing changes when any part fails.
    pub fn reload(&mut self, cfg: Config) -> Result<()> {
        for w in &cfg.warnings {
            tracing::warn!("{w}");
        }
        let client = Client::new(&cfg)?;
        if cfg.state_dir != self.cfg.state_dir {
            self.state = State::open(&cfg.state_dir)?;
            self.recovery_due = true;
        }
        self.client = client;
        self.cfg = cfg;
        self.identity = crate::identity::current();
        self.inventory = None;
        Ok(())
    }

    fn current_inventory(&mut self) -> Value {
        let fresh = self.inventory.as_ref().is_some_and(|(t, _)| t.elapsed() < INVENTORY_MAX_AGE);
        if !fresh {
            let inv = crate::disk::inventory().unwrap_or_else(|e| {
                tracing::warn!("check-in without a disk inventory: {e:#}");
                Value::Null
            });
            self.inventory = Some((Instant::now(), inv));
        }
        self.inventory.as_ref().map(|(_, v)| v.clone()).unwrap_or(Value::Null)
    }

    fn checkin_message(&mut self, wait_seconds: u64) -> CheckIn {
        let inventory = self.current_inventory();
        CheckIn {
            protocol_version: PROTOCOL_VERSION,
            agent_version: crate::VERSION.to_string(),
            vm_uuid: self.identity.vm_uuid.clone(),
            identity: serde_json::to_value(&self.identity).unwrap_or(Value::Null),
            capabilities: self.cfg.allowed_operations.clone(),
            metrics: serde_json::to_value(self.sampler.sample()).unwrap_or(Value::Null),
            network: serde_json::to_value(crate::metrics::network()).unwrap_or(Value::Null),
            inventory,
            wait_seconds,
            pending_results: self.state.pending_count() as u64,
        }
    }

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
    fn unspooled_done(&mut self, id: &str) -> Result<()> {
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
    fn report_running(&self, job: &Job) {
        let mut r = JobResult::new(Status::Running, "job started");
        r.job_id = job.id.clone();
        r.operation = job.operation.clone();
        r.started_at = jobs::now_unix();
        let report = ResultsReport { vm_uuid: self.identity.vm_uuid.clone(), results: vec![r] };
        if let Err(e) = self.client.send_results(&report) {
            tracing::debug!(job = %job.id, "could not report running: {e:#}");
        }
    }

    /// Record a job's start; when that cannot be done (full disk), answer
    /// it `failed` from memory without running it.
    fn record_start(&mut self, job: &Job) -> bool {
        match self.state.begin(job) {
            Ok(()) => true,
            Err(e) => {
                let dir = self.cfg.state_dir.display().to_string();
                let cause = io_cause(&e);
                tracing::error!(job = %job.id, "job not run: cannot record its start in {dir}: {e:#}");
                self.state.forget_start(job);
                let mut r = JobResult::failed(format!(
                    "not run: the agent cannot record this job in its state directory {dir}: {cause}; free space \
                     there and queue the job again"
                ))
                .with_details(json!({"state_dir": dir, "error": format!("{e:#}")}));
                r.job_id = job.id.clone();
                r.operation = job.operation.clone();
                r.started_at = jobs::now_unix();
                r.finished_at = r.started_at;
                self.unspooled.push(r);
                false
            }
        }
    }

    /// Spool a final result; when the spool cannot take it, keep it in
    /// memory for delivery.
    fn record_finish(&mut self, r: JobResult) {
        if crate::guest::freeze::blocks(&self.cfg.state_dir) {
            crate::guest::freeze::defer(&r);
            self.unspooled.push(r);
            return;
        }
        if let Err(e) = self.state.finish(&r) {
            tracing::error!(job = %r.job_id, "cannot spool the result, delivering it from memory: {e:#}");
            self.unspooled.push(r.bounded(crate::state::RESULT_MAX_BYTES));
        }
    }

    /// Turn one raw job from the server into a spooled result.
    fn handle(&mut self, raw: Value) -> Result<()> {
        let job: Job = match serde_json::from_value::<Job>(raw.clone()) {
            Ok(j) => j,
            Err(e) => {
                let id = raw.get("id").and_then(Value::as_str).unwrap_or("").to_string();
                if id.is_empty() || id.len() > 256 {
                    tracing::error!(
                        "server sent a job without a usable id, ignored: {e}; job: {}",
                        trunc(&raw.to_string())
                    );
                    return Ok(());
                }
                if self.state.is_seen(&id) {
                    return Ok(());
                }
                tracing::error!(job = %id, "malformed job refused: {e}");
                let j = Job {
                    id: id.clone(),
                    operation: raw["operation"].as_str().unwrap_or("").into(),
                    params: Value::Null,
                };
                if !self.record_start(&j) {
                    return Ok(());
                }
                let mut r = JobResult::refused(format!("malformed job: {e}"));
                r.job_id = id;
                r.operation = j.operation;
                r.finished_at = jobs::now_unix();
                self.record_finish(r);
                return Ok(());
            }
        };
        if job.id.is_empty() || job.id.len() > 256 {
            tracing::error!("server sent a job with an empty or over-long id, ignored");
            return Ok(());
        }
        if self.state.is_seen(&job.id) || self.unspooled.iter().any(|r| r.job_id == job.id) {
            tracing::info!(job = %job.id, "job delivered again; it already ran here, not running it twice");
            return Ok(());
        }
        {
            let mut busy = self.shared.busy.lock().unwrap();
            if self.shared.shutdown.load(Ordering::SeqCst) {
                return Ok(());
            }
            *busy = true;
        }
        struct NotBusy<'a>(&'a Shared);
        impl Drop for NotBusy<'_> {
            fn drop(&mut self) {
                *self.0.busy.lock().unwrap() = false;
                self.0.cv.notify_all();
            }
        }
        let shared = self.shared.clone();
        let _guard = NotBusy(&shared);
        let mut ctx = JobContext::new(self.cfg.state_dir.clone(), self.cfg.fstab_path.clone(), false);
        ctx.cancel = self.shared.cancel.clone();
        if crate::guest::freeze::blocks(&self.cfg.state_dir) {
            // Nothing may be written to a frozen state directory.
            let r = crate::guest::freeze::run_while_frozen(&ctx, &job, &self.cfg.allowed_operations);
            self.unspooled.push(r);
            return Ok(());
        }
        if !self.record_start(&job) {
            return Ok(());
        }
        tracing::info!(job = %job.id, operation = %job.operation, "job started");
        self.report_running(&job);
        if scope::SCOPED.contains(&job.operation.as_str()) && self.cfg.allowed_operations.contains(&job.operation) {
            // In a runner of its own (jobs::scope), which spools the result.
            let stem = crate::state::file_stem(&job.id);
            match scope::launch(&self.cfg.state_dir, &stem, &self.cfg.fstab_path) {
                Ok(()) => self.wait_runner(&stem, Instant::now() + Duration::from_secs(120)),
                Err(e) => {
                    let mut r = JobResult::failed(format!("not run: cannot start the job's runner: {e}"));
                    r.job_id = job.id.clone();
                    r.operation = job.operation.clone();
                    self.record_finish(r);
                }
            }
        } else {
            let r = jobs::execute(&ctx, &job, &self.cfg.allowed_operations);
            tracing::info!(job = %job.id, status = r.status.as_str(), "job finished: {}", r.message);
            self.record_finish(r);
        }
        // A job may have changed the disks: take a new inventory next time.
        self.inventory = None;
        self.shared.health.lock().unwrap().jobs_run += 1;
        Ok(())
    }

    /// Wait for the runner of the job of marker `running/<stem>.json` to
    /// end (`jobs::scope`); one not started by `start_by` is given up on. A
    /// runner that died leaves its job `interrupted`. Returns at shutdown
    /// too: the job goes on, and the next start waits for it.
    fn wait_runner(&mut self, stem: &str, start_by: Instant) {
        loop {
            jobs::run_script::reap_orphans(0);
            match scope::check(&self.cfg.state_dir, stem, Instant::now() > start_by) {
                scope::Runner::Running if !self.shared.shutdown.load(Ordering::SeqCst) => {
                    self.shared.sleep_unless_shutdown(Duration::from_millis(300))
                }
                scope::Runner::Running => {
                    tracing::info!(job = %stem, "the job goes on in its own process; the next start reports it");
                    return;
                }
                scope::Runner::Ended => {
                    tracing::info!(job = %stem, "job ended, result spooled");
                    return;
                }
                scope::Runner::Lost(Some(r)) => {
                    // Its runner could not spool it (full disk).
                    self.record_finish(r);
                    return;
                }
                scope::Runner::Lost(None) => {
                    // Its marker becomes `interrupted`.
                    if self.state.recover_interrupted().is_err() {
                        self.recovery_due = true;
                    }
                    return;
                }
            }
        }
    }

    /// One cycle. Returns how many jobs arrived. Result delivery failing
    /// does not keep the check-in from happening.
    pub fn cycle(&mut self, wait_seconds: u64) -> Result<usize> {
        // Orphans of an earlier script that ended after it.
        jobs::run_script::reap_orphans(0);
        if self.recovery_due {
            match self.state.recover_interrupted() {
                Ok(n) => {
                    self.recovery_due = false;
                    if n > 0 {
                        tracing::warn!(
                            recovered = n,
                            "jobs cut off by an earlier stop will be reported as interrupted"
                        );
                    }
                }
                Err(e) => tracing::error!("cannot turn the running markers of an earlier run into results yet: {e:#}"),
            }
            for stem in std::mem::take(&mut self.state.adopted) {
                tracing::info!(job = %stem, "a job started before this start still runs; waiting for its end");
                self.wait_runner(&stem, Instant::now());
            }
        }
        crate::guest::freeze::settle(&mut self.state, &mut self.unspooled)?;
        let mut delivery: Result<usize> = Ok(0);
        if self.state.pending_count() > 0 || !self.unspooled.is_empty() {
            delivery = self.deliver_results(REQUESTS_BEFORE_CHECKIN);
            if let Err(e) = &delivery {
                self.delivery_failed(e);
            }
        }
        self.power_after_delivery();
        let msg = self.checkin_message(wait_seconds);
        let jobs = self.client.checkin(&msg)?;
        self.mark_success();
        let n = jobs.len();
        for raw in jobs {
            if self.shared.shutdown.load(Ordering::SeqCst) {
                break;
            }
            self.handle(raw)?;
        }
        if n > 0 || delivery.is_err() || self.state.pending_count() > 0 || !self.unspooled.is_empty() {
            // The server took the check-in: a failed delivery is retried next
            // cycle at the normal pace, never by backing off check-ins.
            match self.deliver_results(usize::MAX) {
                Ok(_) => self.delivery_error = None,
                Err(e) => self.delivery_failed(&e),
            }
            self.power_after_delivery();
        } else if delivery.is_ok() {
            self.delivery_error = None;
        }
        Ok(n)
    }

    /// A Reboot/Shutdown asked for is acted on once every result is
    /// delivered (`guest::power`).
    fn power_after_delivery(&mut self) {
        if crate::guest::freeze::blocks(&self.cfg.state_dir) {
            return;
        }
        let left = self.state.pending_count() + self.unspooled.len();
        let shared = self.shared.clone();
        crate::guest::power::after_delivery(&self.cfg.state_dir, left, |d| shared.sleep_unless_shutdown(d));
    }

    fn mark_success(&self) {
        let mut h = self.shared.health.lock().unwrap();
        h.healthy = true;
        h.last_successful_checkin = Some(jobs::now_unix());
        h.last_error = None;
    }

    /// Log a failed delivery once per distinct error (debug after that).
    fn delivery_failed(&mut self, e: &anyhow::Error) {
        let text = format!("{e:#}");
        if self.delivery_error.as_deref() != Some(text.as_str()) {
            tracing::warn!("result delivery failed (results stay in the spool, check-ins go on): {text}");
        } else {
            tracing::debug!("result delivery still failing: {text}");
        }
        self.delivery_error = Some(text);
    }

    fn update_health(&self, err: Option<&anyhow::Error>) {
        let mut h = self.shared.health.lock().unwrap();
        h.pending_results = self.state.pending_count();
        h.server_url = self.cfg.server_url.clone();
        if let Some(e) = err {
            h.healthy = false;
            h.last_error = Some(format!("{e:#}"));
        } else if let Some(d) = &self.delivery_error {
            h.last_error = Some(d.clone());
        }
    }
}

fn trunc(s: &str) -> String {
    s.chars().take(200).collect()
}

/// `xcp-vm-agent once`: one check-in, run what arrived, deliver, exit.
pub fn once(cfg: Config) -> Result<()> {
    let shared = Arc::new(Shared::default());
    let mut agent = Agent::new(cfg, shared)?;
    let n = agent.cycle(0).context("check-in failed")?;
    let left = agent.state.pending_count() + agent.unspooled.len();
    if left > 0 {
        match &agent.delivery_error {
            Some(e) => bail!("{left} job result(s) could not be delivered and stay in the spool: {e}"),
            None => bail!("{left} job result(s) could not be delivered and stay in the spool"),
        }
    }
    tracing::info!(jobs = n, "check-in complete");
    Ok(())
}

/// Block the signals the signal thread handles, in this thread and so in
/// every thread spawned after it.
fn signal_set() -> nix::sys::signal::SigSet {
    use nix::sys::signal::{SigSet, Signal};
    let mut s = SigSet::empty();
    s.add(Signal::SIGTERM);
    s.add(Signal::SIGINT);
    s.add(Signal::SIGHUP);
    s
}

fn spawn_signal_thread(shared: Arc<Shared>) -> Result<()> {
    use nix::sys::signal::Signal;
    let set = signal_set();
    set.thread_block().context("cannot block signals")?;
    std::thread::Builder::new().name("signals".into()).spawn(move || loop {
        let Ok(sig) = set.wait() else { continue };
        match sig {
            Signal::SIGHUP => {
                tracing::info!("SIGHUP: reloading the configuration");
                shared.reload.store(true, Ordering::SeqCst);
                shared.cv.notify_all();
            }
            _ => {
                tracing::info!("{sig}: shutting down");
                shared.shutdown.store(true, Ordering::SeqCst);
                shared.cancel.store(true, Ordering::SeqCst);
                shared.cv.notify_all();
                let deadline = Instant::now() + Duration::from_secs(9);
                let mut busy = shared.busy.lock().unwrap();
                while *busy && Instant::now() < deadline {
                    busy = shared.cv.wait_timeout(busy, deadline - Instant::now()).unwrap().0;
                }
                if *busy {
                    tracing::warn!(
                        "the running job did not stop in time; it will be reported as interrupted after restart"
                    );
                }
                #[allow(clippy::exit, reason = "SIGTERM with nothing left to wait for: the signal thread ends the process, as docs/architecture.md says")]
                std::process::exit(0);
            }
        }
    })?;
    Ok(())
}

/// Guest-tools keys for the toolstack, refreshed every 30 s on a thread of
/// their own so they stay current while the server is unreachable.
fn spawn_xen_publisher(shared: Arc<Shared>) -> Result<()> {
    std::thread::Builder::new().name("xen-publish".into()).spawn(move || {
        let mut p = crate::xen::publish::Publisher::new();
        while !shared.shutdown.load(Ordering::SeqCst) {
            // `xenstore_publish: never` makes a tick do nothing.
            if let Some(cfg) = shared.config.lock().unwrap().clone() {
                p.tick(&cfg);
            }
            shared.sleep_unless_shutdown(Duration::from_secs(30));
        }
    })?;
    Ok(())
}

/// `xcp-vm-agent run`: the daemon. Returns only on a fatal start-up error.
pub fn run(config_path: &std::path::Path, mut cfg: Config) -> Result<()> {
    let shared = Arc::new(Shared::default());
    spawn_signal_thread(shared.clone())?;
    if let Some(addr) = cfg.status_listen {
        crate::status::spawn(addr, shared.clone())?;
    }
    *shared.config.lock().unwrap() = Some(cfg.clone());
    spawn_xen_publisher(shared.clone())?;
    let mut rng = Rng::from_entropy();
    // No server yet (fresh package install): say once what to configure and
    // wait for SIGHUP instead of exiting, so the service does not crash-loop.
    while cfg.server_url.is_none() {
        let e = cfg.require_server().unwrap_err();
        tracing::error!("{e}; then run: systemctl reload xcp-vm-agent (or send SIGHUP)");
        shared.health.lock().unwrap().last_error = Some(e.to_string());
        while !shared.reload.swap(false, Ordering::SeqCst) {
            shared.sleep(Duration::from_secs(3600));
        }
        match crate::config::load(config_path) {
            Ok(c) => {
                *shared.config.lock().unwrap() = Some(c.clone());
                cfg = c;
            }
            Err(e) => tracing::error!("{e:#}"),
        }
    }
    let mut agent = loop {
        match Agent::new(cfg.clone(), shared.clone()) {
            Ok(a) => break a,
            Err(e) => {
                // Bad certificate paths and the like: say so, retry slowly
                // (the administrator may be fixing it), never crash-loop.
                tracing::error!("cannot start: {e:#}");
                shared.health.lock().unwrap().last_error = Some(format!("{e:#}"));
                shared.sleep(Duration::from_secs(60));
                if shared.reload.swap(false, Ordering::SeqCst) {
                    if let Ok(c) = crate::config::load(config_path) {
                        *shared.config.lock().unwrap() = Some(c.clone());
                        cfg = c;
                    }
                }
            }
        }
    };
    tracing::info!(
        server = agent.cfg.server_url.as_deref().unwrap_or(""),
        vm_uuid = %agent.identity.vm_uuid,
        source = %agent.identity.source,
        "xcp-vm-agent {} started",
        crate::VERSION
    );
    // A freeze whose guard was killed is thawed now.
    let _ = crate::guest::freeze::in_force();
    shared.sleep(first_checkin_delay(agent.cfg.check_in_interval, &mut rng));
    let mut backoff = Backoff::agent_default();
    let mut reachable: Option<bool> = None;
    while !shared.shutdown.load(Ordering::SeqCst) {
        if shared.reload.swap(false, Ordering::SeqCst) {
            match crate::config::load(config_path).and_then(|c| agent.reload(c)) {
                Ok(()) => {
                    *shared.config.lock().unwrap() = Some(agent.cfg.clone());
                    tracing::info!("configuration reloaded");
                }
                Err(e) => tracing::error!("reload failed, keeping the running configuration: {e:#}"),
            }
        }
        let started = Instant::now();
        let wait = agent.cfg.long_poll_seconds;
        let r = agent.cycle(wait);
        agent.update_health(r.as_ref().err());
        let delay = match r {
            Ok(n) => {
                backoff.reset();
                if reachable == Some(false) {
                    tracing::info!("server reachable again");
                }
                reachable = Some(true);
                if n > 0 {
                    Duration::ZERO
                } else {
                    agent.cfg.check_in_interval.saturating_sub(started.elapsed())
                }
            }
            Err(e) => {
                let d = backoff.next_delay(&mut rng);
                if reachable != Some(false) {
                    tracing::warn!("server unreachable: {e:#}; retrying with backoff (up to 5 min)");
                } else {
                    tracing::debug!("still unreachable: {e:#}; next try in {d:?}");
                }
                reachable = Some(false);
                d
            }
        };
        shared.sleep(delay);
    }
    Ok(())
}

/// Run one job from a file, with no server (`xcp-vm-agent exec`).
pub fn exec_job(
    cfg: &Config,
    job_text: &str,
    source: &str,
    dry_run: bool,
    fstab: Option<&std::path::Path>,
) -> JobResult {
    let job: Job = match serde_json::from_str(job_text) {
        Ok(j) => j,
        Err(e) => {
            let mut r = JobResult::refused(format!(
                "invalid job file {source} at line {} column {}: {e}",
                e.line(),
                e.column()
            ));
            r.details = json!({});
            return r;
        }
    };
    let fstab = fstab.map(|p| p.to_path_buf()).unwrap_or_else(|| cfg.fstab_path.clone());
    let ctx = JobContext::new(cfg.state_dir.clone(), fstab, dry_run);
    jobs::execute(&ctx, &job, &cfg.allowed_operations)
}
