//! Repository checks on the agent's layers (docs/architecture.md, "Layers
//! and what each keeps"), by scanning its sources: `disk/` imports nothing
//! from `crate::jobs` or `crate::protocol` (the jobs adapt to it, never the
//! other way), and `protocol.rs` imports nothing from the rest of the agent.
//! A `use` that would make a layer loop again fails here.
use std::path::{Path, PathBuf};

fn agent_src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("agent/src")
}

/// Each `.rs` file under `dir`, with its code lines (comments dropped, so a
/// header may name the modules it does not use).
fn code_of(dir: &Path) -> Vec<(PathBuf, Vec<(usize, String)>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if d.is_file() {
            let text = std::fs::read_to_string(&d).unwrap();
            let lines = text
                .lines()
                .enumerate()
                .map(|(i, l)| (i + 1, l.split("//").next().unwrap_or("").to_string()))
                .collect();
            out.push((d, lines));
            continue;
        }
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() || p.extension().is_some_and(|x| x == "rs") {
                stack.push(p);
            }
        }
    }
    out
}

/// Lines of `dir`'s code that name one of `names`.
fn uses(dir: &Path, names: &[&str]) -> Vec<String> {
    let mut bad = Vec::new();
    for (file, lines) in code_of(dir) {
        for (n, l) in lines {
            if names.iter().any(|x| l.contains(x)) {
                bad.push(format!("{}:{n}: {}", file.display(), l.trim()));
            }
        }
    }
    bad
}

#[test]
fn disk_imports_nothing_from_jobs_or_protocol() {
    let disk = agent_src().join("disk");
    assert!(code_of(&disk).len() >= 10, "agent/src/disk holds the disk modules");
    let bad = uses(&disk, &["crate::jobs", "crate::protocol", "xcp_vm_agent::"]);
    assert!(bad.is_empty(), "disk/ must not import jobs or protocol (docs/architecture.md):\n{}", bad.join("\n"));
}

#[test]
fn protocol_imports_nothing_from_the_agent() {
    let bad = uses(&agent_src().join("protocol.rs"), &["crate::"]);
    assert!(bad.is_empty(), "protocol.rs must not import the rest of the agent:\n{}", bad.join("\n"));
}

#[test]
fn the_scan_sees_an_import() {
    // The scan itself: the jobs adapter does import disk, and a comment does not count.
    let jobs = uses(&agent_src().join("jobs"), &["crate::disk::"]);
    assert!(!jobs.is_empty(), "jobs/ imports crate::disk:: somewhere");
    let t = tempfile::tempdir().unwrap();
    std::fs::write(t.path().join("a.rs"), "//! see crate::jobs\nuse crate::jobs::X; // crate::protocol\n").unwrap();
    let found = uses(t.path(), &["crate::jobs", "crate::protocol"]);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].ends_with(":2: use crate::jobs::X;"), "{found:?}");
}
