//! vm-tests: the test harness for xcp-vm-agent.
//!
//! - [`server`]: the reference management server (`mgmt-server` binary).
//! - [`harness`]: helpers for integration tests that drive the real agent and
//!   server binaries (scratch dirs, PKI, configs, admin client, a fake
//!   HTTPS responder), used by `tests/*.rs`.
//! - [`schema`]: a small JSON Schema checker for the schemas in `docs/schemas`.
//! - [`tier`]: the one definition of the plain tier, the root tier and CI.
//! - [`xenstored`]: a test xenstored on a unix socket (`test-xenstored` binary).
pub mod harness;
pub mod schema;
pub mod server;
pub mod tier;
pub mod xenstored;
