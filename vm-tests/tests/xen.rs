//! Xen integration against the test xenstored (`vm_tests::xenstored`).
//!
//! First the test server is vouched for by Debian's real client
//! (xenstore-utils); then the agent's own client, identity, guest-tools
//! publisher and VBD resolution run against it, and a hostile server checks
//! that bad replies are errors, never hangs or crashes. Fixtures live in
//! `vm-tests/fixtures/xen/<guest>/` (`xenstore.txt` plus a fake `/sys`,
//! `/proc` and `/etc`).
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vm_tests::xenstored::{Tree, Xenstored};
use xcp_vm_agent::config::{Config, XenPublish};
use xcp_vm_agent::xen::publish::{Interface, PublishPaths, Publisher, Status};
use xcp_vm_agent::xen::xenstore::{with_transaction, Client, XsErrno, XsError};
use xcp_vm_agent::xen::{cross_check, vbd, xenstore_identity};

const TIMEOUT: Duration = Duration::from_millis(500);

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/xen").join(name)
}

/// A test xenstored serving a fixture in a scratch directory.
fn serve(name: &str) -> (tempfile::TempDir, Xenstored) {
    let dir = tempfile::tempdir().unwrap();
    let xs = Xenstored::start_fixture(&dir.path().join("xs.sock"), &fixture(name).join("xenstore.txt"), None)
        .unwrap_or_else(|e| panic!("cannot start the test xenstored on fixture {name}: {e:#}"));
    (dir, xs)
}

fn client(xs: &Xenstored) -> Client {
    Client::connect_socket(xs.socket()).unwrap().with_timeout(TIMEOUT)
}

fn read_file(p: PathBuf) -> Option<String> {
    std::fs::read_to_string(p).ok().map(|s| s.trim().to_string())
}

/// Run a command, print everything about it, return (exit code, stdout, stderr).
fn run(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| {
        panic!("cannot run {cmd:?}: {e} (xenstore-utils missing? run `cargo xtask setup` or apt-get install xenstore-utils)")
    });
    let (so, se) =
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    eprintln!("$ {cmd:?}\n  exit {:?}\n  stdout: {so:?}\n  stderr: {se:?}", out.status.code());
    (out.status.code().unwrap_or(-1), so, se)
}

fn xs_cmd(sock: &Path, tool: &str, args: &[&str]) -> (i32, String, String) {
    run(Command::new(tool)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("XENSTORED_PATH", sock)
        .args(args))
}

/// The `test-xenstored` binary as a child process; killed on drop.
struct ServerChild(std::process::Child);

