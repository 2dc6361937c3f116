//! What the daemon's threads share: the [`Health`] the status endpoint
//! reports, and [`Shared`], the flags, locks and configuration that the loop
//! (`daemon`), the signal thread, the Xen publisher and the status endpoint
//! (`status`) all hold. Both the daemon and the status endpoint import it;
//! it imports neither (no import circle).
//!
//! Locks here are taken with [`lock`]: a poisoned lock cannot happen
//! (`panic = "abort"`), and a guard is taken back rather than a panic.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::config::Config;

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

/// Take a lock; a poisoned one (never, with `panic = "abort"`) is taken as is.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
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

    /// Wait on [`Shared::cv`] with the `busy` lock, up to `d`, while `cond`
    /// holds; the guard is handed back.
    pub fn wait_busy<'a>(
        &'a self,
        mut g: MutexGuard<'a, bool>,
        d: Duration,
        cond: impl Fn(&bool) -> bool,
    ) -> MutexGuard<'a, bool> {
        let deadline = Instant::now() + d;
        while cond(&g) {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            g = self.cv.wait_timeout(g, deadline - now).unwrap_or_else(PoisonError::into_inner).0;
        }
        g
    }

    fn sleep_while(&self, d: Duration, cond: impl Fn() -> bool) {
        drop(self.wait_busy(lock(&self.busy), d, |_| cond()));
    }
}
