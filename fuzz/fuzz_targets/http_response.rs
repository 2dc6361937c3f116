//! The HTTP response parser the agent reads the server's answers with:
//! head then body, limits enforced, errors and never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use xcp_vm_agent::http::{read_body, read_head};

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    if let Ok(head) = read_head(&mut r) {
        if let Ok(body) = read_body(&mut r, &head, 1 << 16) {
            assert!(body.len() <= 1 << 16);
        }
    }
});