impl Drop for ServerChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn real_xenstore_utils_see_and_change_the_test_tree() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("xs.sock");
    let dump = dir.path().join("tree.txt");
    let mut child = Command::new(env!("CARGO_BIN_EXE_test-xenstored"))
        .args(["--socket", sock.to_str().unwrap(), "--tree"])
        .arg(fixture("pv").join("xenstore.txt"))
        .args(["--dump", dump.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start test-xenstored");
    let mut line = String::new();
    let mut out = child.stdout.take().unwrap();
    let _guard = ServerChild(child);
    let mut b = [0u8; 1];
    while !line.ends_with('\n') && out.read(&mut b).unwrap_or(0) == 1 {
        line.push(b[0] as char);
    }
    assert!(line.starts_with("ready") && line.contains("domid 7"), "test-xenstored said {line:?}");

    // Relative paths are the guest's home, as in a real guest.
    let (rc, vm, _) = xs_cmd(&sock, "xenstore-read", &["vm"]);
    assert_eq!((rc, vm.trim()), (0, "/vm/3f6a1d2e-8b4c-4e5f-9a0b-1c2d3e4f5a6b"));
    let (rc, s, _) = xs_cmd(&sock, "xenstore-read", &["/local/domain/0/backend/vbd/7/51728/sectors"]);
    assert_eq!((rc, s.trim()), (0, "2097152"));
    let (rc, s, _) = xs_cmd(&sock, "xenstore-list", &["device/vbd"]);
    assert_eq!((rc, s.split_whitespace().collect::<Vec<_>>()), (0, vec!["51712", "51728"]));
    let (rc, s, _) = xs_cmd(&sock, "xenstore-ls", &["device/vif"]);
    assert_eq!(rc, 0);
    assert!(s.contains("mac = \"00:16:3e:5a:07:01\""), "{s}");

    // Writes (inside the transaction xenstore-write opens) reach the server's tree.
    let (rc, _, _) = xs_cmd(&sock, "xenstore-write", &["data/greeting", "hello world", "attr/x/y", "1"]);
    assert_eq!(rc, 0);
    let tree = Tree::load(&dump).unwrap();
    assert_eq!(tree.get("/local/domain/7/data/greeting"), Some("hello world"));
    assert_eq!(tree.get("/local/domain/7/attr/x/y"), Some("1"));
    let (_, s, _) = xs_cmd(&sock, "xenstore-read", &["data/greeting"]);
    assert_eq!(s.trim(), "hello world");

    // Removal, and errors as the real client reports them.
    let (rc, _, _) = xs_cmd(&sock, "xenstore-rm", &["attr/x"]);
    assert_eq!(rc, 0);
    assert!(!Tree::load(&dump).unwrap().exists("/local/domain/7/attr/x"));
    let (rc, _, err) = xs_cmd(&sock, "xenstore-read", &["attr/x/y"]);
    assert_ne!(rc, 0, "a removed key must not be readable");
    assert!(err.contains("couldn't read"), "{err}");
    let (rc, _, _) = xs_cmd(&sock, "xenstore-read", &["/local/domain/0/backend/vbd/7/51712/params"]);
    assert_ne!(rc, 0, "a denied key must not be readable");
    let (rc, _, _) = xs_cmd(&sock, "xenstore-exists", &["domid"]);
    assert_eq!(rc, 0);

    // The agent's client sees what the real client wrote, and the other way round.
    let mut c = Client::connect_socket(&sock).unwrap().with_timeout(TIMEOUT);
    assert_eq!(c.read("data/greeting").unwrap(), "hello world");
    c.write("data/from_agent", "42").unwrap();
    let (_, s, _) = xs_cmd(&sock, "xenstore-read", &["data/from_agent"]);
    assert_eq!(s.trim(), "42");
}

#[test]
fn client_errors_are_typed_and_transactions_work() {
    let (_d, xs) = serve("pv");
    let mut c = client(&xs);
    let e = c.read("data/nope").unwrap_err();
    assert!(e.is_not_found(), "{e}");
    assert_eq!(c.read_opt("data/nope").unwrap(), None);
    let e = c.read("/local/domain/0/backend/vbd/7/51712/params").unwrap_err();
    assert!(e.is_permission_denied(), "{e}");
    assert!(matches!(c.read("bad//path").unwrap_err(), XsError::Server { errno: XsErrno::Invalid, .. }));
    assert_eq!(c.directory("device/vbd").unwrap(), vec!["51712", "51728"]);

    // A committed transaction lands; a conflicting one gets EAGAIN.
    with_transaction(&mut c, |c, tx| c.write_tx(tx, "data/a", "1")).unwrap();
    assert_eq!(xs.get("data/a").as_deref(), Some("1"));
    let tx = c.transaction_start().unwrap();
    c.write_tx(tx, "data/b", "2").unwrap();
    assert_eq!(xs.get("data/b"), None, "uncommitted write must not be visible");
    xs.set("data/other", "x");
    let e = c.transaction_end(tx, true).unwrap_err();
    assert!(matches!(e, XsError::Server { errno: XsErrno::Again, .. }), "{e}");
    c.rm("data/a").unwrap();
    assert_eq!(xs.get("data/a"), None);
    c.rm_if_present("data/a").unwrap();
}

fn sys_sources(name: &str) -> (Option<String>, Option<String>) {
    let root = fixture(name);
    (read_file(root.join("sys/hypervisor/uuid")), read_file(root.join("sys/class/dmi/id/product_uuid")))
}

#[test]
fn identity_in_each_fixture() {
    // (fixture, domid, vm uuid, has DMI, warnings expected)
    let cases = [
        ("pv", 7, "3f6a1d2e-8b4c-4e5f-9a0b-1c2d3e4f5a6b", false, 0),
        ("hvm", 12, "9d8c7b6a-5f4e-4d3c-8b2a-1f0e9d8c7b6a", true, 0),
        ("dmi-disagrees", 21, "c0ffee00-1234-4abc-8def-0123456789ab", true, 1),
        ("xe-daemon", 30, "4e5d6c7b-8a9f-4e0d-9c1b-2a3f4e5d6c7b", true, 0),
    ];
    for (name, domid, uuid, has_dmi, nwarn) in cases {
        let (_d, xs) = serve(name);
        let id = xcp_vm_agent::xen::identity::xenstore_identity_with(&mut client(&xs));
        assert_eq!(id.vm_uuid.as_deref(), Some(uuid), "{name}: {id:?}");
        assert_eq!(id.domid, Some(domid), "{name}: {id:?}");
        assert_eq!(id.error, None, "{name}");
        let (hyp, dmi) = sys_sources(name);
        assert_eq!(dmi.is_some(), has_dmi, "{name}");
        let warnings = cross_check(&[
            ("xenstore", id.vm_uuid.as_deref()),
            ("sys_hypervisor_uuid", hyp.as_deref()),
            ("dmi_product_uuid", dmi.as_deref()),
        ]);
        assert_eq!(warnings.len(), nwarn, "{name}: {warnings:?}");
        if nwarn > 0 {
            assert!(warnings[0].contains("dmi_product_uuid") && warnings[0].contains(uuid), "{warnings:?}");
        }
    }
}

#[test]
fn identity_without_xenstore_says_not_available() {
    // No XENSTORED_PATH and no xenbus device on this machine.
    if std::env::var_os("XENSTORED_PATH").is_some() || Path::new("/dev/xen/xenbus").exists() {
        vm_tests::tier::cannot_run("this machine has a xenstore; the not-available case cannot be observed");
        return;
    }
    let id = xenstore_identity();
    assert_eq!(id.vm_uuid, None);
    assert!(id.error.as_deref().unwrap_or("").contains("not available"), "{id:?}");
}

/// `xcp-vm-agent identity --json` against the test xenstored and the
/// fixture's /sys: every source's value, and the DMI disagreement as a warning.
#[test]
fn agent_identity_json_shows_every_source() {
    for (name, uuid, warn) in [
        ("pv", "3f6a1d2e-8b4c-4e5f-9a0b-1c2d3e4f5a6b", false),
        ("hvm", "9d8c7b6a-5f4e-4d3c-8b2a-1f0e9d8c7b6a", false),
        ("dmi-disagrees", "c0ffee00-1234-4abc-8def-0123456789ab", true),
    ] {
        let (_d, xs) = serve(name);
        let (rc, out, _) = run(Command::new(vm_tests::harness::agent_bin())
            .args(["identity", "--json"])
            .env("XENSTORED_PATH", xs.socket())
            .env("XCP_AGENT_SYSROOT", fixture(name)));
        assert_eq!(rc, 0, "{name}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{name}: {e}: {out}"));
        assert_eq!(v["vm_uuid"], uuid, "{name}");
        assert_eq!(v["domid"], xs.domid(), "{name}");
        let sources: BTreeMap<String, serde_json::Value> = v["sources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (s["source"].as_str().unwrap().to_string(), s["value"].clone()))
            .collect();
        assert_eq!(sources.get("xenstore").and_then(|s| s.as_str()), Some(uuid), "{name}: {v}");
        let (hyp, dmi) = sys_sources(name);
        let values: Vec<String> = sources.values().filter_map(|s| s.as_str().map(str::to_lowercase)).collect();
        assert!(values.contains(&hyp.unwrap().to_lowercase()), "{name}: /sys/hypervisor/uuid missing in {v}");
        if let Some(dmi) = dmi {
            assert!(values.contains(&dmi.to_lowercase()), "{name}: DMI missing in {v}");
        }
        let warnings = v["warnings"].as_array().unwrap();
        assert_eq!(!warnings.is_empty(), warn, "{name}: {v}");
    }
}

/// The same with a `xenstore-read` on PATH that always fails: only the
/// agent's own client can answer.
#[test]
fn agent_identity_needs_no_xenstore_utils() {
    use std::os::unix::fs::PermissionsExt;
    let (d, xs) = serve("hvm");
    let bin = d.path().join("fakebin");
    std::fs::create_dir_all(&bin).unwrap();
    for tool in ["xenstore-read", "xenstore-ls", "xenstore-list", "xenstore"] {
        std::fs::write(bin.join(tool), "#!/bin/sh\necho \"$0 must not be used\" >&2\nexit 1\n").unwrap();
        std::fs::set_permissions(bin.join(tool), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let (rc, out, _) = run(Command::new(vm_tests::harness::agent_bin())
        .args(["identity", "--json"])
        .env("PATH", &bin)
        .env("XENSTORED_PATH", xs.socket())
        .env("XCP_AGENT_SYSROOT", fixture("hvm")));
    assert_eq!(rc, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["source"], "xenstore", "{v}");
    assert_eq!(v["domid"], 12, "{v}");
}

fn config(mode: XenPublish, key: Option<&str>) -> Config {
    let mut c = Config::defaults(Path::new("/nonexistent/config.json"));
    c.xenstore_publish = mode;
    if let Some(k) = key {
        c.not_upgradable_key = k.to_string();
    }
    c
}

/// A scratch copy of a fixture's /proc and /etc plus the NotUpgradable file path.
struct GuestFiles {
    dir: tempfile::TempDir,
}

impl GuestFiles {
    fn new(name: &str) -> GuestFiles {
        let dir = tempfile::tempdir().unwrap();
        let st = Command::new("cp").arg("-r").arg(fixture(name)).arg(dir.path().join("root")).status().unwrap();
        assert!(st.success());
        GuestFiles { dir }
    }
    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }
    fn flag(&self) -> PathBuf {
        self.root().join("etc/pv-drivers-not-upgradable")
    }
    fn paths(&self) -> PublishPaths {
        PublishPaths {
            proc_root: self.root().join("proc"),
            os_release: self.root().join("etc/os-release"),
            not_upgradable_file: self.flag(),
        }
    }
}

fn iface(name: &str, mac: &str, v4: &[&str], v6: &[&str]) -> Interface {
    Interface {
        name: name.into(),
        mac: Some(mac.into()),
        ipv4: v4.iter().map(|a| a.parse::<Ipv4Addr>().unwrap()).collect(),
        ipv6: v6.iter().map(|a| a.parse::<Ipv6Addr>().unwrap()).collect(),
    }
}

fn publisher(
    files: &GuestFiles,
    xs: &Xenstored,
    ifaces: std::sync::Arc<std::sync::Mutex<Vec<Interface>>>,
) -> Publisher {
    let sock = xs.socket().to_path_buf();
    Publisher::with_paths(files.paths())
        .with_connector(move || Client::connect_socket(&sock).map(|c| c.with_timeout(TIMEOUT)))
        .with_network(move || ifaces.lock().unwrap().clone())
}

#[test]
fn publisher_writes_every_key_then_only_what_changed() {
    let (_d, xs) = serve("hvm");
    let files = GuestFiles::new("hvm");
    let net = std::sync::Arc::new(std::sync::Mutex::new(vec![
        iface("lo", "00:00:00:00:00:00", &["127.0.0.1"], &["::1"]),
        iface("eth0", "00:16:3e:12:00:00", &["192.0.2.10", "192.0.2.11"], &["2001:db8::10", "fe80::216:3eff:fe12:0"]),
        iface("eth1", "00:16:3e:12:00:01", &["198.51.100.7"], &[]),
        iface("eth9", "00:16:3e:99:99:99", &["203.0.113.9"], &[]),
    ]));
    let mut p = publisher(&files, &xs, net.clone());
    let cfg = config(XenPublish::Always, None);
    let t0 = Instant::now();
    let st = p.tick_at(&cfg, t0);
    assert!(matches!(st, Status::Published { .. }), "{st}");

    let version: Vec<&str> = xcp_vm_agent::VERSION.split(['-', '+']).next().unwrap().split('.').collect();
    let uname = nix::sys::utsname::uname().unwrap().release().to_string_lossy().into_owned();
    let expect = [
        ("attr/PVAddons/Installed", "1"),
        ("attr/PVAddons/MajorVersion", version[0]),
        ("attr/PVAddons/MinorVersion", version[1]),
        ("attr/PVAddons/MicroVersion", version[2]),
        ("attr/PVAddons/BuildVersion", "0"),
        ("data/os_name", "Rocky Linux 9.4 (Blue Onyx)"),
        ("data/os_distro", "rocky"),
        ("data/os_majorver", "9"),
        ("data/os_minorver", "4"),
        ("data/os_uname", &uname),
        ("data/meminfo_total", "4015580"),
        ("data/meminfo_free", "3100200"),
        ("attr/vif/0/ipv4/0", "192.0.2.10"),
        ("attr/vif/0/ipv4/1", "192.0.2.11"),
        ("attr/vif/0/ipv6/0", "2001:db8::10"),
        ("attr/vif/0/ipv6/1", "fe80::216:3eff:fe12:0"),
        // device/vif/1/mac is upper case in the fixture: matching ignores case.
        ("attr/vif/1/ipv4/0", "198.51.100.7"),
    ];
    for (k, v) in expect {
        assert_eq!(xs.get(k).as_deref(), Some(v), "key {k}; tree:\n{}", xs.tree().dump());
    }
    assert!(xs.get("data/updated").is_some());
    assert!(xs.children("attr/vif").len() == 2, "no keys for interfaces without a VIF");
    assert_eq!(xs.get("data/NotUpgradable"), None);
    let order: Vec<String> = xs.mutations().iter().map(|r| r.path.clone()).collect();
    assert_eq!(order.last().map(String::as_str), Some("/local/domain/12/data/updated"), "data/updated comes last");

    // Nothing changed: nothing written, not even data/updated.
    xs.clear_log();
    assert_eq!(p.tick_at(&cfg, t0 + Duration::from_secs(5)), Status::Unchanged);
    assert!(xs.mutations().is_empty(), "{:?}", xs.mutations());

    // An address goes away and one changes: exactly those keys, then data/updated.
    net.lock().unwrap()[1].ipv4 = vec!["192.0.2.12".parse().unwrap()];
    std::fs::write(files.root().join("proc/meminfo"), "MemTotal: 4015580 kB\nMemAvailable: 100 kB\n").unwrap();
    xs.clear_log();
    let st = p.tick_at(&cfg, t0 + Duration::from_secs(10));
    assert_eq!(st, Status::Published { written: 1, removed: 1 }, "meminfo waits for its 60 s");
    let m: Vec<(&str, String)> = xs.mutations().iter().map(|r| (r.op, r.path.clone())).collect();
    assert_eq!(
        m,
        vec![
            ("RM", "/local/domain/12/attr/vif/0/ipv4/1".to_string()),
            ("WRITE", "/local/domain/12/attr/vif/0/ipv4/0".to_string()),
            ("WRITE", "/local/domain/12/data/updated".to_string()),
        ]
    );
    xs.clear_log();
    p.tick_at(&cfg, t0 + Duration::from_secs(70));
    assert_eq!(xs.get("data/meminfo_free").as_deref(), Some("100"));
    let paths: Vec<String> = xs.mutations().iter().map(|r| r.path.clone()).collect();
    assert_eq!(paths, vec!["/local/domain/12/data/meminfo_free", "/local/domain/12/data/updated"]);

    // Someone wipes our keys (the toolstack after a migration): a new domain
    // id makes the publisher rewrite everything.
    let attr = |xs: &Xenstored| -> String {
        xs.tree().dump().lines().filter(|l| l.starts_with("/local/domain/12/attr/")).collect::<Vec<_>>().join("\n")
    };
    let attr_before = attr(&xs);
    assert!(attr_before.lines().count() >= 10, "{attr_before}");
    xs.rm("attr");
    xs.set("domid", "13");
    p.tick_at(&cfg, t0 + Duration::from_secs(80));
    assert_eq!(attr(&xs), attr_before, "every attr key must be written again");
}

#[test]
fn auto_mode_is_silent_while_another_agent_publishes() {
    let (_d, xs) = serve("xe-daemon");
    let files = GuestFiles::new("xe-daemon");
    let net =
        std::sync::Arc::new(std::sync::Mutex::new(vec![iface("eth0", "00:16:3e:30:00:00", &["192.0.2.99"], &[])]));
    let mut p = publisher(&files, &xs, net.clone());
    let before = xs.tree();
    for _ in 0..3 {
        assert_eq!(p.tick(&config(XenPublish::Auto, None)), Status::OtherAgent("xe-daemon".into()));
    }
    assert_eq!(p.tick(&config(XenPublish::Never, None)), Status::Disabled);
    assert!(xs.log().is_empty(), "auto/never must not even talk to xenstore: {:?}", xs.log());
    assert_eq!(xs.tree(), before);

    // xe-daemon goes away: auto publishes, replacing its stale values.
    std::fs::remove_dir_all(files.root().join("proc/4242")).unwrap();
    assert!(matches!(p.tick(&config(XenPublish::Auto, None)), Status::Published { .. }));
    assert_eq!(xs.get("attr/vif/0/ipv4/0").as_deref(), Some("192.0.2.99"));
    let major = xcp_vm_agent::VERSION.split('.').next().unwrap();
    assert_eq!(xs.get("attr/PVAddons/MajorVersion").as_deref(), Some(major), "xe-daemon's 7 must be replaced");

    // always publishes even beside xe-daemon.
    let (_d2, xs2) = serve("xe-daemon");
    let files2 = GuestFiles::new("xe-daemon");
    let mut p2 = publisher(&files2, &xs2, net);
    assert!(matches!(p2.tick(&config(XenPublish::Always, None)), Status::Published { .. }));
    assert!(!xs2.mutations().is_empty());
}

#[test]
fn not_upgradable_follows_the_file() {
    for key in [None, Some("data/xcp-ng/NotUpgradable")] {
        let (_d, xs) = serve("pv");
        let files = GuestFiles::new("pv");
        let mut p = publisher(&files, &xs, Default::default());
        let cfg = config(XenPublish::Always, key);
        let k = key.unwrap_or("data/NotUpgradable");
        p.tick(&cfg);
        assert_eq!(xs.get(k), None);
        std::fs::write(files.flag(), "").unwrap();
        xs.clear_log();
        p.tick(&cfg);
        assert_eq!(xs.get(k).as_deref(), Some("1"), "{k} must appear with the file");
        assert!(xs.mutations().iter().any(|r| r.path.ends_with("/data/updated")));
        p.tick(&cfg);
        assert_eq!(xs.get(k).as_deref(), Some("1"));
        std::fs::remove_file(files.flag()).unwrap();
        p.tick(&cfg);
        assert_eq!(xs.get(k), None, "{k} must go with the file");
    }

    // A flag left behind by an earlier run is removed on start when the file is gone.
    let (_d, xs) = serve("pv");
    xs.set("data/NotUpgradable", "1");
    let files = GuestFiles::new("pv");
    publisher(&files, &xs, Default::default()).tick(&config(XenPublish::Always, None));
    assert_eq!(xs.get("data/NotUpgradable"), None);
}

#[test]
fn publisher_without_xenstore_reports_it() {
    let files = GuestFiles::new("pv");
    let mut p = Publisher::with_paths(files.paths())
        .with_connector(|| Client::connect_socket(Path::new("/nonexistent/xs.sock")));
    assert_eq!(p.tick(&config(XenPublish::Always, None)), Status::NoXenstore);
}

/// What a hostile server sends after reading one request.
#[derive(Clone, Copy, Debug)]
enum Hostile {
    TruncatedHeaderThenHang,
    TruncatedHeaderThenClose,
    OversizedLength,
    WrongRequestId,
    UnknownType,
    WrongType,
    ShortPayloadThenHang,
    Silence,
    Garbage,
}

fn header(ty: u32, req: u32, len: u32) -> Vec<u8> {
    [ty, req, 0, len].iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A server that answers every request with `how`.
fn hostile_server(how: Hostile) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("hostile.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { return };
            std::thread::spawn(move || loop {
                let mut h = [0u8; 16];
                if s.read_exact(&mut h).is_err() {
                    return;
                }
                let req = u32::from_le_bytes(h[4..8].try_into().unwrap());
                let len = u32::from_le_bytes(h[12..16].try_into().unwrap()) as usize;
                let mut body = vec![0; len];
                if s.read_exact(&mut body).is_err() {
                    return;
                }
                let ty = u32::from_le_bytes(h[0..4].try_into().unwrap());
                let reply = match how {
                    Hostile::TruncatedHeaderThenHang | Hostile::TruncatedHeaderThenClose => {
                        header(ty, req, 4)[..7].to_vec()
                    }
                    Hostile::OversizedLength => header(ty, req, 1 << 20),
                    Hostile::WrongRequestId => [header(ty, req + 1000, 2), b"x\0".to_vec()].concat(),
                    Hostile::UnknownType => [header(999, req, 2), b"x\0".to_vec()].concat(),
                    Hostile::WrongType => [header(if ty == 11 { 2 } else { 11 }, req, 3), b"OK\0".to_vec()].concat(),
                    Hostile::ShortPayloadThenHang => [header(ty, req, 100), b"short".to_vec()].concat(),
                    Hostile::Silence => Vec::new(),
                    Hostile::Garbage => vec![0xff; 64 * 1024],
                };
                let _ = s.write_all(&reply);
                if matches!(how, Hostile::TruncatedHeaderThenClose) {
                    return;
                }
                std::thread::sleep(Duration::from_secs(10));
            });
        }
    });
    (dir, sock)
}

