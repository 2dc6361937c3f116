//! The fstab parser and writer: any text parses; every entry it finds,
//! rendered and parsed again, is the same entry; escaping round-trips.
#![no_main]
use libfuzzer_sys::fuzz_target;
use xcp_vm_agent::disk::fstab;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for line in fstab::parse(&text) {
        if let Some(e) = line.entry {
            let again = fstab::parse(&fstab::render(&e));
            assert_eq!(again.len(), 1, "{e:?} rendered to more than one line");
            assert_eq!(again[0].entry.as_ref(), Some(&e), "{e:?} does not round-trip");
        }
    }
    assert_eq!(fstab::unescape(&fstab::escape(&text)), text);
    let _ = fstab::append(&text, "UUID=x /data ext4 defaults 0 2");
});
