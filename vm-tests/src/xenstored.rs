//! A test xenstored: speaks the real xenstore wire protocol on a unix socket
//! and holds a tree loaded from a fixture, so Debian's xenstore-utils
//! (`XENSTORED_PATH=SOCKET xenstore-read ...`) and the agent's own client can
//! both be pointed at it.
//!
//! It behaves like xenstored seen from one guest domain (`domid`): relative
//! paths are under `/local/domain/<domid>`. Supported: READ, DIRECTORY,
//! WRITE, MKDIR, RM, GET_PERMS, SET_PERMS, TRANSACTION_START/END (snapshot,
//! EAGAIN on conflict), GET_DOMAIN_PATH, RESET_WATCHES, UNWATCH. WATCH and
//! everything else answer ENOSYS. Nodes listed with `!deny` in the fixture
//! answer EACCES. Every request is logged ([`Xenstored::log`]) so tests can
//! tell what a client wrote and whether it wrote at all.
//!
//! Fixture format (`vm-tests/fixtures/xen/*/xenstore.txt`): one node a line,
//! `/absolute/path = "value"` (the value is a JSON string), or a bare path for
//! an empty node; `!deny /path` makes a subtree unreadable; `#` starts a
//! comment. Parents are created as needed. [`Tree::dump`] writes the same format.
use anyhow::{anyhow, bail, Context, Result};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

pub const PAYLOAD_MAX: usize = 4096;

// Message types (xs_wire.h).
const XS_CONTROL: u32 = 0;
const XS_DIRECTORY: u32 = 1;
const XS_READ: u32 = 2;
const XS_GET_PERMS: u32 = 3;
const XS_WATCH: u32 = 4;
const XS_UNWATCH: u32 = 5;
const XS_TRANSACTION_START: u32 = 6;
const XS_TRANSACTION_END: u32 = 7;
const XS_GET_DOMAIN_PATH: u32 = 10;
const XS_WRITE: u32 = 11;
const XS_MKDIR: u32 = 12;
const XS_RM: u32 = 13;
const XS_SET_PERMS: u32 = 14;
const XS_ERROR: u32 = 16;
const XS_RESET_WATCHES: u32 = 21;

/// A xenstore tree: absolute path → value; every ancestor of a node exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    nodes: BTreeMap<String, String>,
    denied: BTreeSet<String>,
}

impl Default for Tree {
    fn default() -> Self {
        Tree::new()
    }
}

impl Tree {
    pub fn new() -> Tree {
        let mut nodes = BTreeMap::new();
        nodes.insert("/".to_string(), String::new());
        Tree { nodes, denied: BTreeSet::new() }
    }

    /// Parse the fixture format (module header).
    pub fn parse(text: &str) -> Result<Tree> {
        let mut t = Tree::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(p) = line.strip_prefix("!deny ") {
                t.denied.insert(p.trim().to_string());
                continue;
            }
            let (path, value) = match line.split_once(" = ") {
                Some((p, v)) => {
                    let v: String = serde_json::from_str(v.trim())
                        .with_context(|| format!("line {}: value {v:?} is not a JSON string", n + 1))?;
                    (p.trim(), v)
                }
                None => (line, String::new()),
            };
            if !valid_path(path) || !path.starts_with('/') {
                bail!("line {}: {path:?} is not an absolute xenstore path", n + 1);
            }
            t.set(path, &value);
        }
        Ok(t)
    }

    pub fn load(path: &Path) -> Result<Tree> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        Tree::parse(&text).with_context(|| format!("invalid xenstore fixture {}", path.display()))
    }

    /// The fixture format, one node a line, sorted.
    pub fn dump(&self) -> String {
        let mut s = String::new();
        for p in &self.denied {
            s.push_str(&format!("!deny {p}\n"));
        }
        for (p, v) in &self.nodes {
            if p != "/" {
                s.push_str(&format!("{p} = {}\n", serde_json::to_string(v).expect("string")));
            }
        }
        s
    }

    pub fn get(&self, path: &str) -> Option<&str> {
        self.nodes.get(path).map(|s| s.as_str())
    }

    pub fn exists(&self, path: &str) -> bool {
        self.nodes.contains_key(path)
    }

    /// Set a value, creating missing parents with empty values.
    pub fn set(&mut self, path: &str, value: &str) {
        let mut p = String::new();
        for part in path.split('/').filter(|s| !s.is_empty()) {
            p.push('/');
            p.push_str(part);
            self.nodes.entry(p.clone()).or_default();
        }
        self.nodes.insert(path.to_string(), value.to_string());
    }

    /// Remove a node and its subtree; false when it did not exist.
    pub fn rm(&mut self, path: &str) -> bool {
        if !self.nodes.contains_key(path) || path == "/" {
            return false;
        }
        let prefix = format!("{path}/");
        self.nodes.retain(|k, _| k != path && !k.starts_with(&prefix));
        true
    }

    /// Names of a node's children, or None when it does not exist.
    pub fn children(&self, path: &str) -> Option<Vec<String>> {
        if !self.nodes.contains_key(path) {
            return None;
        }
        let prefix = if path == "/" { "/".to_string() } else { format!("{path}/") };
        Some(
            self.nodes
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .map(|(k, _)| &k[prefix.len()..])
                .filter(|rest| !rest.is_empty() && !rest.contains('/'))
                .map(str::to_string)
                .collect(),
        )
    }

    /// All nodes (absolute path → value).
    pub fn nodes(&self) -> &BTreeMap<String, String> {
        &self.nodes
    }

    fn is_denied(&self, path: &str) -> bool {
        self.denied.iter().any(|d| path == d || path.starts_with(&format!("{d}/")))
    }

    /// The guest domain of a fixture: the one `/local/domain/<N>` with N ≠ 0.
    pub fn guest_domid(&self) -> Option<u32> {
        let ids: Vec<u32> =
            self.children("/local/domain")?.iter().filter_map(|s| s.parse().ok()).filter(|d| *d != 0).collect();
        match ids.as_slice() {
            [one] => Some(*one),
            _ => None,
        }
    }
}

