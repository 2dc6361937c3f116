//! Disk-operation overhead for `cargo xtask bench`: wall time of the agent's
//! ExtendPartition and InitializeDisk on a 1 GiB loop device, each divided
//! by the time of the same tool commands run by hand in a row (target
//! ≤ 1.10). Needs root. Median of `RUNS` runs each.
//! Keys: `extend_overhead_ratio`, `initialize_overhead_ratio`.
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const RUNS: usize = 7;

fn sh(prog: &str, args: &[&str]) -> Result<String> {
    let o = Command::new(prog).args(args).env("LC_ALL", "C").output().with_context(|| format!("cannot run {prog}"))?;
    if !o.status.success() {
        bail!("`{prog} {}` failed: {}", args.join(" "), String::from_utf8_lossy(&o.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn timed(f: impl FnOnce() -> Result<()>) -> Result<Duration> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed())
}

/// A loop device over a sparse file in `dir`, detached on drop.
struct Loop {
    dev: String,
    file: PathBuf,
}

impl Loop {
    fn new(dir: &Path, mib: u64) -> Result<Loop> {
        let file = dir.join("bench.img");
        let _ = std::fs::remove_file(&file);
        sh("truncate", &["-s", &format!("{mib}M"), file.to_str().unwrap()])?;
        let dev = sh("losetup", &["--find", "--show", "--partscan", file.to_str().unwrap()])?.trim().to_string();
        Ok(Loop { dev, file })
    }
    fn part1(&self) -> String {
        format!("{}p1", self.dev)
    }
    fn wait_part(&self) -> Result<()> {
        let t = Instant::now();
        while !Path::new(&self.part1()).exists() {
            if t.elapsed() > Duration::from_secs(10) {
                bail!("{} did not appear", self.part1());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }
    /// A 512 MiB ext4 partition on a disk then grown to 1 GiB.
    fn grown_ext4(dir: &Path) -> Result<Loop> {
        let l = Loop::new(dir, 512 + 2)?;
        sh("sgdisk", &["--new=1:2048:+512M", &l.dev])?;
        sh("partx", &["--update", &l.dev])?;
        l.wait_part()?;
        sh("mkfs.ext4", &["-q", "-F", &l.part1()])?;
        sh("truncate", &["-s", "1G", l.file.to_str().unwrap()])?;
        sh("losetup", &["-c", &l.dev])?;
        sh("blockdev", &["--getsize64", &l.dev])?;
        sh("partx", &["--update", &l.dev])?;
        l.wait_part()?;
        l.settle()?;
        Ok(l)
    }
    /// Write back everything the setup left dirty, so the first fsync of
    /// the timed commands (growpart's sfdisk, mkfs) does not pay for it.
    fn settle(&self) -> Result<()> {
        sh("sync", &[])?;
        Ok(())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.part1()).output();
        let _ = Command::new("losetup").args(["-d", &self.dev]).output();
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn agent_exec(agent: &Path, dir: &Path, op: &str, params: serde_json::Value) -> Result<()> {
    let job = dir.join("job.json");
    std::fs::write(&job, serde_json::json!({"id": "bench", "operation": op, "params": params}).to_string())?;
    let cfg = dir.join("config.json");
    std::fs::write(
        &cfg,
        serde_json::json!({"state_dir": dir.join("state"), "fstab_path": dir.join("fstab")}).to_string(),
    )?;
    let o = Command::new(agent)
        .args(["--config", cfg.to_str().unwrap(), "exec", "--job", job.to_str().unwrap(), "--fstab"])
        .arg(dir.join("fstab"))
        .output()?;
    if !o.status.success() {
        bail!("agent {op} failed: {}", String::from_utf8_lossy(&o.stdout));
    }
    Ok(())
}

/// (extend_overhead_ratio, initialize_overhead_ratio) for the agent binary
/// `agent`, using scratch space in `dir`.
pub fn measure(agent: &Path, dir: &Path) -> Result<(f64, f64)> {
    std::fs::create_dir_all(dir.join("state"))?;
    let mut ext_agent = Vec::new();
    let mut ext_hand = Vec::new();
    let mut init_agent = Vec::new();
    let mut init_hand = Vec::new();
    for run in 0..RUNS {
        // Alternate who goes first, so a drift in the machine's load does
        // not always land on the same side.
        let order = if run % 2 == 0 { [false, true] } else { [true, false] };
        for hand in order {
            let l = Loop::grown_ext4(dir)?;
            if hand {
                // What an administrator types for an unmounted ext4:
                // growpart (which tells the kernel itself), then the check
                // resize2fs insists on, then resize2fs.
                ext_hand.push(timed(|| {
                    sh("growpart", &[&l.dev, "1"])?;
                    Command::new("e2fsck").args(["-f", "-p", &l.part1()]).output()?;
                    sh("resize2fs", &[&l.part1()])?;
                    Ok(())
                })?);
            } else {
                ext_agent.push(timed(|| {
                    agent_exec(agent, dir, "ExtendPartition", serde_json::json!({"device": l.part1()}))
                })?);
            }
            drop(l);
        }

        let mp = dir.join("mnt");
        let fstab = dir.join("fstab");
        let order = if run % 2 == 0 { [false, true] } else { [true, false] };
        for hand in order {
            std::fs::write(&fstab, "")?;
            let _ = std::fs::remove_dir(&mp);
            let l = Loop::new(dir, 1024)?;
            l.settle()?;
            let t = if hand {
                timed(|| {
                    sh("sgdisk", &["--clear", "--new=1:2048:0", "--typecode=1:8300", &l.dev])?;
                    sh("partx", &["--update", &l.dev])?;
                    l.wait_part()?;
                    sh("mkfs.ext4", &["-F", "-q", &l.part1()])?;
                    let uuid = sh("blkid", &["-p", "-o", "value", "-s", "UUID", &l.part1()])?;
                    std::fs::create_dir_all(&mp)?;
                    std::fs::write(
                        &fstab,
                        format!("UUID={} {} ext4 defaults,nofail 0 2\n", uuid.trim(), mp.display()),
                    )?;
                    sh("mount", &["--fstab", fstab.to_str().unwrap(), mp.to_str().unwrap()])?;
                    Ok(())
                })?
            } else {
                timed(|| {
                    agent_exec(agent, dir, "InitializeDisk", serde_json::json!({"device": l.dev, "mount_point": mp}))
                })?
            };
            if hand {
                init_hand.push(t)
            } else {
                init_agent.push(t)
            }
            drop(l);
        }
    }
    let ms = |v: &[Duration]| median(v.to_vec()).as_millis();
    eprintln!(
        "    medians: ExtendPartition {} ms, by hand {} ms; InitializeDisk {} ms, by hand {} ms",
        ms(&ext_agent),
        ms(&ext_hand),
        ms(&init_agent),
        ms(&init_hand)
    );
    let r = |a: Vec<Duration>, h: Vec<Duration>| median(a).as_secs_f64() / median(h).as_secs_f64();
    Ok((r(ext_agent, ext_hand), r(init_agent, init_hand)))
}
