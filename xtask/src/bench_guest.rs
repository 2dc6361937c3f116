//! Side by side with qemu-guest-agent (Debian's `qemu-ga`) for `cargo xtask
//! bench`, in the same run: idle resident memory of `qemu-ga` on a unix
//! socket (`qemu_ga_idle_rss_kib`, next to our `idle_rss_kib`), and, as root,
//! freeze-to-thaw latency on the same loop-mounted ext4 filesystem:
//! ours `xcp-vm-agent exec` FreezeFilesystems then ThawFilesystems
//! (`freeze_thaw_ms`, process start included), qemu-ga's
//! `guest-fsfreeze-freeze-list` then `guest-fsfreeze-thaw` over its socket
//! (`qemu_ga_freeze_thaw_ms`). Median of `RUNS`, alternating who goes first.
//! Only the bench's own mount point is ever named: a bare
//! `guest-fsfreeze-freeze` would freeze the whole machine.
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const RUNS: usize = 7;

fn sh(prog: &str, args: &[&str]) -> Result<String> {
    let o = Command::new(prog).args(args).env("LC_ALL", "C").output().with_context(|| format!("cannot run {prog}"))?;
    if !o.status.success() {
        bail!("`{prog} {}` failed: {}", args.join(" "), String::from_utf8_lossy(&o.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// `qemu-ga` on a unix socket, killed on drop.
struct QemuGa {
    child: Child,
    conn: BufReader<UnixStream>,
}

impl QemuGa {
    fn start(dir: &Path) -> Result<QemuGa> {
        let bin = ["/usr/sbin/qemu-ga", "/usr/bin/qemu-ga"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .context("qemu-ga is not installed (package qemu-guest-agent; cargo xtask setup installs it)")?;
        let sock = dir.join("qga.sock");
        let state = dir.join("qga-state");
        std::fs::create_dir_all(&state)?;
        let _ = std::fs::remove_file(&sock);
        let child = Command::new(bin)
            .args(["-m", "unix-listen", "-p"])
            .arg(&sock)
            .arg("-t")
            .arg(&state)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {bin}"))?;
        let t = Instant::now();
        let stream = loop {
            if let Ok(s) = UnixStream::connect(&sock) {
                break s;
            }
            if t.elapsed() > Duration::from_secs(20) {
                bail!("qemu-ga did not open {}", sock.display());
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut q = QemuGa { child, conn: BufReader::new(stream) };
        q.call(json!({"execute": "guest-ping"}))?;
        Ok(q)
    }

    fn call(&mut self, cmd: Value) -> Result<Value> {
        let mut s = self.conn.get_ref();
        s.write_all(format!("{cmd}\n").as_bytes())?;
        let mut line = String::new();
        self.conn.read_line(&mut line).context("reading qemu-ga's answer")?;
        let v: Value = serde_json::from_str(line.trim()).with_context(|| format!("qemu-ga answered {line:?}"))?;
        if v.get("error").is_some() {
            bail!("qemu-ga: {cmd} -> {v}");
        }
        Ok(v)
    }
}

impl Drop for QemuGa {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// The agent with the `guest` feature (a default feature; named so the
/// measurement keeps it), release profile, its own target dir.
fn guest_binary() -> Result<PathBuf> {
    let td = crate::util::root().join("target/bench-guest");
    crate::util::run(
        crate::util::cargo()
            .args(["build", "--release", "-q", "-p", "xcp-vm-agent", "--features", "guest", "--target-dir"])
            .arg(&td),
    )?;
    Ok(td.join("release/xcp-vm-agent"))
}

/// Adds `qemu_ga_idle_rss_kib` and (as root) `freeze_thaw_ms`,
/// `qemu_ga_freeze_thaw_ms` to `results`.
pub fn measure(dir: &Path, results: &mut serde_json::Map<String, Value>) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut qga = QemuGa::start(dir)?;
    std::thread::sleep(Duration::from_secs(2));
    let rss = super::bench::rss_kib(qga.child.id());
    results.insert("qemu_ga_idle_rss_kib".into(), json!(rss));
    eprintln!("    qemu-ga idle RSS {rss} KiB");
    if !crate::util::is_root() {
        eprintln!("    not root: freeze-to-thaw latencies need a loop device and are left out");
        return Ok(());
    }
    let bin = &guest_binary()?;
    let img = dir.join("freeze.img");
    sh("truncate", &["-s", "256M", img.to_str().unwrap()])?;
    let dev = sh("losetup", &["--find", "--show", img.to_str().unwrap()])?.trim().to_string();
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt)?;
    struct Cleanup(String, PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.1).status();
            let _ = Command::new("losetup").args(["-d", &self.0]).status();
        }
    }
    let _c = Cleanup(dev.clone(), mnt.clone());
    sh("mkfs.ext4", &["-q", "-F", &dev])?;
    sh("mount", &[&dev, mnt.to_str().unwrap()])?;
    let mnt_s = mnt.to_str().unwrap().to_string();

    let cfg = dir.join("agent.json");
    std::fs::write(&cfg, json!({"state_dir": dir.join("agent-state")}).to_string())?;
    let run_dir = dir.join("agent-run");
    let exec = |op: &str, params: Value| -> Result<()> {
        let job = dir.join(format!("{op}.json"));
        std::fs::write(&job, json!({"id": op, "operation": op, "params": params}).to_string())?;
        let o = Command::new(bin)
            .arg("--config")
            .arg(&cfg)
            .args(["exec", "--job"])
            .arg(&job)
            .env("XCP_AGENT_RUN_DIR", &run_dir)
            .output()?;
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        if v["status"] != "succeeded" {
            bail!("{op}: {}", String::from_utf8_lossy(&o.stdout));
        }
        Ok(())
    };
    let ours = |_: ()| -> Result<f64> {
        // Dirty some data first, as before a real snapshot.
        std::fs::write(mnt.join("data"), vec![7u8; 1 << 20])?;
        let t = Instant::now();
        exec("FreezeFilesystems", json!({"mount_points": [mnt_s], "thaw_after_seconds": 60}))?;
        exec("ThawFilesystems", json!({}))?;
        Ok(t.elapsed().as_secs_f64() * 1000.0)
    };
    let mut theirs = |_: ()| -> Result<f64> {
        std::fs::write(mnt.join("data"), vec![7u8; 1 << 20])?;
        let t = Instant::now();
        let r = qga.call(json!({"execute": "guest-fsfreeze-freeze-list", "arguments": {"mountpoints": [mnt_s]}}));
        // Thaw whatever happened.
        let th = qga.call(json!({"execute": "guest-fsfreeze-thaw"}));
        let n = r?["return"].as_u64().unwrap_or(0);
        th?;
        if n != 1 {
            bail!("qemu-ga froze {n} filesystems, expected 1");
        }
        Ok(t.elapsed().as_secs_f64() * 1000.0)
    };
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for i in 0..RUNS {
        if i % 2 == 0 {
            a.push(ours(())?);
            b.push(theirs(())?);
        } else {
            b.push(theirs(())?);
            a.push(ours(())?);
        }
    }
    let (a, b) = (median(a), median(b));
    results.insert("freeze_thaw_ms".into(), json!((a * 10.0).round() / 10.0));
    results.insert("qemu_ga_freeze_thaw_ms".into(), json!((b * 10.0).round() / 10.0));
    eprintln!("    freeze-to-thaw: ours {a:.1} ms, qemu-ga {b:.1} ms (median of {RUNS})");
    Ok(())
}