fn valid_path(p: &str) -> bool {
    if p == "/" {
        return true;
    }
    !p.is_empty()
        && p.len() <= 3072
        && !p.ends_with('/')
        && !p.contains("//")
        && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"-/_@".contains(&b))
}

/// One request the server received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `READ`, `WRITE`, `RM`, ...
    pub op: &'static str,
    /// The absolute path (empty for transaction requests).
    pub path: String,
    /// The value of a WRITE.
    pub value: Option<String>,
    pub tx: u32,
}

impl Request {
    /// WRITE, MKDIR, RM or SET_PERMS.
    pub fn is_mutation(&self) -> bool {
        matches!(self.op, "WRITE" | "MKDIR" | "RM" | "SET_PERMS")
    }
}

struct Txn {
    tree: Tree,
    base: u64,
}

struct State {
    tree: Tree,
    generation: u64,
    log: Vec<Request>,
    next_tx: u32,
    txs: HashMap<u32, Txn>,
    dump: Option<PathBuf>,
}

/// A running test xenstored; stops and removes its socket when dropped.
pub struct Xenstored {
    socket: PathBuf,
    domid: u32,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Xenstored {
    /// Listen on `socket` with `tree`, as seen from domain `domid`.
    pub fn start(socket: &Path, tree: Tree, domid: u32) -> Result<Xenstored> {
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket).with_context(|| format!("cannot listen on {}", socket.display()))?;
        let state = Arc::new(Mutex::new(State {
            tree,
            generation: 0,
            log: Vec::new(),
            next_tx: 1,
            txs: HashMap::new(),
            dump: None,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if sp.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let st = st.clone();
                std::thread::spawn(move || serve(conn, st, domid));
            }
        });
        Ok(Xenstored { socket: socket.to_path_buf(), domid, state, stop, thread: Some(thread) })
    }

