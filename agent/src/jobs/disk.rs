//! The adapters of the disk jobs: a job's `params` (the protocol's
//! [`ExtendPartitionParams`], [`InitializeDiskParams`]) become the domain's
//! request, and its report or [`Stopped`] becomes a [`JobResult`] whose
//! `details` are the report's fields that were reached. Nothing of the disk
//! logic lives here.
//!
//! The details are the report's derived `Serialize` (fields not reached left
//! out).
use serde::Serialize;
use serde_json::Value;

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

/// A disk operation's end as a result: `succeeded`/`no_change` with the
/// report's message (`Ok((message, changed))`), `refused`/`failed` with the
/// reason; `details` are the report's fields in every case.
fn result(end: Result<(String, bool), DiskError>, report: &impl Serialize) -> JobResult {
    let (status, message) = match end {
        Ok((m, true)) => (Status::Succeeded, m),
        Ok((m, false)) => (Status::NoChange, m),
        Err(DiskError::Refused(m)) => (Status::Refused, m),
        Err(DiskError::Failed(e)) => (Status::Failed, format!("{e:#}")),
    };
    JobResult::new(status, message).with_details(details(report))
}

/// A report as the result's `details`: a JSON object of the fields reached.
fn details(report: &impl Serialize) -> Value {
    serde_json::to_value(report).unwrap_or_default()
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
    result(end, &report)
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
    result(end, &report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Reports: nothing reached, and every field reached (`Some(None)`: a
    /// `null`), as the wire JSON of `details`.
    fn reports(
    ) -> (extend::ExtendReport, extend::ExtendReport, initialize::InitializeReport, initialize::InitializeReport) {
        let e = extend::ExtendReport {
            message: "grown".into(),
            changed: true,
            stale_temp_mounts_removed: vec!["/run/x".into()],
            device: Some("/dev/xvdb1".into()),
            disk: Some("/dev/xvdb".into()),
            disk_bytes: Some(1 << 30),
            logical_sector_size: Some(512),
            partition_bytes_before: Some(1 << 20),
            filesystem: Some("ext4".into()),
            mount_point: Some(None),
            partition_table: Some("gpt".into()),
            table_before: Some("label: gpt\n".into()),
            partition_growable_bytes: Some(7),
            partition_bytes_after: Some(8),
            filesystem_bytes_before: Some(None),
            filesystem_bytes_after: Some(Some(9)),
            steps: Some(vec![crate::disk::fs::Growth {
                device: "/dev/xvdb1".into(),
                fstype: "ext4".into(),
                before_bytes: None,
                after_bytes: Some(9),
                changed: true,
                how: "resize2fs".into(),
            }]),
            notes: Some(vec!["a \"note\"".into()]),
        };
        let i = initialize::InitializeReport {
            message: "done".into(),
            changed: true,
            disk: Some("/dev/xvdc".into()),
            overwritten: Some("ext4".into()),
            mount_point: Some("/data".into()),
            fstab_line: Some("UUID=u /data ext4 defaults,nofail 0 2".into()),
            fstab: Some("/etc/fstab".into()),
            partition: Some(None),
            filesystem_uuid: Some("u".into()),
            mount_method: Some("mount --fstab".into()),
            steps: Some(vec!["label", "mkfs"]),
        };
        (Default::default(), e, Default::default(), i)
    }

    #[test]
    fn details_are_the_fields_reached_byte_for_byte() {
        // As the hand-written details were before the reports derived
        // Serialize (their output for these reports, pinned).
        let (e0, e, i0, i) = reports();
        let s = |v: Value| serde_json::to_string(&v).unwrap();
        assert_eq!(s(details(&e0)), "{}");
        assert_eq!(
            s(details(&e)),
            r#"{"device":"/dev/xvdb1","disk":"/dev/xvdb","disk_bytes":1073741824,"filesystem":"ext4","filesystem_bytes_after":9,"filesystem_bytes_before":null,"logical_sector_size":512,"mount_point":null,"notes":["a \"note\""],"partition_bytes_after":8,"partition_bytes_before":1048576,"partition_growable_bytes":7,"partition_table":"gpt","stale_temp_mounts_removed":["/run/x"],"steps":[{"after_bytes":9,"before_bytes":null,"changed":true,"device":"/dev/xvdb1","fstype":"ext4","how":"resize2fs"}],"table_before":"label: gpt\n"}"#
        );
        assert_eq!(s(details(&i0)), "{}");
        assert_eq!(
            s(details(&i)),
            r#"{"disk":"/dev/xvdc","filesystem_uuid":"u","fstab":"/etc/fstab","fstab_line":"UUID=u /data ext4 defaults,nofail 0 2","mount_method":"mount --fstab","mount_point":"/data","overwritten":"ext4","partition":null,"steps":["label","mkfs"]}"#
        );
    }

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
