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
//! Every external command goes through `ctx.runner` (`crate::runner`), so
//! `--dry-run` records the plan. See `docs/disk-operations.md`.
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
