//! The daemon (`run`), `once` and `exec`.
//!
//! `run` is the state machine of `machine.rs` (`AwaitingConfig`,
//! `Starting`, `Running`, `Backoff`, `Stopping`): [`Daemon`] does what the
//! state in force does, and `State::next` says where that leads. One
//! cycle (`agent.rs`): deliver spooled results, check in (long-poll), run the
//! jobs that arrived one after another, deliver their results
//! (`deliver.rs`). Between cycles the loop waits for the rest of
//! `check_in_interval` (not at all when the server held the request, or when
//! jobs arrived), or for the backoff delay after an error. State changes
//! (server unreachable, back again) are logged once, not on every retry.
//! SIGHUP takes one path in every state ([`Daemon::reload`]), which logs
//! every failure and keeps the configuration in force.
//!
//! Shutdown: a signal thread handles SIGTERM/SIGINT/SIGHUP (blocked in every
//! other thread). On TERM it exits within 10 s: a job in a runner of its own
//! (`jobs::scope`) goes on and the next start waits for it and reports it;
//! a job run in this process is cancelled. Everything on disk is written
//! atomically, so exiting at any point loses nothing: a job cut off leaves
//! its running marker and is reported `interrupted` after restart.
//!
//! What the threads share (flags, health, the configuration in force) is
//! `crate::health`.
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backoff::{first_checkin_delay, Backoff, Rng};
use crate::config::Config;
use crate::health::{lock, Shared};
use crate::jobs::{self, Job, JobContext, JobResult};

mod agent;
mod deliver;
mod machine;

pub use agent::Agent;
pub use deliver::REQUEST_BUDGET;
use machine::{Event, State};

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
                let busy = shared.wait_busy(lock(&shared.busy), Duration::from_secs(9), |busy| *busy);
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
            if let Some(cfg) = lock(&shared.config).clone() {
                p.tick(&cfg);
            }
            shared.sleep_unless_shutdown(Duration::from_secs(30));
        }
    })?;
    Ok(())
}

/// `xcp-vm-agent run`: the daemon. Returns only on a fatal start-up error.
pub fn run(config_path: &Path, cfg: Config) -> Result<()> {
    let shared = Arc::new(Shared::default());
    spawn_signal_thread(shared.clone())?;
    if let Some(addr) = cfg.status_listen {
        crate::status::spawn(addr, shared.clone())?;
    }
    *lock(&shared.config) = Some(cfg.clone());
    spawn_xen_publisher(shared.clone())?;
    let mut d = Daemon {
        config_path,
        shared,
        state: State::initial(cfg.server_url.is_some()),
        cfg,
        rng: Rng::from_entropy(),
        backoff: Backoff::agent_default(),
    };
    if let Some(mut agent) = d.start() {
        d.check_in(&mut agent);
    }
    Ok(())
}

/// The daemon's loop: its [`State`] and what the states need.
struct Daemon<'a> {
    config_path: &'a Path,
    shared: Arc<Shared>,
    state: State,
    /// The configuration in force (the agent holds its own copy once built).
    cfg: Config,
    rng: Rng,
    backoff: Backoff,
}

