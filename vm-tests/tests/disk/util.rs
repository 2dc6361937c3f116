//! Helpers for the root-only loop-device tier: the gate, loop devices with
//! cleanup in Drop, and running the real agent binary (built once with the
//! `failpoints` feature into `target/failpoints`; without
//! `XCP_AGENT_FAILPOINT` it behaves exactly like a release build).
#![allow(dead_code)]
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub use vm_tests::tier::require_root;

/// Run a command, panicking with its output when it fails.
pub fn sh(prog: &str, args: &[&str]) -> String {
    let o = Command::new(prog).args(args).env("LC_ALL", "C").output().unwrap_or_else(|e| panic!("{prog}: {e}"));
    if !o.status.success() {
        panic!(
            "`{prog} {}` failed ({}):\nstdout: {}\nstderr: {}",
            args.join(" "),
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Run a shell snippet (test set-up only).
pub fn bash(script: &str) -> String {
    sh("bash", &["-euo", "pipefail", "-c", script])
}

pub fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Whether a running xcp-vm-agent process has `dev` open (it opens the
/// disk's node to take its lock).
pub fn agent_has_open(dev: &str) -> bool {
    let Ok(procs) = std::fs::read_dir("/proc") else { return false };
    procs.flatten().filter(|p| p.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit())).any(|p| {
        let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
        comm.trim() == "xcp-vm-agent"
            && std::fs::read_dir(p.path().join("fd"))
                .map(|fds| fds.flatten().any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == Path::new(dev))))
                .unwrap_or(false)
    })
}

/// A loop device over a sparse file, detached (with every mount of it and
/// every VG registered on it removed) on drop.
pub struct Loop {
    pub dev: String,
    pub name: String,
    pub file: PathBuf,
    pub dir: tempfile::TempDir,
    pub vgs: std::cell::RefCell<Vec<String>>,
}

impl Loop {
    pub fn new(size_mib: u64, sector: u32) -> Loop {
        let dir = tempfile::Builder::new().prefix("xcp-disk-").tempdir().unwrap();
        let file = dir.path().join("disk.img");
        sh("truncate", &["-s", &format!("{size_mib}M"), file.to_str().unwrap()]);
        let b = sector.to_string();
        let dev =
            sh("losetup", &["--find", "--show", "--partscan", "-b", &b, file.to_str().unwrap()]).trim().to_string();
        let name = dev.trim_start_matches("/dev/").to_string();
        // The kernel keeps a `blockdev --setro` across detach and reattach:
        // a loop device left read-only by an earlier run would turn every
        // later test on it into a "read-only" refusal.
        if std::fs::read_to_string(format!("/sys/block/{name}/ro")).map(|s| s.trim() == "1").unwrap_or(false) {
            sh("blockdev", &["--setrw", &dev]);
        }
        Loop { dev, name, file, dir, vgs: Default::default() }
    }

    /// Write a partition table with sfdisk (`label` gpt or dos) and make
    /// the kernel know the partitions (BLKPG: this kernel may lack table
    /// parsers).
    pub fn partition(&self, label: &str, script: &str) {
        bash(&format!("printf '%s\\n' {} | sfdisk -q -X {label} {}", shell_words(script), self.dev));
        sh("partx", &["--update", &self.dev]);
        let n = script.lines().filter(|l| !l.trim().is_empty()).count();
        for i in 1..=n as u32 {
            wait_for("partition node", || self.part_opt(i).map(|p| Path::new(&p).exists()).unwrap_or(false));
        }
    }

    /// Node of partition `n`, found through sysfs.
    pub fn part_opt(&self, n: u32) -> Option<String> {
        let dir = format!("/sys/class/block/{}", self.name);
        for e in std::fs::read_dir(&dir).ok()?.flatten() {
            if let Ok(s) = std::fs::read_to_string(e.path().join("partition")) {
                if s.trim() == n.to_string() {
                    return Some(format!("/dev/{}", e.file_name().to_string_lossy()));
                }
            }
        }
        None
    }

    pub fn part(&self, n: u32) -> String {
        self.part_opt(n).unwrap_or_else(|| panic!("{} has no partition {n}", self.dev))
    }

    /// Grow the backing file and tell the loop driver.
    pub fn grow(&self, size_mib: u64) {
        sh("truncate", &["-s", &format!("{size_mib}M"), self.file.to_str().unwrap()]);
        sh("losetup", &["-c", &self.dev]);
        // The next open after a capacity change rescans the table. This
        // kernel has no table parsers, so the rescan drops every partition
        // that is not in use; a normal kernel re-adds them from the table.
        // Do what a normal kernel does, so tests see a realistic state.
        sh("blockdev", &["--getsize64", &self.dev]);
        sh("partx", &["--update", &self.dev]);
    }

    pub fn sha(&self) -> String {
        sh("sha256sum", &[&self.dev]).split_whitespace().next().unwrap().to_string()
    }

    pub fn size_of(dev: &str) -> u64 {
        sh("blockdev", &["--getsize64", dev]).trim().parse().unwrap()
    }

    pub fn mount(&self, dev: &str, name: &str) -> PathBuf {
        let mp = self.dir.path().join(name);
        std::fs::create_dir_all(&mp).unwrap();
        sh("mount", &[dev, mp.to_str().unwrap()]);
        mp
    }
}

fn shell_words(script: &str) -> String {
    script.lines().map(|l| format!("'{}'", l.replace('\'', "'\\''"))).collect::<Vec<_>>().join(" ")
}

/// Mount points (deepest first) whose source is this loop device or one of
/// its partitions.
pub fn mounts_of(dev: &str) -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut v: Vec<String> = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let src = f.first()?;
            let ok = *src == dev || src.strip_prefix(dev).map(|r| r.starts_with('p')).unwrap_or(false);
            ok.then(|| f[1].replace("\\040", " "))
        })
        .collect();
    v.sort_by_key(|m| std::cmp::Reverse(m.len()));
    v
}