#[test]
fn hostile_replies_are_errors_never_hangs() {
    use Hostile::*;
    let cases = [
        TruncatedHeaderThenHang,
        TruncatedHeaderThenClose,
        OversizedLength,
        WrongRequestId,
        UnknownType,
        WrongType,
        ShortPayloadThenHang,
        Silence,
        Garbage,
    ];
    let handles: Vec<_> = cases
        .into_iter()
        .map(|how| {
            std::thread::spawn(move || {
                let (_d, sock) = hostile_server(how);
                let mut c = Client::connect_socket(&sock).unwrap().with_timeout(TIMEOUT);
                let t = Instant::now();
                let e = c.read("vm").expect_err("a hostile reply must be an error");
                let took = t.elapsed();
                assert!(took < TIMEOUT + Duration::from_secs(1), "{how:?} took {took:?}");
                let ok = match how {
                    TruncatedHeaderThenHang | ShortPayloadThenHang | Silence => matches!(e, XsError::Timeout { .. }),
                    TruncatedHeaderThenClose => matches!(e, XsError::Closed { .. }),
                    OversizedLength | WrongRequestId | UnknownType | WrongType | Garbage => {
                        matches!(e, XsError::Protocol { .. })
                    }
                };
                assert!(ok, "{how:?} gave {e:?}");
                // The connection is out of step now: refused at once, no second
                // wait. With a 30 s timeout a second wait would show as 30 s;
                // 10 s is far above what a loaded machine needs for no wait.
                let mut c = c.with_timeout(Duration::from_secs(30));
                let t = Instant::now();
                assert!(matches!(c.write("data/x", "1").unwrap_err(), XsError::Broken { .. }), "{how:?}");
                assert!(t.elapsed() < Duration::from_secs(10), "{how:?}: a second wait of {:?}", t.elapsed());

                // The higher layers give errors too, within one timeout each.
                let t = Instant::now();
                let id = xcp_vm_agent::xen::identity::xenstore_identity_with(
                    &mut Client::connect_socket(&sock).unwrap().with_timeout(TIMEOUT),
                );
                assert!(id.vm_uuid.is_none() && id.error.is_some(), "{how:?}: {id:?}");
                assert!(t.elapsed() < TIMEOUT + Duration::from_secs(1), "{how:?} identity took {:?}", t.elapsed());
                let files = GuestFiles::new("pv");
                let s2 = sock.clone();
                let mut p = Publisher::with_paths(files.paths())
                    .with_connector(move || Client::connect_socket(&s2).map(|c| c.with_timeout(TIMEOUT)))
                    .with_network(Vec::new);
                let t = Instant::now();
                let st = p.tick(&config(XenPublish::Always, None));
                assert!(matches!(st, Status::Failed(_)), "{how:?}: {st}");
                assert!(t.elapsed() < TIMEOUT + Duration::from_secs(1), "{how:?} publish took {:?}", t.elapsed());
                let mut listing = Client::connect_socket(&sock).unwrap().with_timeout(TIMEOUT);
                assert!(vbd::list_vbds_in(&mut listing, Path::new("/nonexistent"), Path::new("/dev")).is_err());
            })
        })
        .collect();
    for h in handles {
        h.join().expect("no panic and no hang on a hostile reply");
    }
}

