//! Repository checks on the documentation: every path `docs/architecture.md`
//! names exists, and every document a source file cites exists. A move that
//! leaves the code map behind, or a header citing a doc never written, fails
//! here.
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Top-level folders of the repository: a word starting with one of them
/// and a `/` is a repository path.
const TOP: &[&str] = &["agent/", "xtask/", "vm-tests/", "docs/", "packaging/", "fuzz/", "ci/", ".ci/"];

fn path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "_-./*".contains(c)
}

/// Every repository path in `text`: words starting with a top-level folder,
/// cut at the first character a path here never holds (a trailing `.` of a
/// sentence dropped).
fn repo_paths(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, _) in text.char_indices() {
        let prev = text[..i].chars().next_back();
        if prev.is_some_and(|c| path_char(c) || c == '<') {
            continue;
        }
        if TOP.iter().any(|t| text[i..].starts_with(t)) {
            let end = text[i..].find(|c: char| !path_char(c)).map_or(text.len(), |n| i + n);
            let p = text[i..end].trim_end_matches('.');
            // `running/<stem>.lock`-style patterns and globs are not files.
            if !p.contains('*') && !text[end..].starts_with('<') {
                out.push(p.to_string());
            }
        }
    }
    out
}

/// The first column of the code map table (`| \`jobs/mod.rs\` | ...`):
/// paths under `agent/src`.
fn code_map_paths(text: &str) -> Vec<String> {
    let Some(start) = text.find("## Code map: `agent/src`") else { panic!("docs/architecture.md has no code map") };
    let section = &text[start..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |n| n + 3)];
    section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(|p| format!("agent/src/{p}"))
        .collect()
}

#[test]
fn every_path_architecture_md_names_exists() {
    let text = std::fs::read_to_string(root().join("docs/architecture.md")).unwrap();
    let mut paths = repo_paths(&text);
    let map = code_map_paths(&text);
    assert!(map.len() > 10, "the code map lists the modules: {map:?}");
    paths.extend(map);
    assert!(paths.iter().any(|p| p == "vm-tests/tests/disk.rs"), "the scanner finds paths: {paths:?}");
    let missing: Vec<_> = paths.iter().filter(|p| !root().join(p).exists()).collect();
    assert!(missing.is_empty(), "docs/architecture.md names paths that do not exist: {missing:?}");
}

/// Every `.rs` file under `dir`, recursively.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn every_doc_a_source_file_cites_exists() {
    let mut files = Vec::new();
    for d in ["agent/src", "xtask/src", "vm-tests/src", "vm-tests/tests", "fuzz/fuzz_targets"] {
        if root().join(d).is_dir() {
            sources(&root().join(d), &mut files);
        }
    }
    assert!(files.len() > 50, "found the sources: {}", files.len());
    let mut cited = 0;
    let mut missing = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        for p in repo_paths(&text) {
            if p.starts_with("docs/") && (p.ends_with(".md") || p.ends_with(".json")) {
                cited += 1;
                if !root().join(&p).exists() {
                    missing.push(format!("{} cites {p}", f.strip_prefix(root()).unwrap().display()));
                }
            }
        }
    }
    assert!(cited > 20, "the scanner finds citations: {cited}");
    assert!(missing.is_empty(), "documents cited but missing: {missing:#?}");
}

#[test]
fn the_path_scanner_reads_sentences() {
    let t = "see docs/testing.md. Also `agent/src/jobs/mod.rs`, (docs/xen.md) and running/<stem>.lock, \
             target/dist/x and xtask/src/vm/*.rs";
    assert_eq!(repo_paths(t), ["docs/testing.md", "agent/src/jobs/mod.rs", "docs/xen.md"]);
}