impl Drop for Loop {
    fn drop(&mut self) {
        for m in mounts_of(&self.dev) {
            let _ = Command::new("umount").arg(&m).status();
        }
        for vg in self.vgs.borrow().iter() {
            let _ = Command::new("vgremove").args(["-f", "-y", vg]).output();
        }
        // Undo a --setro (the kernel would keep it for the next user).
        let _ = Command::new("blockdev").args(["--setrw", &self.dev]).status();
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The agent binary with failpoints compiled in, built once.
pub fn agent_bin() -> &'static PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let td = workspace().join("target/failpoints");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .args(["build", "-q", "-p", "xcp-vm-agent", "--features", "failpoints,guest", "--target-dir"])
            .arg(&td)
            .current_dir(workspace())
            .status()
            .expect("cargo build");
        assert!(st.success(), "building the agent with --features failpoints failed");
        td.join("debug/xcp-vm-agent")
    })
}

/// One agent installation: its own state dir, config and fstab.
pub struct Agent {
    pub dir: tempfile::TempDir,
    pub fstab: PathBuf,
    pub config: PathBuf,
}

/// What one `exec` gave back.
#[derive(Debug)]
pub struct Outcome {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub result: Value,
    pub cmdline: String,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    pub fn status(&self) -> &str {
        self.result["status"].as_str().unwrap_or("")
    }
    pub fn message(&self) -> &str {
        self.result["message"].as_str().unwrap_or("")
    }
    pub fn expect(&self, status: &str) -> &Self {
        assert_eq!(self.status(), status, "{self}");
        self
    }
    pub fn expect_message(&self, needle: &str) -> &Self {
        assert!(self.message().contains(needle), "message lacks {needle:?}: {self}");
        self
    }
    pub fn detail_u64(&self, k: &str) -> u64 {
        self.result["details"][k].as_u64().unwrap_or_else(|| panic!("no {k} in details: {self}"))
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "\ncommand: {}\nexit: {:?} signal: {:?}\nstdout:\n{}\nstderr:\n{}",
            self.cmdline, self.code, self.signal, self.stdout, self.stderr
        )
    }
}

pub const FSTAB_HEAD: &str = "# test fstab: every line here must survive byte for byte\nproc /proc proc defaults 0 0\n\n#  odd   spacing comment\n";

