//! Without the cargo feature `guest` (on by default and in the packages;
//! `--no-default-features` turns it off): the daemon's hooks into guest control compile to nothing, and
//! the guest operations are not in `jobs::OPERATIONS`.
#![allow(clippy::ptr_arg)]

pub mod freeze {
    use crate::protocol::{Job, JobResult};
    pub fn in_force() -> Option<()> {
        None
    }
    pub fn blocks(_: &std::path::Path) -> bool {
        false
    }
    pub fn defer(_: &JobResult) {}
    pub fn refuse_while_frozen(_: &Job) -> Option<JobResult> {
        None
    }
    pub fn settle(_: &mut crate::state::State, _: &mut Vec<JobResult>) -> anyhow::Result<()> {
        Ok(())
    }
}

pub mod power {
    pub fn after_delivery(_: &std::path::Path, _: usize, _: impl Fn(std::time::Duration)) -> bool {
        false
    }
}

pub mod fsreport {
    pub fn report() -> serde_json::Value {
        serde_json::Value::Null
    }
    pub fn inventory() -> anyhow::Result<serde_json::Value> {
        let mut inv = crate::disk::inventory()?;
        inv["filesystems"] = report();
        Ok(inv)
    }
}