/// A fake /sys/block entry for `name` saying it is `device/vbd/<number>`,
/// with `size` 512-byte sectors and device number `dev`.
fn fake_block(sys: &Path, name: &str, number: u32, sectors: u64, dev: &str) {
    let b = sys.join("block").join(name);
    std::fs::create_dir_all(b.join("device")).unwrap();
    std::fs::write(b.join("device/nodename"), format!("device/vbd/{number}\n")).unwrap();
    std::fs::write(b.join("size"), format!("{sectors}\n")).unwrap();
    std::fs::write(b.join("dev"), format!("{dev}\n")).unwrap();
}

/// Some real block device on this machine: (name, sectors, "maj:min").
fn real_block_device() -> Option<(String, u64, String)> {
    use std::os::unix::fs::FileTypeExt;
    let mut names: Vec<_> = std::fs::read_dir("/sys/block").ok()?.flatten().map(|e| e.file_name()).collect();
    names.sort();
    names.into_iter().find_map(|n| {
        let n = n.to_string_lossy().into_owned();
        let meta = std::fs::metadata(Path::new("/dev").join(&n)).ok()?;
        if !meta.file_type().is_block_device() {
            return None;
        }
        let size = read_file(Path::new("/sys/block").join(&n).join("size"))?.parse().ok()?;
        let dev = read_file(Path::new("/sys/block").join(&n).join("dev"))?;
        Some((n, size, dev))
    })
}

