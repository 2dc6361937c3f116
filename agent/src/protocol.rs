//! Protocol v1 messages (HTTPS + JSON under `/api/v1/`), as written down in
//! `docs/protocol.md` with a JSON Schema per message in `docs/schemas/`.
//!
//! Owns every wire type: the job as sent ([`Job`]), its result ([`JobResult`],
//! [`Status`]), check-in and results messages, and the one list of
//! operations ([`Operation`]). Imports nothing from the rest of the agent.
//!
//! The reference server in `vm-tests` uses these same types, so a change here
//! changes both sides; the schemas are checked against them by tests.
use serde::{Deserialize, Serialize};
use serde_json::Value;

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

/// A job as the server sends it, and as a job file for `exec --job` holds it.
/// Unknown fields are ignored, so a later protocol version can add fields to
/// a job without older agents refusing it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Job {
    pub id: String,
    pub operation: String,
    #[serde(default)]
    pub params: Value,
}

/// The states a job goes through. `Running` is reported when a job starts;
/// the others are final.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Running,
    Succeeded,
    NoChange,
    Refused,
    Failed,
    Interrupted,
}

impl Status {
    /// Exit code of `xcp-vm-agent exec` for this status.
    pub fn exit_code(self) -> i32 {
        match self {
            Status::Succeeded | Status::NoChange | Status::Running => 0,
            Status::Failed | Status::Interrupted => 1,
            Status::Refused => 3,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Succeeded => "succeeded",
            Status::NoChange => "no_change",
            Status::Refused => "refused",
            Status::Failed => "failed",
            Status::Interrupted => "interrupted",
        }
    }
}

/// What the agent reports about one job.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobResult {
    pub job_id: String,
    pub operation: String,
    pub status: Status,
    pub message: String,
    #[serde(default)]
    pub details: Value,
    /// Unix seconds.
    #[serde(default)]
    pub started_at: u64,
    #[serde(default)]
    pub finished_at: u64,
    #[serde(default)]
    pub duration_ms: u64,
}

impl JobResult {
    pub fn new(status: Status, message: impl Into<String>) -> Self {
        JobResult {
            job_id: String::new(),
            operation: String::new(),
            status,
            message: message.into(),
            details: Value::Object(Default::default()),
            started_at: 0,
            finished_at: 0,
            duration_ms: 0,
        }
    }
    pub fn succeeded(message: impl Into<String>) -> Self {
        Self::new(Status::Succeeded, message)
    }
    pub fn no_change(message: impl Into<String>) -> Self {
        Self::new(Status::NoChange, message)
    }
    pub fn refused(message: impl Into<String>) -> Self {
        Self::new(Status::Refused, message)
    }
    pub fn failed(message: impl Into<String>) -> Self {
        Self::new(Status::Failed, message)
    }
    pub fn with_details(mut self, details: Value) -> Self {
        self.details = details;
        self
    }

    fn json_len(&self) -> usize {
        serde_json::to_vec(self).map(|v| v.len()).unwrap_or(usize::MAX)
    }

