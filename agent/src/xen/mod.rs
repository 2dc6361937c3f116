//! Xen integration: the agent's own xenstore client ([`xenstore`]; its
//! wire format, without I/O, in [`xs_wire`]), VM
//! identity as xenstore reports it plus the cross-check of every identity
//! source ([`identity`]), guest-tools reporting for XAPI ([`publish`]), disks
//! addressed by their VBD number ([`vbd`]) and the KVM counterparts
//! ([`kvm`]). `docs/xen.md` lists every xenstore key read and written.
//!
//! Nothing here needs xe-guest-utilities or xenstore-utils. On a machine
//! without Xen, [`xenstore::Client::open`] returns
//! [`xenstore::XsError::NotAvailable`] and callers report "not available".
pub mod identity;
pub mod kvm;
pub mod publish;
pub mod vbd;
pub mod xenstore;
pub mod xs_wire;

pub use identity::{cross_check, normalise_uuid, xenstore_identity, XenstoreIdentity};
pub use kvm::virtio_port;
pub use vbd::{list_vbds, resolve_vbd, Vbd};