    /// Load a fixture file and serve it, as its guest domain unless `domid` is given.
    pub fn start_fixture(socket: &Path, fixture: &Path, domid: Option<u32>) -> Result<Xenstored> {
        let tree = Tree::load(fixture)?;
        let domid = match domid.or(tree.guest_domid()) {
            Some(d) => d,
            None => bail!("{}: cannot tell the guest domain id; pass --domid", fixture.display()),
        };
        Xenstored::start(socket, tree, domid)
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn domid(&self) -> u32 {
        self.domid
    }

    /// `/local/domain/<domid>`.
    pub fn home(&self) -> String {
        format!("/local/domain/{}", self.domid)
    }

    /// Absolute form of a path (relative ones are under [`Xenstored::home`]).
    pub fn abs(&self, path: &str) -> String {
        absolute(self.domid, path)
    }

    /// A node's value (path absolute or relative to the home).
    pub fn get(&self, path: &str) -> Option<String> {
        self.state.lock().unwrap().tree.get(&self.abs(path)).map(str::to_string)
    }

    pub fn set(&self, path: &str, value: &str) {
        let mut s = self.state.lock().unwrap();
        s.tree.set(&absolute(self.domid, path), value);
        s.generation += 1;
    }

    pub fn rm(&self, path: &str) {
        let mut s = self.state.lock().unwrap();
        s.tree.rm(&absolute(self.domid, path));
        s.generation += 1;
    }

    /// Children of a node, empty when it does not exist.
    pub fn children(&self, path: &str) -> Vec<String> {
        self.state.lock().unwrap().tree.children(&self.abs(path)).unwrap_or_default()
    }

    /// A copy of the whole tree.
    pub fn tree(&self) -> Tree {
        self.state.lock().unwrap().tree.clone()
    }

    /// Every request received so far.
    pub fn log(&self) -> Vec<Request> {
        self.state.lock().unwrap().log.clone()
    }

    /// Only the requests that change the tree.
    pub fn mutations(&self) -> Vec<Request> {
        self.log().into_iter().filter(|r| r.is_mutation()).collect()
    }

    pub fn clear_log(&self) {
        self.state.lock().unwrap().log.clear();
    }

    /// Write the tree to `file` (fixture format) after every change.
    pub fn dump_to(&self, file: &Path) -> Result<()> {
        let mut s = self.state.lock().unwrap();
        std::fs::write(file, s.tree.dump()).with_context(|| format!("cannot write {}", file.display()))?;
        s.dump = Some(file.to_path_buf());
        Ok(())
    }
}

impl Drop for Xenstored {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(&self.socket); // wake accept()
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn absolute(domid: u32, path: &str) -> String {
    if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/local/domain/{domid}/{path}")
    }
}

fn serve(mut conn: UnixStream, state: Arc<Mutex<State>>, domid: u32) {
    loop {
        let mut h = [0u8; 16];
        if conn.read_exact(&mut h).is_err() {
            return;
        }
        let w = |i: usize| u32::from_le_bytes(h[i * 4..i * 4 + 4].try_into().unwrap());
        let (ty, req, tx, len) = (w(0), w(1), w(2), w(3) as usize);
        if len > PAYLOAD_MAX {
            return; // what xenstored does with an oversized request: drop the connection
        }
        let mut body = vec![0u8; len];
        if conn.read_exact(&mut body).is_err() {
            return;
        }
        let (rty, payload) = match handle(&state, domid, ty, tx, &body) {
            Ok(p) => (ty, p),
            Err(errno) => (XS_ERROR, format!("{errno}\0").into_bytes()),
        };
        let mut out = Vec::with_capacity(16 + payload.len());
        for v in [rty, req, tx, payload.len() as u32] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&payload);
        if conn.write_all(&out).is_err() {
            return;
        }
    }
}

fn op_name(ty: u32) -> &'static str {
    match ty {
        XS_CONTROL => "CONTROL",
        XS_DIRECTORY => "DIRECTORY",
        XS_READ => "READ",
        XS_GET_PERMS => "GET_PERMS",
        XS_WATCH => "WATCH",
        XS_UNWATCH => "UNWATCH",
        XS_TRANSACTION_START => "TRANSACTION_START",
        XS_TRANSACTION_END => "TRANSACTION_END",
        XS_GET_DOMAIN_PATH => "GET_DOMAIN_PATH",
        XS_WRITE => "WRITE",
        XS_MKDIR => "MKDIR",
        XS_RM => "RM",
        XS_SET_PERMS => "SET_PERMS",
        XS_RESET_WATCHES => "RESET_WATCHES",
        _ => "OTHER",
    }
}