    /// This result cut to at most `max` bytes of JSON: the longest string
    /// among `details` loses its middle (head and tail kept, the cut said in
    /// place) until it fits, and `details.result_original_bytes` says how big
    /// it was. Binary output, which JSON escapes up to six times over, is what
    /// usually needs it. If strings alone cannot make it fit, details are
    /// replaced by a note and the message is shortened.
    pub fn bounded(mut self, max: usize) -> JobResult {
        let original = self.json_len();
        if original <= max {
            return self;
        }
        for _ in 0..64 {
            let Value::Object(m) = &mut self.details else { break };
            let Some((key, chars)) = m
                .iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.chars().count())))
                .max_by_key(|(_, n)| *n)
            else {
                break;
            };
            if chars < 256 {
                break;
            }
            let s = m[&key].as_str().unwrap_or_default().to_string();
            let keep = chars / 4;
            let head: String = s.chars().take(keep).collect();
            let tail: String = s.chars().skip(chars - keep).collect();
            let cut = chars - 2 * keep;
            m.insert(
                key,
                Value::from(format!(
                    "{head}\n[... {cut} characters cut by xcp-vm-agent: result over {} KiB ...]\n{tail}",
                    max / 1024
                )),
            );
            m.insert("result_original_bytes".into(), Value::from(original as u64));
            if self.json_len() <= max {
                return self;
            }
        }
        self.details = serde_json::json!({
            "result_original_bytes": original as u64,
            "result_cut": format!("details of {original} bytes removed: over the {} KiB result bound", max / 1024),
        });
        if self.message.len() > 4096 {
            let mut end = 4096;
            while !self.message.is_char_boundary(end) {
                end -= 1;
            }
            self.message.truncate(end);
            self.message.push_str(" [...]");
        }
        self
    }
}

/// ExtendPartition's `params` (docs/protocol.md): exactly one of
/// `mount_point`, `device`, `xen_vbd`, `serial`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtendPartitionParams {
    pub mount_point: Option<String>,
    pub device: Option<String>,
    pub partition: Option<u32>,
    pub xen_vbd: Option<u32>,
    pub serial: Option<String>,
    /// `vg/lv`: also extend this logical volume and its filesystem.
    pub logical_volume: Option<String>,
}

/// InitializeDisk's `params` (docs/protocol.md).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitializeDiskParams {
    pub device: String,
    #[serde(default = "default_fs")]
    pub filesystem: String,
    pub mount_point: String,
    pub label: Option<String>,
    pub mount_options: Option<String>,
    #[serde(default)]
    pub force: bool,
}

