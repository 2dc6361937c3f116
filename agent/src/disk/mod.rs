//! Disk operations: ExtendPartition and InitializeDisk, and the inventory.
pub mod extend;
pub mod initialize;
