//! The xenstore reply parser: byte 0 picks the request type, bytes 1..5 the
//! request id; the rest is the reply as it came off the wire.
#![no_main]
use libfuzzer_sys::fuzz_target;
use xcp_vm_agent::xen::xenstore::{parse_reply, Op};

fuzz_target!(|data: &[u8]| {
    let Some((&op, rest)) = data.split_first() else { return };
    let Some(op) = Op::from_u32(op as u32 % 32) else { return };
    let Some((id, msg)) = rest.split_first_chunk::<4>() else { return };
    if let Ok(body) = parse_reply(op, u32::from_le_bytes(*id), msg) {
        assert!(body.len() + 16 <= msg.len());
    }
});
