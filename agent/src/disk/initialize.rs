//! InitializeDisk (placeholder until the disk issue lands).
use crate::jobs::{JobContext, JobResult};
pub fn run(_ctx: &JobContext, _params: &serde_json::Value) -> JobResult {
    JobResult::failed("InitializeDisk is not implemented yet")
}
