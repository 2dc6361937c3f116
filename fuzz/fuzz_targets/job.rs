//! A job as the server sends it: JSON, then `Job` (as `daemon::handle`
//! does), then the typed parameters of the disk operations.
#![no_main]
use libfuzzer_sys::fuzz_target;
use xcp_vm_agent::protocol::Job;

fuzz_target!(|data: &[u8]| {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    if let Ok(job) = serde_json::from_value::<Job>(v) {
        let _ = xcp_vm_agent::jobs::disk::check_extend_params(&job.params);
        let _ = xcp_vm_agent::jobs::disk::check_initialize_params(&job.params);
    }
});
