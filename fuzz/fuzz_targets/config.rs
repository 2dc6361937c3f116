//! The config file parser and validator (`config.json`).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(cfg) = xcp_vm_agent::config::parse(std::path::Path::new("/fuzz/config.json"), &text) {
        // A URL validation accepted is one the client can use.
        if let Some(url) = &cfg.server_url {
            xcp_vm_agent::http::Target::parse(url).expect("validated server_url parses");
        }
    }
});
