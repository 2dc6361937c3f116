//! Xen integration (xenstore client, guest-tools keys).