#[test]
fn vbds_are_listed_with_backend_and_guest_sizes() {
    let (_d, xs) = serve("pv");
    let sys = tempfile::tempdir().unwrap();
    fake_block(sys.path(), "xvda", 51712, 20971520, "202:0");
    fake_block(sys.path(), "xvdb", 51728, 2097152, "202:16");
    let list = vbd::list_vbds_in(&mut client(&xs), sys.path(), Path::new("/dev")).unwrap();
    assert_eq!(list.len(), 2, "{list:?}");
    let b = &list[1];
    assert_eq!(b.number, 51728);
    assert_eq!(b.expected_name.as_deref(), Some("xvdb"));
    assert_eq!(b.backend_dev.as_deref(), Some("xvdb"));
    assert_eq!(b.size_bytes, Some(2097152 * 512));
    assert_eq!(b.guest_size_bytes, Some(2097152 * 512));
    assert_eq!(b.device.as_deref(), Some(Path::new("/dev/xvdb")));
    assert_eq!(b.sector_size, Some(512));
    assert_eq!(list[0].params, None, "the denied params key is left out, not an error");
    let json = serde_json::to_value(&list).unwrap();
    assert_eq!(json[0]["number"], 51712);

    // HVM: tapdisk backend (vbd3), and a CD drive.
    let (_d, xs) = serve("hvm");
    let list = vbd::list_vbds_in(&mut client(&xs), Path::new("/nonexistent"), Path::new("/dev")).unwrap();
    let numbers: Vec<u32> = list.iter().map(|v| v.number).collect();
    assert_eq!(numbers, vec![768, 832, 5632]);
    assert_eq!(list[2].device_type.as_deref(), Some("cdrom"));
    assert_eq!(list[0].size_bytes, Some(41943040 * 512));
}

