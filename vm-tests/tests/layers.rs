//! Repository checks on the agent's layers (docs/architecture.md, "Layers
//! and what each keeps"), by scanning its sources: `disk/` imports nothing
//! from `crate::jobs` or `crate::protocol` (the jobs adapt to it, never the
//! other way), and `protocol.rs` imports nothing from the rest of the agent.
//! No import circle between the agent's top-level modules nor between
//! xtask's tasks (the graph of their `crate::` paths), and no agent source
//! file over 700 lines. A `use`
//! that would make a layer loop again fails here.
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

/// The import graph of a crate's top-level modules: for each module of
/// `src` (`x.rs` or `x/`; the crate roots `lib.rs` and `main.rs` left out,
/// they declare every module), the other top-level modules its code names
/// (`crate::y` paths, and `y` in `use crate::{y, ..}` groups), each with
/// the first file that names it.
fn import_graph(src: &Path) -> std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>> {
    let mut graph = std::collections::BTreeMap::<String, std::collections::BTreeMap<String, String>>::new();
    let mut files = code_of(src);
    files.sort();
    for (file, lines) in files {
        let rel = file.strip_prefix(src).unwrap();
        let first = rel.components().next().unwrap().as_os_str().to_string_lossy().into_owned();
        let module = first.strip_suffix(".rs").unwrap_or(&first).to_string();
        if module == "lib" || module == "main" {
            continue;
        }
        let code: String = lines.iter().map(|(_, l)| l.as_str()).collect::<Vec<_>>().join("\n");
        let mut named = Vec::new();
        for (i, _) in code.match_indices("crate::") {
            let before = code[..i].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue; // `xcp_vm_agent_crate::`, not a path from the crate root
            }
            let rest = &code[i + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                // The items of the group at depth 0, each up to its first `::`.
                let mut depth = 0;
                let mut item = String::new();
                for c in group.chars() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => named.push(std::mem::take(&mut item)),
                        _ if depth == 0 => item.push(c),
                        _ => {}
                    }
                }
                named.push(item);
            } else {
                named.push(rest.to_string());
            }
        }
        for n in named {
            let name: String = n.trim_start().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if name.is_empty() || name == module || name.chars().next().is_some_and(|c| c.is_uppercase()) {
                continue; // a module's own path, or an item of the crate root (`crate::VERSION`)
            }
            let to = graph.entry(module.clone()).or_default();
            to.entry(name).or_insert_with(|| rel.display().to_string());
        }
    }
    graph
}

/// The import circles of `graph`, each as `a -> b (file) -> ... -> a`.
fn circles(graph: &std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>>) -> Vec<String> {
    // Depth-first from each module in order; a back edge to a module on the
    // path is a circle, named once (by its smallest module).
    fn walk(
        g: &std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>>,
        path: &mut Vec<String>,
        found: &mut std::collections::BTreeSet<String>,
        done: &mut std::collections::BTreeSet<String>,
    ) {
        let here = path.last().unwrap().clone();
        for to in g.get(&here).map(|m| m.keys().cloned().collect::<Vec<_>>()).unwrap_or_default() {
            if let Some(at) = path.iter().position(|p| *p == to) {
                let mut c: Vec<String> = path[at..].to_vec();
                let start = (0..c.len()).min_by_key(|&i| c[i].clone()).unwrap();
                c.rotate_left(start);
                c.push(c[0].clone());
                let text: Vec<String> =
                    c.windows(2).map(|w| format!("{} -> {} ({})", w[0], w[1], g[&w[0]][&w[1]])).collect();
                found.insert(text.join(", "));
            } else if !done.contains(&to) {
                path.push(to);
                walk(g, path, found, done);
                path.pop();
            }
        }
        done.insert(here);
    }
    let mut found = std::collections::BTreeSet::new();
    let mut done = std::collections::BTreeSet::new();
    for m in graph.keys() {
        if !done.contains(m) {
            walk(graph, &mut vec![m.clone()], &mut found, &mut done);
        }
    }
    found.into_iter().collect()
}

#[test]
fn no_import_circle_between_agent_modules() {
    let graph = import_graph(&agent_src());
    assert!(graph.get("jobs").is_some_and(|m| m.contains_key("disk")), "the graph sees jobs -> disk: {graph:?}");
    let c = circles(&graph);
    assert!(c.is_empty(), "import circles between agent modules (docs/architecture.md, layers):\n{}", c.join("\n"));
}

#[test]
fn no_import_circle_between_xtask_tasks() {
    let xtask = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("xtask/src");
    let graph = import_graph(&xtask);
    assert!(graph.get("test").is_some_and(|m| m.contains_key("pkgtest")), "the graph sees test -> pkgtest: {graph:?}");
    let c = circles(&graph);
    assert!(c.is_empty(), "import circles between xtask tasks (docs/architecture.md, xtask):\n{}", c.join("\n"));
}

#[test]
fn the_circle_scan_finds_a_circle() {
    let t = tempfile::tempdir().unwrap();
    std::fs::create_dir(t.path().join("b")).unwrap();
    std::fs::write(t.path().join("lib.rs"), "pub mod a; pub mod b; pub mod c;").unwrap();
    std::fs::write(t.path().join("a.rs"), "use crate::{\n    b::X,\n    VERSION,\n};\n").unwrap();
    std::fs::write(t.path().join("b/mod.rs"), "// crate::a in a comment\npub mod inner;\n").unwrap();
    std::fs::write(t.path().join("b/inner.rs"), "fn f() { crate::c::g() }").unwrap();
    std::fs::write(t.path().join("c.rs"), "use crate::b;\n").unwrap();
    let c = circles(&import_graph(t.path()));
    assert_eq!(c, ["b -> c (b/inner.rs), c -> b (c.rs)"], "{c:?}");
    std::fs::write(t.path().join("c.rs"), "use crate::a::{self, Y};\n").unwrap();
    let c = circles(&import_graph(t.path()));
    assert_eq!(c, ["a -> b (a.rs), b -> c (b/inner.rs), c -> a (c.rs)"], "{c:?}");
}

/// The `.rs` files under `dir` longer than `max` lines, as `path: N lines`.
fn longer_than(dir: &Path, max: usize) -> Vec<String> {
    let mut long: Vec<String> = code_of(dir)
        .into_iter()
        .filter(|(_, lines)| lines.len() > max)
        .map(|(f, lines)| format!("{}: {} lines", f.display(), lines.len()))
        .collect();
    long.sort();
    long
}

#[test]
fn every_agent_module_is_at_most_700_lines() {
    let long = longer_than(&agent_src(), 700);
    assert!(long.is_empty(), "agent modules over 700 lines (docs/architecture.md, split them):\n{}", long.join("\n"));
    // The count itself.
    let t = tempfile::tempdir().unwrap();
    std::fs::write(t.path().join("a.rs"), "x\n".repeat(701)).unwrap();
    std::fs::write(t.path().join("b.rs"), "x\n".repeat(700)).unwrap();
    let long = longer_than(t.path(), 700);
    assert_eq!(long.len(), 1, "{long:?}");
    assert!(long[0].ends_with("a.rs: 701 lines"), "{long:?}");
}