fn default_fs() -> String {
    "ext4".into()
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
    use super::*;
    use serde_json::json;

    const ALL: [Status; 6] =
        [Status::Running, Status::Succeeded, Status::NoChange, Status::Refused, Status::Failed, Status::Interrupted];

    #[test]
    fn exit_codes_and_names_of_every_status() {
        let codes: Vec<i32> = ALL.iter().map(|s| s.exit_code()).collect();
        assert_eq!(codes, [0, 0, 0, 3, 1, 1]);
        for s in ALL {
            // as_str is the protocol's name: the one serde writes.
            assert_eq!(json!(s.as_str()), serde_json::to_value(s).unwrap(), "{s:?}");
        }
        let names: Vec<&str> = ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(names, ["running", "succeeded", "no_change", "refused", "failed", "interrupted"]);
    }

    #[test]
    fn constructors_set_status_message_and_details() {
        for (r, s) in [
            (JobResult::succeeded("m"), Status::Succeeded),
            (JobResult::no_change("m"), Status::NoChange),
            (JobResult::refused("m"), Status::Refused),
            (JobResult::failed("m"), Status::Failed),
        ] {
            assert_eq!((r.status, r.message.as_str(), &r.details), (s, "m", &json!({})));
        }
        assert_eq!(JobResult::failed("m").with_details(json!({"a": 1})).details, json!({"a": 1}));
    }

    fn with_string(len: usize) -> JobResult {
        let s: String = "H".repeat(len / 4) + &"M".repeat(len - len / 2) + &"T".repeat(len / 4);
        JobResult::failed("m").with_details(json!({"stdout": s, "exit_code": 2, "short": "kept"}))
    }

    #[test]
    fn bounded_keeps_a_result_that_fits() {
        let r = with_string(4000);
        let n = r.json_len();
        assert_eq!(r.clone().bounded(n), r, "exactly at the bound is within it");
        assert_ne!(r.clone().bounded(n - 1), r);
        assert!(n > 4000 && n < 4200, "{n}");
    }

    #[test]
    fn bounded_cuts_the_middle_of_the_longest_string() {
        let r = with_string(4000);
        let original = r.json_len() as u64;
        let b = r.bounded(3000);
        assert!(b.json_len() <= 3000);
        let want = format!(
            "{}\n[... 2000 characters cut by xcp-vm-agent: result over 2 KiB ...]\n{}",
            "H".repeat(1000),
            "T".repeat(1000)
        );
        assert_eq!(b.details["stdout"], json!(want));
        assert_eq!(b.details["short"], "kept");
        assert_eq!(b.details["exit_code"], 2);
        assert_eq!(b.details["result_original_bytes"], original);
        assert_eq!((b.status, b.message.as_str()), (Status::Failed, "m"));
        // A cut that lands exactly on the bound is not cut again.
        let at = with_string(4000).bounded(b.json_len());
        assert_eq!(at, b);
    }

    #[test]
    fn bounded_cuts_again_until_it_fits() {
        let r = with_string(100_000);
        let b = r.bounded(2048);
        assert!(b.json_len() <= 2048, "{}", b.json_len());
        let s = b.details["stdout"].as_str().unwrap();
        assert!(s.starts_with('H') && s.ends_with('T'), "{s}");
        assert!(s.contains("characters cut by xcp-vm-agent"), "{s}");
        assert_eq!(b.details["short"], "kept");
    }

    #[test]
    fn bounded_cuts_a_string_of_256_characters_but_not_of_255() {
        // 256 characters is long enough to cut: one cut fits.
        let r = JobResult::failed("m").with_details(json!({"s": "x".repeat(256)}));
        let b = r.clone().bounded(r.json_len() - 1);
        assert!(b.details["s"].as_str().unwrap().contains("characters cut"), "{:?}", b.details);
        // Below 256 strings are left alone: the details go.
        let r = JobResult::failed("m").with_details(json!({"s": "x".repeat(255)}));
        let b = r.clone().bounded(r.json_len() - 1);
        assert!(b.details.get("s").is_none(), "{:?}", b.details);
        assert!(b.details["result_cut"].as_str().unwrap().contains("removed"), "{:?}", b.details);
    }

    #[test]
    fn bounded_drops_details_and_shortens_the_message_when_strings_cannot_fit() {
        let numbers: Vec<u64> = (0..2000).collect();
        let r = JobResult::failed("€".repeat(2000)).with_details(json!({"n": numbers}));
        let original = r.json_len();
        let b = r.bounded(4096);
        assert_eq!(
            b.details,
            json!({"result_original_bytes": original,
                   "result_cut": format!("details of {original} bytes removed: over the 4 KiB result bound")})
        );
        // 6000 bytes of 3-byte characters: cut at the last boundary at or
        // below 4096 bytes (4095), then marked.
        assert_eq!(b.message.len(), 4095 + " [...]".len());
        assert!(b.message.ends_with("€ [...]"));
        // A message of exactly 4096 bytes stays whole.
        let r = JobResult::failed("a".repeat(4096)).with_details(json!({"n": numbers}));
        assert_eq!(r.bounded(4096).message, "a".repeat(4096));
    }

    #[test]
    fn body_cap_is_4_mib_as_documented() {
        // docs/protocol.md: MAX_BODY_BYTES = 4 MiB, both ways.
        assert_eq!(super::MAX_BODY_BYTES, 4 * 1024 * 1024);
    }

    #[test]
    fn initialize_disk_defaults_to_ext4_and_no_force() {
        // A job that names neither gets ext4, and nothing is overwritten.
        let p: InitializeDiskParams =
            serde_json::from_value(json!({"device": "/dev/xvdb", "mount_point": "/data"})).unwrap();
        assert_eq!((p.filesystem.as_str(), p.force), ("ext4", false));
        let p: InitializeDiskParams =
            serde_json::from_value(json!({"device": "/dev/xvdb", "mount_point": "/data", "filesystem": "xfs"}))
                .unwrap();
        assert_eq!(p.filesystem, "xfs");
    }
}