#[test]
fn vbd_resolution_checks_device_and_size() {
    let (_d, xs) = serve("pv");
    let sys = tempfile::tempdir().unwrap();
    let err =
        |n: u32, sys: &Path| vbd::resolve_vbd_in(&mut client(&xs), sys, Path::new("/dev"), n).unwrap_err().to_string();
    let e = err(51744, sys.path());
    assert!(e.contains("does not exist") && e.contains("51712, 51728"), "{e}");
    let e = err(51728, sys.path());
    assert!(e.contains("no block device"), "{e}");
    fake_block(sys.path(), "xvdb", 51728, 2097152 / 2, "202:16");
    let e = err(51728, sys.path());
    assert!(e.contains("does not match") && e.contains(&(2097152u64 * 512).to_string()), "{e}");

    // The success path needs a real block device node: borrow one of this
    // machine's, telling the fake sysfs that it is VBD 51728.
    let Some((name, sectors, dev)) = real_block_device() else {
        panic!("no block device with a /dev node on this machine to resolve to");
    };
    let sys = tempfile::tempdir().unwrap();
    fake_block(sys.path(), &name, 51728, sectors, &dev);
    xs.set("/local/domain/0/backend/vbd/7/51728/sectors", &sectors.to_string());
    let got = vbd::resolve_vbd_in(&mut client(&xs), sys.path(), Path::new("/dev"), 51728).unwrap();
    assert_eq!(got, Path::new("/dev").join(&name));
    // The node must be the device sysfs describes.
    fake_block(sys.path(), &name, 51728, sectors, "1:12345");
    let e = err(51728, sys.path());
    assert!(e.contains("sysfs says"), "{e}");

    let (_d2, hvm) = serve("hvm");
    let e = vbd::resolve_vbd_in(&mut client(&hvm), sys.path(), Path::new("/dev"), 5632).unwrap_err().to_string();
    assert!(e.contains("CD-ROM"), "{e}");
}

