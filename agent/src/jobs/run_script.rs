//! RunScript
use crate::jobs::{JobContext, JobResult};
pub fn run(_ctx: &JobContext, _params: &serde_json::Value) -> JobResult {
    JobResult::failed("todo")
}