impl Daemon<'_> {
    fn go(&mut self, ev: Event) {
        self.state = self.state.next(ev);
    }

    /// Whether SIGHUP asked for a reload (the request is taken).
    fn reload_asked(&self) -> bool {
        self.shared.reload.swap(false, Ordering::SeqCst)
    }

    /// The one reload path (SIGHUP), in every state: read the file again;
    /// a running agent takes it whole or not at all ([`Agent::reload`]).
    /// A failure of either is logged and the configuration in force stays.
    fn reload(&mut self, agent: Option<&mut Agent>) {
        let running = agent.is_some();
        let r = crate::config::load(self.config_path).and_then(|c| match agent {
            Some(a) => a.reload(c).map(|()| a.cfg.clone()),
            None => Ok(c),
        });
        match r {
            Ok(c) => {
                *lock(&self.shared.config) = Some(c.clone());
                self.cfg = c;
                if running {
                    tracing::info!("configuration reloaded");
                }
            }
            Err(e) => tracing::error!("reload failed, keeping the running configuration: {e:#}"),
        }
    }

    /// [`Event::Configured`] for the configuration in force.
    fn configured(&self) -> Event {
        Event::Configured { has_server: self.cfg.server_url.is_some() }
    }

    /// `AwaitingConfig` and `Starting`, until the agent is built (`Running`)
    /// or the daemon stops (None).
    fn start(&mut self) -> Option<Agent> {
        loop {
            if self.shared.shutdown.load(Ordering::SeqCst) {
                self.go(Event::Shutdown);
            }
            let ev = match self.state {
                State::AwaitingConfig => {
                    // No server yet (fresh package install): say what to
                    // configure and wait for SIGHUP instead of exiting.
                    if let Err(e) = self.cfg.require_server() {
                        tracing::error!("{e}; then run: systemctl reload xcp-vm-agent (or send SIGHUP)");
                        lock(&self.shared.health).last_error = Some(e.to_string());
                    }
                    while !self.reload_asked() {
                        if self.shared.shutdown.load(Ordering::SeqCst) {
                            return None;
                        }
                        self.shared.sleep(Duration::from_secs(3600));
                    }
                    self.reload(None);
                    self.configured()
                }
                State::Starting => match Agent::new(self.cfg.clone(), self.shared.clone()) {
                    Ok(agent) => {
                        self.go(Event::Started);
                        return Some(agent);
                    }
                    Err(e) => {
                        // Bad certificate paths and the like: say so, retry
                        // slowly (the administrator may be fixing it), never
                        // crash-loop.
                        tracing::error!("cannot start: {e:#}");
                        lock(&self.shared.health).last_error = Some(format!("{e:#}"));
                        self.shared.sleep(Duration::from_secs(60));
                        if self.reload_asked() {
                            self.reload(None);
                            self.configured()
                        } else {
                            Event::StartFailed
                        }
                    }
                },
                // Running and Backoff begin where `Started` returns above.
                State::Running | State::Backoff | State::Stopping => return None,
            };
            self.go(ev);
        }
    }

    /// `Running` and `Backoff`: check-in cycles until shutdown.
    fn check_in(&mut self, agent: &mut Agent) {
        tracing::info!(
            server = agent.cfg.server_url.as_deref().unwrap_or(""),
            vm_uuid = %agent.identity.vm_uuid,
            source = %agent.identity.source,
            "xcp-vm-agent {} started",
            crate::VERSION
        );
        // A freeze whose guard was killed is thawed now.
        let _ = crate::guest::freeze::in_force();
        self.shared.sleep(first_checkin_delay(agent.cfg.check_in_interval, &mut self.rng));
        while !self.shared.shutdown.load(Ordering::SeqCst) {
            if self.reload_asked() {
                self.reload(Some(&mut *agent));
            }
            let started = Instant::now();
            let r = agent.cycle(agent.cfg.long_poll_seconds);
            agent.update_health(r.as_ref().err());
            let (ev, delay) = match r {
                Ok(n) => {
                    self.backoff.reset();
                    if self.state == State::Backoff {
                        tracing::info!("server reachable again");
                    }
                    let d = if n > 0 {
                        Duration::ZERO
                    } else {
                        agent.cfg.check_in_interval.saturating_sub(started.elapsed())
                    };
                    (Event::CycleOk, d)
                }
                Err(e) => {
                    let d = self.backoff.next_delay(&mut self.rng);
                    if self.state != State::Backoff {
                        tracing::warn!("server unreachable: {e:#}; retrying with backoff (up to 5 min)");
                    } else {
                        tracing::debug!("still unreachable: {e:#}; next try in {d:?}");
                    }
                    (Event::CycleFailed, d)
                }
            };
            self.go(ev);
            self.shared.sleep(delay);
        }
        self.go(Event::Shutdown);
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn daemon<'a>(path: &'a Path, cfg: Config) -> Daemon<'a> {
        Daemon {
            config_path: path,
            shared: Arc::new(Shared::default()),
            state: State::initial(cfg.server_url.is_some()),
            cfg,
            rng: Rng::new(1),
            backoff: Backoff::agent_default(),
        }
    }

    /// The reload path before the agent exists: a file that does not load
    /// changes nothing; one naming a server moves `AwaitingConfig` on.
    #[test]
    fn reload_before_start_keeps_the_config_on_failure_and_takes_a_server() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let state_dir = dir.path().join("state");
        std::fs::write(&path, format!("{{\"state_dir\": {state_dir:?}}}")).unwrap();
        let mut d = daemon(&path, crate::config::load(&path).unwrap());
        assert_eq!(d.state, State::AwaitingConfig);

        std::fs::write(&path, "{not json").unwrap();
        d.reload(None);
        assert!(lock(&d.shared.config).is_none(), "a failed reload must not replace the configuration");
        assert_eq!(d.configured(), Event::Configured { has_server: false });
        d.go(d.configured());
        assert_eq!(d.state, State::AwaitingConfig);

        std::fs::write(&path, format!("{{\"state_dir\": {state_dir:?}, \"server_url\": \"https://127.0.0.1:9\"}}"))
            .unwrap();
        d.reload(None);
        let taken = lock(&d.shared.config).as_ref().and_then(|c| c.server_url.clone());
        assert_eq!(taken.as_deref(), Some("https://127.0.0.1:9"));
        d.go(d.configured());
        assert_eq!(d.state, State::Starting);

        // Starting builds the agent (no network needed for that): Running.
        let agent = d.start().expect("the agent starts with a server and a state directory");
        assert_eq!(d.state, State::Running);
        assert_eq!(agent.cfg.server_url.as_deref(), Some("https://127.0.0.1:9"));
    }

    #[test]
    fn shutdown_before_start_stops() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let mut d = daemon(&path, Config::defaults(&path));
        d.shared.shutdown.store(true, Ordering::SeqCst);
        assert!(d.start().is_none());
        assert_eq!(d.state, State::Stopping);
    }
}
