//! Test-only fault injection. `failpoint::hit("extend.after_growpart")`
//! aborts the process on the spot when the environment variable
//! `XCP_AGENT_FAILPOINT` names that point, so tests can kill the agent after
//! each step and check that a rerun converges. Compiled in only with the
//! cargo feature `failpoints`; otherwise `hit` is an empty inline function.
//!
//! Points (see `docs/disk-operations.md`): `extend.after_lock`,
//! `extend.after_growpart`, `extend.after_partx`, `extend.after_e2fsck`,
//! `extend.after_resize2fs`, `extend.after_temp_mount`,
//! `extend.after_xfs_growfs`, `extend.after_pvresize`,
//! `extend.after_lvextend`, `initialize.after_partition`,
//! `initialize.after_mkfs`, `initialize.after_fstab_temp`,
//! `initialize.after_fstab`.

/// The environment variable naming the point to die at.
pub const ENV: &str = "XCP_AGENT_FAILPOINT";

#[cfg(feature = "failpoints")]
pub fn hit(name: &str) {
    if std::env::var(ENV).map(|v| v == name).unwrap_or(false) {
        eprintln!("xcp-vm-agent: failpoint {name} reached: aborting");
        std::process::abort();
    }
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &str) {}

/// Whether this build honours failpoints.
pub const ENABLED: bool = cfg!(feature = "failpoints");
