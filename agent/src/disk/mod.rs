//! Disk operations: ExtendPartition and InitializeDisk, and the inventory.
//!
//! Small modules, each owning one thing:
//! - [`sysfs`]: device resolution and sizes through sysfs (never by name glue);
//! - [`target`]: what a job's target fields mean (mount point, device, Xen VBD, serial);
//! - [`lock`]: the whole-disk `flock`;
//! - [`table`]: partition tables (`sfdisk --json`) and growth arithmetic;
//! - [`fs`]: probing, sizing and growing filesystems and LVM PVs;
//! - [`fstab`]: parsing, duplicate detection, atomic editing;
//! - [`mount`]: mountinfo, swaps, mounting through systemd or `mount`;
//! - [`extend`], [`initialize`]: the two jobs; [`inventory`]: the report.
//!
//! The domain layer: it knows nothing of jobs, the protocol or JSON. A job
//! comes in as a request ([`extend::ExtendRequest`],
//! [`initialize::InitializeRequest`]) and goes out as a typed report
//! (`#[derive(Serialize)]`) or a [`Stopped`] ([`DiskError`]: refused before
//! anything changed, or failed in a step, with the report as far as it
//! got); `crate::jobs::disk` adapts both ways. Nothing here imports
//! `crate::jobs` or `crate::protocol` (`vm-tests/tests/docs.rs` checks it).
//!
//! Every external command goes through the `crate::runner::Runner` it is
//! given, so `--dry-run` records the plan. See
//! `docs/disk-operations.md`.
pub mod extend;
pub mod fs;
pub mod fstab;
pub mod initialize;
pub mod inventory;
pub mod lock;
pub mod mount;
pub mod sysfs;
pub mod table;
pub mod target;

pub use inventory::{inventory, print_inventory};

use std::path::PathBuf;

/// The machine a disk operation acts on: sysfs and `/dev`, the fstab, and
/// the state directory (where temporary mounts live).
#[derive(Debug, Clone)]
pub struct System {
    pub sys: sysfs::Sys,
    pub fstab: PathBuf,
    pub state_dir: PathBuf,
}

/// Why a disk operation did not do its work.
#[derive(Debug)]
pub enum DiskError {
    /// Refused before anything changed: the reason.
    Refused(String),
    /// A step failed: the error with its context.
    Failed(anyhow::Error),
}

impl From<anyhow::Error> for DiskError {
    fn from(e: anyhow::Error) -> Self {
        DiskError::Failed(e)
    }
}

/// A command's failure, kept as its type (its text is the message).
impl From<crate::runner::CmdError> for DiskError {
    fn from(e: crate::runner::CmdError) -> Self {
        DiskError::Failed(e.into())
    }
}

/// An operation that stopped: why, and its report as far as it got (the
/// table before a change, for example, stays in it).
#[derive(Debug)]
pub struct Stopped<R> {
    pub error: DiskError,
    pub report: R,
}