/// Answer one request: the reply payload, or an errno name.
fn handle(state: &Mutex<State>, domid: u32, ty: u32, tx: u32, body: &[u8]) -> Result<Vec<u8>, &'static str> {
    let mut st = state.lock().unwrap();
    let first_nul = body.iter().position(|b| *b == 0);
    let arg = String::from_utf8_lossy(&body[..first_nul.unwrap_or(body.len())]).into_owned();
    let needs_path = matches!(ty, XS_DIRECTORY | XS_READ | XS_GET_PERMS | XS_WRITE | XS_MKDIR | XS_RM | XS_SET_PERMS);
    let path = if needs_path { absolute(domid, &arg) } else { String::new() };
    let value = (ty == XS_WRITE)
        .then(|| String::from_utf8_lossy(&body[first_nul.map_or(body.len(), |i| i + 1)..]).into_owned());
    st.log.push(Request { op: op_name(ty), path: path.clone(), value: value.clone(), tx });
    if needs_path && (first_nul.is_none() || !valid_path(&path)) {
        return Err("EINVAL");
    }
    match ty {
        XS_TRANSACTION_START => {
            let id = st.next_tx;
            st.next_tx += 1;
            let txn = Txn { tree: st.tree.clone(), base: st.generation };
            st.txs.insert(id, txn);
            return Ok(format!("{id}\0").into_bytes());
        }
        XS_TRANSACTION_END => {
            let Some(txn) = st.txs.remove(&tx) else { return Err("ENOENT") };
            if arg == "T" {
                if txn.base != st.generation {
                    return Err("EAGAIN");
                }
                if txn.tree != st.tree {
                    st.tree = txn.tree;
                    st.generation += 1;
                    save_dump(&st);
                }
            }
            return Ok(b"OK\0".to_vec());
        }
        XS_GET_DOMAIN_PATH => return Ok(format!("/local/domain/{arg}\0").into_bytes()),
        XS_RESET_WATCHES | XS_UNWATCH => return Ok(b"OK\0".to_vec()),
        _ => {}
    }
    if !needs_path {
        return Err("ENOSYS");
    }
    let denied = st.tree.is_denied(&path);
    let st = &mut *st;
    let mutating = matches!(ty, XS_WRITE | XS_MKDIR | XS_RM | XS_SET_PERMS);
    let tree = if tx == 0 {
        &mut st.tree
    } else {
        match st.txs.get_mut(&tx) {
            Some(t) => &mut t.tree,
            None => return Err("ENOENT"),
        }
    };
    if denied {
        return Err("EACCES");
    }
    let reply = match ty {
        XS_READ => tree.get(&path).ok_or("ENOENT")?.as_bytes().to_vec(),
        XS_DIRECTORY => {
            let mut out = Vec::new();
            for c in tree.children(&path).ok_or("ENOENT")? {
                out.extend_from_slice(c.as_bytes());
                out.push(0);
            }
            if out.len() > PAYLOAD_MAX {
                return Err("E2BIG");
            }
            out
        }
        XS_GET_PERMS => {
            tree.get(&path).ok_or("ENOENT")?;
            format!("b{domid}\0").into_bytes()
        }
        XS_WRITE => {
            tree.set(&path, value.as_deref().unwrap_or(""));
            b"OK\0".to_vec()
        }
        XS_MKDIR => {
            if !tree.exists(&path) {
                tree.set(&path, "");
            }
            b"OK\0".to_vec()
        }
        XS_RM => {
            if path == "/" {
                return Err("EINVAL");
            }
            if !tree.rm(&path) {
                let parent = path.rsplit_once('/').map(|(p, _)| if p.is_empty() { "/" } else { p }).unwrap_or("/");
                if !tree.exists(parent) {
                    return Err("ENOENT");
                }
            }
            b"OK\0".to_vec()
        }
        XS_SET_PERMS => {
            tree.get(&path).ok_or("ENOENT")?;
            b"OK\0".to_vec()
        }
        _ => return Err("ENOSYS"),
    };
    if mutating && tx == 0 {
        st.generation += 1;
        save_dump(st);
    }
    Ok(reply)
}

fn save_dump(st: &State) {
    if let Some(f) = &st.dump {
        let tmp = f.with_extension("tmp");
        if std::fs::write(&tmp, st.tree.dump()).is_ok() {
            let _ = std::fs::rename(&tmp, f);
        }
    }
}

/// Arguments of the `test-xenstored` binary.
pub fn main_with_args(args: &[String]) -> Result<()> {
    let mut socket = None;
    let mut tree = None;
    let mut domid = None;
    let mut dump = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().ok_or_else(|| anyhow!("{a} needs a value"));
        match a.as_str() {
            "--socket" => socket = Some(PathBuf::from(val()?)),
            "--tree" => tree = Some(PathBuf::from(val()?)),
            "--domid" => domid = Some(val()?.parse::<u32>().context("--domid takes a number")?),
            "--dump" => dump = Some(PathBuf::from(val()?)),
            "-h" | "--help" => {
                println!("usage: test-xenstored --socket PATH [--tree FIXTURE] [--domid N] [--dump FILE]");
                return Ok(());
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    let socket = socket.ok_or_else(|| anyhow!("--socket PATH is required"))?;
    let xs = match tree {
        Some(t) => Xenstored::start_fixture(&socket, &t, domid)?,
        None => Xenstored::start(&socket, Tree::new(), domid.unwrap_or(1))?,
    };
    if let Some(d) = dump {
        xs.dump_to(&d)?;
    }
    println!("ready {} domid {}", socket.display(), xs.domid());
    std::io::stdout().flush()?;
    // Serve until stdin closes or the process is killed.
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixture_round_trips() {
        let t = Tree::parse("# c\n/local/domain/5/vm = \"/vm/x\"\n/local/domain/5/data\n!deny /secret\n").unwrap();
        assert_eq!(t.get("/local/domain/5/vm"), Some("/vm/x"));
        assert_eq!(t.get("/local/domain"), Some(""));
        assert_eq!(t.guest_domid(), Some(5));
        assert_eq!(Tree::parse(&t.dump()).unwrap(), t);
        assert_eq!(t.children("/local/domain/5").unwrap(), vec!["data", "vm"]);
        assert!(t.is_denied("/secret/a"));
    }

    #[test]
    fn rm_removes_the_subtree_only() {
        let mut t = Tree::new();
        t.set("/a/b/c", "1");
        t.set("/a/bb", "2");
        assert!(t.rm("/a/b"));
        assert!(t.exists("/a/bb") && !t.exists("/a/b/c"));
    }
}