impl Agent {
    pub fn new() -> Agent {
        let dir = tempfile::Builder::new().prefix("xcp-agent-").tempdir().unwrap();
        let fstab = dir.path().join("fstab");
        std::fs::write(&fstab, FSTAB_HEAD).unwrap();
        let config = dir.path().join("config.json");
        let state = dir.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        let cfg = serde_json::json!({"state_dir": state, "fstab_path": fstab});
        std::fs::write(&config, cfg.to_string()).unwrap();
        Agent { dir, fstab, config }
    }

    pub fn exec_with(&self, op: &str, params: Value, dry_run: bool, failpoint: Option<&str>) -> Outcome {
        self.exec_full(op, params, dry_run, failpoint, None)
    }

    /// [`Agent::exec_with`], with `path_first` put first on the agent's PATH
    /// (stand-ins for tools the host lacks).
    pub fn exec_full(
        &self,
        op: &str,
        params: Value,
        dry_run: bool,
        failpoint: Option<&str>,
        path_first: Option<&Path>,
    ) -> Outcome {
        let job = self.dir.path().join("job.json");
        let j = serde_json::json!({"id": format!("t-{op}"), "operation": op, "params": params});
        std::fs::write(&job, j.to_string()).unwrap();
        let mut c = Command::new(agent_bin());
        c.arg("--config").arg(&self.config).args(["exec", "--job"]).arg(&job).arg("--fstab").arg(&self.fstab);
        if dry_run {
            c.arg("--dry-run");
        }
        c.env_remove("XCP_AGENT_FAILPOINT");
        if let Some(dir) = path_first {
            let mut p = std::ffi::OsString::from(dir);
            p.push(":");
            p.push(std::env::var_os("PATH").unwrap_or_default());
            c.env("PATH", p);
        }
        if let Some(fp) = failpoint {
            c.env("XCP_AGENT_FAILPOINT", fp);
        }
        let cmdline = format!("{:?} (job {j}){}", c, failpoint.map(|f| format!(" failpoint {f}")).unwrap_or_default());
        let o = c.output().unwrap();
        use std::os::unix::process::ExitStatusExt;
        let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
        Outcome {
            code: o.status.code(),
            signal: o.status.signal(),
            result: serde_json::from_str(&stdout).unwrap_or(Value::Null),
            cmdline,
            stdout,
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    pub fn exec(&self, op: &str, params: Value) -> Outcome {
        self.exec_with(op, params, false, None)
    }

    pub fn fstab_text(&self) -> String {
        std::fs::read_to_string(&self.fstab).unwrap()
    }

    /// fstab passes `findmnt --verify` and still starts with the original lines.
    pub fn check_fstab(&self) {
        let t = self.fstab_text();
        assert!(t.starts_with(FSTAB_HEAD), "fstab lost its original lines:\n{t}");
        let o = Command::new("findmnt").args(["--verify", "--tab-file"]).arg(&self.fstab).output().unwrap();
        assert!(o.status.success(), "findmnt --verify fails on\n{t}\n{}", String::from_utf8_lossy(&o.stdout));
    }
}

/// Write a few files with known content under `dir`; returns their hashes.
pub fn write_files(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut v = Vec::new();
    for i in 0..3 {
        let p = dir.join(format!("file{i}.bin"));
        bash(&format!("head -c {} /dev/urandom > '{}' && sync", 1_000_000 * (i + 1), p.display()));
        v.push((p.clone(), sh("sha256sum", &[p.to_str().unwrap()]).split_whitespace().next().unwrap().into()));
    }
    v
}

pub fn check_files(files: &[(PathBuf, String)]) {
    for (p, h) in files {
        let now = sh("sha256sum", &[p.to_str().unwrap()]);
        assert_eq!(now.split_whitespace().next().unwrap(), h, "{} changed", p.display());
    }
}

/// Whether this process may resize a mounted ext4 (the kernel asks for
/// CAP_SYS_RESOURCE; some containers drop it).
pub fn can_resize_ext_online() -> bool {
    let st = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = st.lines().find_map(|l| l.strip_prefix("CapEff:")).map(str::trim).unwrap_or("0");
    u64::from_str_radix(eff, 16).map(|c| c & (1 << 24) != 0).unwrap_or(false)
}
