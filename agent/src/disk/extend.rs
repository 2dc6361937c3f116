//! ExtendPartition (placeholder until the disk issue lands).
use crate::jobs::{JobContext, JobResult};
pub fn run(_ctx: &JobContext, _params: &serde_json::Value) -> JobResult {
    JobResult::failed("ExtendPartition is not implemented yet")
}