/// Root tier: a VBD-addressed target resolved to a real loop device whose
/// size matches the backend.
#[test]
#[ignore = "root tier: needs root and loop devices (cargo xtask test runs it with --ignored)"]
fn vbd_resolution_to_a_loop_device() {
    vm_tests::tier::require_root();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(64 << 20).unwrap();
    let (rc, loopdev, _) = run(Command::new("losetup").args(["--find", "--show"]).arg(&img));
    assert_eq!(rc, 0);
    let loopdev = loopdev.trim().to_string();
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("losetup").args(["-d", &self.0]).status();
        }
    }
    let _detach = Detach(loopdev.clone());
    let name = loopdev.trim_start_matches("/dev/").to_string();
    let dev = read_file(Path::new("/sys/block").join(&name).join("dev")).unwrap();
    let sectors: u64 = read_file(Path::new("/sys/block").join(&name).join("size")).unwrap().parse().unwrap();
    assert_eq!(sectors, (64 << 20) / 512);

    let (_d, xs) = serve("pv");
    xs.set("/local/domain/0/backend/vbd/7/51728/sectors", &sectors.to_string());
    let sys = tempfile::tempdir().unwrap();
    fake_block(sys.path(), &name, 51728, sectors, &dev);
    let got = vbd::resolve_vbd_in(&mut client(&xs), sys.path(), Path::new("/dev"), 51728).unwrap();
    assert_eq!(got, PathBuf::from(&loopdev));
    // The backend grows but the guest has not seen it: refused.
    xs.set("/local/domain/0/backend/vbd/7/51728/sectors", &(sectors * 2).to_string());
    let e = vbd::resolve_vbd_in(&mut client(&xs), sys.path(), Path::new("/dev"), 51728).unwrap_err();
    assert!(e.to_string().contains("does not match"), "{e}");
}
