//! xcp-vm-agent: the in-guest agent for XCP-ng and KVM virtual machines.
//!
//! The crate is a library with a thin binary on top (`main.rs`). See
//! `docs/architecture.md` for the code map; each module header says what it owns.
// The log macros (logging.rs) under the name the code has always used:
// `tracing::info!(...)` in any module is `crate::info!(...)`.
extern crate self as tracing;

pub mod backoff;
pub mod cli;
pub mod client;
pub mod config;
pub mod context;
pub mod daemon;
pub mod disk;
pub mod failpoint;
#[cfg(feature = "guest")]
pub mod guest;
#[cfg(not(feature = "guest"))]
#[path = "guest/stub.rs"]
pub mod guest;
pub mod health;
pub mod http;
pub mod identity;
pub mod jobs;
pub mod logging;
pub mod metrics;
pub mod protocol;
pub mod runner;
pub mod state;
pub mod status;
pub mod xen;

/// The agent's version, reported in every check-in and by `--version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
