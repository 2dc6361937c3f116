//! The adapters of the disk jobs: a job's `params` (the protocol's
//! [`ExtendPartitionParams`], [`InitializeDiskParams`]) become the domain's
//! request, and its report or [`Stopped`] becomes a [`JobResult`] whose
//! `details` are the report's fields that were reached. Nothing of the disk
//! logic lives here.
//!
//! The details are written out field by field rather than through a derived
//! `Serialize`: serde's derive into a `Value` cost about 10 KB of the 2.2 MB
//! budget for the two reports; this costs about what the old inline JSON did.
use serde_json::{Map, Value};

use super::{parse_params, JobContext, JobResult, Status};
use crate::disk::extend::{self, ExtendRequest};
use crate::disk::initialize::{self, InitializeRequest};
use crate::disk::sysfs::Sys;
use crate::disk::target::Target;
use crate::disk::{DiskError, Stopped, System};
use crate::protocol::{ExtendPartitionParams, InitializeDiskParams};

fn system(ctx: &JobContext) -> System {
    System { sys: Sys::default(), fstab: ctx.fstab_path.clone(), state_dir: ctx.state_dir.clone() }
}

/// A field that was reached (one function per type, so each field costs a
/// call, not an inlined conversion).
fn put(m: &mut Map<String, Value>, key: &str, v: Option<Value>) {
    if let Some(v) = v {
        m.insert(key.into(), v);
    }
}
fn text(m: &mut Map<String, Value>, key: &str, v: Option<String>) {
    put(m, key, v.map(Value::String));
}
fn num(m: &mut Map<String, Value>, key: &str, v: Option<u64>) {
    put(m, key, v.map(Value::from));
}

fn extend_details(r: extend::ExtendReport) -> Map<String, Value> {
    let mut m = Map::new();
    let stale = r.stale_temp_mounts_removed;
    put(&mut m, "stale_temp_mounts_removed", (!stale.is_empty()).then(|| stale.into()));
    text(&mut m, "device", r.device);
    text(&mut m, "disk", r.disk);
    num(&mut m, "disk_bytes", r.disk_bytes);
    num(&mut m, "logical_sector_size", r.logical_sector_size);
    num(&mut m, "partition_bytes_before", r.partition_bytes_before);
    text(&mut m, "filesystem", r.filesystem);
    put(&mut m, "mount_point", r.mount_point.map(Value::from));
    text(&mut m, "partition_table", r.partition_table);
    text(&mut m, "table_before", r.table_before);
    num(&mut m, "partition_growable_bytes", r.partition_growable_bytes);
    num(&mut m, "partition_bytes_after", r.partition_bytes_after);
    put(&mut m, "filesystem_bytes_before", r.filesystem_bytes_before.map(Value::from));
    put(&mut m, "filesystem_bytes_after", r.filesystem_bytes_after.map(Value::from));
    put(&mut m, "steps", r.steps.and_then(|s| serde_json::to_value(s).ok()));
    put(&mut m, "notes", r.notes.map(Value::from));
    m
}

fn initialize_details(r: initialize::InitializeReport) -> Map<String, Value> {
    let mut m = Map::new();
    text(&mut m, "disk", r.disk);
    text(&mut m, "overwritten", r.overwritten);
    text(&mut m, "mount_point", r.mount_point);
    text(&mut m, "fstab_line", r.fstab_line);
    text(&mut m, "fstab", r.fstab);
    put(&mut m, "partition", r.partition.map(Value::from));
    text(&mut m, "filesystem_uuid", r.filesystem_uuid);
    text(&mut m, "mount_method", r.mount_method);
    put(&mut m, "steps", r.steps.map(Value::from));
    m
}

/// A disk operation's end as a result: `succeeded`/`no_change` with the
/// report's message (`Ok((message, changed))`), `refused`/`failed` with the
/// reason; `details` are the report's fields in every case.
fn result(end: Result<(String, bool), DiskError>, details: Map<String, Value>) -> JobResult {
    let (status, message) = match end {
        Ok((m, true)) => (Status::Succeeded, m),
        Ok((m, false)) => (Status::NoChange, m),
        Err(DiskError::Refused(m)) => (Status::Refused, m),
        Err(DiskError::Failed(e)) => (Status::Failed, format!("{e:#}")),
    };
    JobResult::new(status, message).with_details(Value::Object(details))
}

/// Whether `params` are valid parameters for ExtendPartition (the refusal
/// when not), without running anything; for the fuzz target `job`.
pub fn check_extend_params(params: &Value) -> Result<(), JobResult> {
    parse_params::<ExtendPartitionParams>("ExtendPartition", params).map(|_| ())
}

/// Whether `params` are valid parameters for InitializeDisk (the refusal
/// when not), without running anything; for the fuzz target `job`.
pub fn check_initialize_params(params: &Value) -> Result<(), JobResult> {
    parse_params::<InitializeDiskParams>("InitializeDisk", params).map(|_| ())
}

/// ExtendPartition.
pub fn extend(ctx: &JobContext, params: &Value) -> JobResult {
    let p: ExtendPartitionParams = match parse_params("ExtendPartition", params) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let target = match Target::from_fields(p.mount_point, p.device, p.partition, p.xen_vbd, p.serial) {
        Ok(t) => t,
        Err(e) => return JobResult::refused(format!("invalid parameters for ExtendPartition: {e}")),
    };
    let req = ExtendRequest { target, logical_volume: p.logical_volume };
    let (end, report) = match extend::run(&ctx.runner, &system(ctx), &req) {
        Ok(mut r) => (Ok((std::mem::take(&mut r.message), r.changed)), r),
        Err(Stopped { error, report }) => (Err(error), report),
    };
    result(end, extend_details(report))
}

/// InitializeDisk.
pub fn initialize(ctx: &JobContext, params: &Value) -> JobResult {
    let p: InitializeDiskParams = match parse_params("InitializeDisk", params) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let req = InitializeRequest {
        device: p.device,
        filesystem: p.filesystem,
        mount_point: p.mount_point,
        label: p.label,
        mount_options: p.mount_options,
        force: p.force,
    };
    let (end, report) = match initialize::run(&ctx.runner, &system(ctx), &req) {
        Ok(mut r) => (Ok((std::mem::take(&mut r.message), r.changed)), r),
        Err(Stopped { error, report }) => (Err(error), report),
    };
    result(end, initialize_details(report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn extend_bad_params_are_refused_naming_the_field() {
        let ctx = JobContext::new("/tmp".into(), "/tmp/fstab".into(), true);
        let r = extend(&ctx, &json!({"mount_point": "/x", "bogus": 1}));
        assert_eq!(r.status, Status::Refused);
        assert!(r.message.contains("bogus"), "{}", r.message);
        let r = extend(&ctx, &json!({}));
        assert_eq!(r.status, Status::Refused);
        assert!(r.message.contains("exactly one"), "{}", r.message);
    }

    #[test]
    fn initialize_refusals_before_touching_anything() {
        let ctx = JobContext::new("/tmp".into(), "/tmp/nonexistent-fstab".into(), true);
        let r = initialize(&ctx, &json!({"device": "/dev/null", "mount_point": "/etc"}));
        assert_eq!(r.status, Status::Refused);
        assert!(r.message.contains("system directory"), "{}", r.message);
        let r = initialize(&ctx, &json!({"device": "/dev/null", "mount_point": "/data", "filesystem": "btrfs"}));
        assert!(r.message.contains("btrfs"), "{}", r.message);
        let r = initialize(&ctx, &json!({"device": "/dev/null", "mount_point": "/data"}));
        assert!(r.message.contains("not a block device"), "{}", r.message);
    }
}
