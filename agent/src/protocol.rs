//! Protocol v1 messages (HTTPS + JSON under `/api/v1/`), as written down in
//! `docs/protocol.md` with a JSON Schema per message in `docs/schemas/`.
//!
//! The reference server in `vm-tests` uses these same types, so a change here
//! changes both sides; the schemas are checked against them by tests.
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::jobs::{Job, JobResult};

/// Declares [`Operation`] from one list: the variants, their protocol names
/// (the variant's own), and `ALL`/`NAMES` in protocol order. `guest:`
/// operations exist only in builds with the `guest` feature.
macro_rules! operations {
    (always: $($a:ident),*; guest: $($g:ident),* $(;)?) => {
        /// An operation a job asks for, by its protocol name (the variant's).
        /// The one list shared by dispatch (`jobs::execute` matches it, so a
        /// new operation without a runner does not compile), the allowlist
        /// check in config validation and the capabilities.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Operation {
            $($a,)*
            $(#[cfg(feature = "guest")] $g,)*
        }

        impl Operation {
            /// Every operation of this build, in protocol order.
            #[cfg(feature = "guest")]
            pub const ALL: &'static [Operation] = &[$(Operation::$a,)* $(Operation::$g,)*];
            /// Every operation of this build, in protocol order.
            #[cfg(not(feature = "guest"))]
            pub const ALL: &'static [Operation] = &[$(Operation::$a,)*];
            /// Their protocol names, in the same order.
            #[cfg(feature = "guest")]
            pub const NAMES: &'static [&'static str] = &[$(stringify!($a),)* $(stringify!($g),)*];
            /// Their protocol names, in the same order.
            #[cfg(not(feature = "guest"))]
            pub const NAMES: &'static [&'static str] = &[$(stringify!($a),)*];

            /// The protocol's name of this operation.
            pub fn name(self) -> &'static str {
                match self {
                    $(Operation::$a => stringify!($a),)*
                    $(#[cfg(feature = "guest")] Operation::$g => stringify!($g),)*
                }
            }
        }
    };
}

operations! {
    always: RunScript, ExtendPartition, InitializeDisk;
    guest: FreezeFilesystems, ThawFilesystems, TrimFilesystems, Reboot, Shutdown;
}

impl Operation {
    /// The operation of this build with this protocol name.
    pub fn parse(name: &str) -> Option<Operation> {
        Operation::ALL.iter().copied().find(|o| o.name() == name)
    }
}

pub const PROTOCOL_VERSION: u32 = 1;
pub const CHECKIN_PATH: &str = "/api/v1/checkin";
pub const RESULTS_PATH: &str = "/api/v1/results";
/// Largest body either side accepts (4 MiB); larger is refused, not read.
pub const MAX_BODY_BYTES: u64 = 4 << 20;

/// `POST /api/v1/checkin`: who the agent is, what it offers, how it is doing.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckIn {
    pub protocol_version: u32,
    pub agent_version: String,
    pub vm_uuid: String,
    /// Where each identity fact came from; see `identity::Identity`.
    pub identity: Value,
    /// Operations this agent will run (its allowlist).
    pub capabilities: Vec<String>,
    pub metrics: Value,
    pub network: Value,
    /// Disks, partitions and filesystems (`inventory --json`), when available.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub inventory: Value,
    /// The longest the server may hold this request before answering with no
    /// jobs (long-poll). 0 means answer at once.
    pub wait_seconds: u64,
    /// Results waiting in the agent's spool (sent right after this check-in).
    #[serde(default)]
    pub pending_results: u64,
}

/// The answer to a check-in.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct CheckInResponse {
    #[serde(default)]
    pub jobs: Vec<Job>,
    /// Unix seconds on the server.
    #[serde(default)]
    pub server_time: u64,
}

/// `POST /api/v1/results`: one or more job results (final, or `running`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResultsReport {
    pub vm_uuid: String,
    pub results: Vec<JobResult>,
}

/// The server's acknowledgement: the job ids it has stored durably. The agent
/// drops a spooled result only when its id comes back here.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct ResultsAck {
    pub acknowledged: Vec<String>,
}

/// Body of every 4xx/5xx answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

#[cfg(test)]
mod operation_tests {
    use super::Operation;

    #[test]
    fn every_operation_parses_from_its_name_and_names_are_in_order() {
        assert_eq!(Operation::ALL.len(), Operation::NAMES.len());
        for (op, name) in Operation::ALL.iter().zip(Operation::NAMES) {
            assert_eq!(op.name(), *name);
            assert_eq!(Operation::parse(name), Some(*op));
        }
        assert_eq!(Operation::parse("runscript"), None, "names are case-sensitive");
        assert_eq!(Operation::parse(""), None);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn body_cap_is_4_mib_as_documented() {
        // docs/protocol.md: MAX_BODY_BYTES = 4 MiB, both ways.
        assert_eq!(super::MAX_BODY_BYTES, 4 * 1024 * 1024);
    }
}
