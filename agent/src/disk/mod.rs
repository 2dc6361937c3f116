//! Disk operations: ExtendPartition and InitializeDisk, and the inventory.
pub mod extend;
pub mod initialize;

/// `xcp-vm-agent inventory [--json]` (placeholder until the inventory lands).
pub fn print_inventory(_json: bool) -> anyhow::Result<()> {
    anyhow::bail!("inventory is not implemented yet")
}
