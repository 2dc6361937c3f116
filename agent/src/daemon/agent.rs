//! The [`Agent`]: what one check-in cycle needs (config, client, state
//! directory, identity, inventory, results kept in memory) and the cycle
//! itself: recover what an earlier run left, deliver, check in, run each job
//! that arrived (in a runner of its own for `jobs::scope::SCOPED`), deliver
//! again. Result delivery is in `deliver.rs`; when cycles run (the daemon's
//! states) is in `mod.rs` and `machine.rs`.
use anyhow::Result;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::deliver::REQUESTS_BEFORE_CHECKIN;
use crate::client::Client;
use crate::config::Config;
use crate::health::{lock, Shared};
use crate::jobs::{self, scope, Job, JobContext, JobResult};
use crate::protocol::{CheckIn, PROTOCOL_VERSION};
use crate::state::State;

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
pub struct Agent {
    pub cfg: Config,
    pub(super) client: Client,
    pub state: State,
    pub(super) sampler: crate::metrics::Sampler,
    pub shared: Arc<Shared>,
    pub(super) identity: crate::identity::Identity,
    /// The disk inventory and when it was taken; refreshed at most every
    /// [`INVENTORY_MAX_AGE`], and after every job.
    pub(super) inventory: Option<(Instant, Value)>,
    /// Results that could not be written to the spool (full disk): sent
    /// from memory.
    pub(super) unspooled: Vec<JobResult>,
    /// Markers of a previous life not yet turned into results (the disk
    /// was full at start-up): retried every cycle.
    pub(super) recovery_due: bool,
    /// Why the last result delivery failed, while it keeps failing.
    pub(super) delivery_error: Option<String>,
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
            let inv = crate::guest::fsreport::inventory().unwrap_or_else(|e| {
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
            capabilities: self.cfg.allowed_operations.iter().map(|o| o.name().to_string()).collect(),
            metrics: serde_json::to_value(self.sampler.sample()).unwrap_or(Value::Null),
            network: serde_json::to_value(crate::metrics::network()).unwrap_or(Value::Null),
            inventory,
            wait_seconds,
            pending_results: self.state.pending_count() as u64,
        }
    }

    /// Record a job's start; when that cannot be done (full disk), answer
    /// it `failed` from memory without running it.
    pub(super) fn record_start(&mut self, job: &Job) -> bool {
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
            let mut busy = lock(&self.shared.busy);
            if self.shared.shutdown.load(Ordering::SeqCst) {
                return Ok(());
            }
            *busy = true;
        }
        struct NotBusy<'a>(&'a Shared);
        impl Drop for NotBusy<'_> {
            fn drop(&mut self) {
                *lock(&self.0.busy) = false;
                self.0.cv.notify_all();
            }
        }
        let shared = self.shared.clone();
        let _guard = NotBusy(&shared);
        let mut ctx = JobContext::new(self.cfg.state_dir.clone(), self.cfg.fstab_path.clone(), false);
        ctx.cancel = self.shared.cancel.clone();
        if crate::guest::freeze::blocks(&self.cfg.state_dir) {
            // Nothing may be written to a frozen state directory.
            let r = crate::guest::freeze::refuse_while_frozen(&job)
                .unwrap_or_else(|| jobs::execute(&ctx, &job, &self.cfg.allowed_operations));
            self.unspooled.push(r);
            return Ok(());
        }
        if !self.record_start(&job) {
            return Ok(());
        }
        tracing::info!(job = %job.id, operation = %job.operation, "job started");
        self.report_running(&job);
        let scoped = crate::protocol::Operation::parse(&job.operation)
            .is_some_and(|o| scope::SCOPED.contains(&o) && self.cfg.allowed_operations.contains(&o));
        if scoped {
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
        lock(&self.shared.health).jobs_run += 1;
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
        let mut h = lock(&self.shared.health);
        h.healthy = true;
        h.last_successful_checkin = Some(jobs::now_unix());
        h.last_error = None;
    }

    pub(super) fn update_health(&self, err: Option<&anyhow::Error>) {
        let mut h = lock(&self.shared.health);
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
