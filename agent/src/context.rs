//! [`JobContext`]: what an operation may use besides its parameters (the
//! state directory, the fstab, the `Runner`, the cancel flag). Below both
//! the dispatch (`jobs`, which re-exports it) and the domain modules it
//! calls (`guest`), so neither imports the other to name it.
use std::path::PathBuf;

use crate::runner::Runner;

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
