//! Takeover checks (part of the packaging tier, `pkgtest/mod.rs`): every artifact installed over the Python agent
//! 1.0.3's layout, laid by the stand-in
//! `vm-tests/fixtures/python-agent-1.0.3/install-agent.sh` into a Debian
//! chroot that has systemd (1.0.3 supports only systemd distributions).
//!
//! For `dpkg -i` (stdin closed), `apt-get install ./file.deb`,
//! `rpm --root --nodeps -i` and the tarball's `install.sh`: the install
//! succeeds with no input; config.json and the certificates are
//! byte-identical; the old log is kept (its old lines first) and holds the
//! one takeover line, which the installer also printed; nothing under
//! /etc/systemd/system still runs /opt/xcp-vm-agent; /opt/xcp-vm-agent and
//! the old unit are in /var/backups/xcp-vm-agent-1.0.3; the
//! multi-user.target.wants link points at our unit and `systemctl
//! is-enabled` says enabled; nothing was started in the chroot. Then the
//! uninstall leaves the service not enabled. The .apk's scripts run with sh
//! over the layout too (no apk-tools here). Last, a hand-written unit
//! (not 1.0.3's) is left byte-identical by each artifact, with a warning.
use super::{copy_in, fresh_chroot, in_chroot, processes_in};
use crate::util::root;
use anyhow::{bail, ensure, Context, Result};
use std::path::Path;
use std::process::{Command, Stdio};

const NAME: &str = crate::pkgmeta::NAME;
const BACKUP: &str = "var/backups/xcp-vm-agent-1.0.3";
const LINE: &str = "took over from the Python agent 1.0.3";
const FOREIGN: &str = "was not written by the Python agent 1.0.3";
/// Files 1.0.3 leaves in /etc/xcp-vm-agent that must come through unchanged.
const KEPT: &[&str] = &["config.json", "agent-cert.pem", "agent-key.pem", "ca-cert.pem"];

/// Lay the stand-in's layout into `dir` with its own installer.
pub fn lay_standin(dir: &Path) -> Result<()> {
    let script = root().join("vm-tests/fixtures/python-agent-1.0.3/install-agent.sh");
    let out = Command::new("sh")
        .arg(&script)
        .arg("--root")
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .context("cannot run the stand-in's install-agent.sh")?;
    ensure!(
        out.status.success(),
        "install-agent.sh --root {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

struct Before {
    kept: Vec<(String, Vec<u8>)>,
    log: Vec<u8>,
}

fn read_before(dir: &Path) -> Result<Before> {
    let mut kept = Vec::new();
    for f in KEPT {
        let p = dir.join(format!("etc/{NAME}/{f}"));
        kept.push((f.to_string(), std::fs::read(&p).with_context(|| format!("{}", p.display()))?));
    }
    Ok(Before { kept, log: std::fs::read(dir.join(format!("var/log/{NAME}/agent.log")))? })
}

/// Everything a takeover must leave; `unit_dir` is where the unit in force
/// lives (the packaged one, or /etc/systemd/system for the tarball).
fn check_taken_over(dir: &Path, before: &Before, installer_out: &str, unit: &str, what: &str) -> Result<()> {
    let ctx = || format!("{what}, installer output:\n{installer_out}");
    for (f, bytes) in &before.kept {
        let now = std::fs::read(dir.join(format!("etc/{NAME}/{f}"))).with_context(|| format!("{f} gone; {}", ctx()))?;
        ensure!(&now == bytes, "/etc/{NAME}/{f} changed; {}", ctx());
    }
    let log = std::fs::read(dir.join(format!("var/log/{NAME}/agent.log"))).with_context(ctx)?;
    ensure!(log.starts_with(&before.log), "the old agent.log was not kept; {}", ctx());
    let log = String::from_utf8_lossy(&log);
    ensure!(log.matches(LINE).count() == 1, "agent.log has not exactly one takeover line:\n{log}\n{}", ctx());
    ensure!(installer_out.matches(LINE).count() == 1, "the installer did not print one takeover line; {}", ctx());
    let sys = in_chroot(dir, "grep -Rl /opt/xcp-vm-agent /etc/systemd/system || true")?;
    ensure!(sys.trim().is_empty(), "/etc/systemd/system still runs /opt/xcp-vm-agent: {sys}; {}", ctx());
    ensure!(!dir.join("opt/xcp-vm-agent").exists(), "/opt/xcp-vm-agent is still there; {}", ctx());
    let b = dir.join(BACKUP);
    ensure!(
        b.join("opt-xcp-vm-agent/agent.py").is_file()
            && std::fs::read_to_string(b.join(format!("{NAME}.service")))?.contains("/opt/xcp-vm-agent")
            && b.join("README").is_file(),
        "the backup /{BACKUP} lacks the old unit, agent or README; {}",
        ctx()
    );
    let link = std::fs::read_link(dir.join(format!("etc/systemd/system/multi-user.target.wants/{NAME}.service")))
        .with_context(|| format!("no multi-user.target.wants link; {}", ctx()))?;
    // Debian's /lib is /usr/lib (merged /usr): systemctl may name either.
    let same = |a: &str, b: &str| a.trim_start_matches("/usr") == b.trim_start_matches("/usr");
    ensure!(same(&link.to_string_lossy(), unit), "the enabled unit is {} instead of {unit}; {}", link.display(), ctx());
    let en = in_chroot(dir, &format!("systemctl is-enabled {NAME}.service || true"))?;
    ensure!(en.trim() == "enabled", "systemctl is-enabled says {en:?}; {}", ctx());
    let procs = processes_in(dir);
    ensure!(procs.is_empty(), "something was started in the chroot: {procs:?}");
    Ok(())
}

fn check_disabled(dir: &Path, what: &str) -> Result<()> {
    let en = in_chroot(dir, &format!("systemctl is-enabled {NAME}.service 2>&1 || true"))?;
    ensure!(!en.lines().any(|l| l.trim() == "enabled"), "after {what} the service is still enabled: {en}");
    let link = dir.join(format!("etc/systemd/system/multi-user.target.wants/{NAME}.service"));
    ensure!(!link.exists(), "after {what} {} still leads to a unit", link.display());
    let sys = in_chroot(dir, "grep -Rl /opt/xcp-vm-agent /etc/systemd/system || true")?;
    ensure!(sys.trim().is_empty(), "after {what} /etc/systemd/system runs /opt/xcp-vm-agent again: {sys}");
    Ok(())
}

fn rpm_in(dir: &Path, args: &[&str], pkg: Option<&Path>) -> Result<String> {
    let mut c = Command::new("rpm");
    c.arg("--root").arg(dir);
    if matches!(args.first(), Some(&"-i") | Some(&"-e")) {
        c.args(["--nodeps", "--noplugins"]);
    }
    c.args(args);
    if let Some(p) = pkg {
        c.arg(p);
    }
    let out = c.env("LC_ALL", "C").stdin(Stdio::null()).output().context("cannot run rpm")?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() || text.contains("scriptlet failed") {
        bail!("rpm {args:?} {pkg:?} failed ({}):\n{text}", out.status);
    }
    Ok(text)
}

/// The installers under test, each as (name, install, uninstall).
enum Via {
    Dpkg,
    Apt,
    Rpm,
    Tarball,
}

impl Via {
    fn name(&self) -> &'static str {
        match self {
            Via::Dpkg => "dpkg -i </dev/null",
            Via::Apt => "apt-get install ./file.deb",
            Via::Rpm => "rpm --root --nodeps -i",
            Via::Tarball => "tarball install.sh",
        }
    }
    /// The unit that must be in force afterwards.
    fn unit(&self) -> &'static str {
        match self {
            Via::Dpkg | Via::Apt => "/lib/systemd/system/xcp-vm-agent.service",
            Via::Rpm => "/usr/lib/systemd/system/xcp-vm-agent.service",
            Via::Tarball => "/etc/systemd/system/xcp-vm-agent.service",
        }
    }
}

struct Art<'a> {
    deb: &'a Path,
    rpm: &'a Path,
    tgz: &'a Path,
    version: &'a str,
}

/// `url`: the SERVER_URL install.sh gets (none over 1.0.3: its config names one).
fn install(dir: &Path, via: &Via, a: &Art, url: &str) -> Result<String> {
    match via {
        Via::Dpkg => in_chroot(dir, &format!("dpkg -i {} 2>&1", copy_in(dir, a.deb)?)),
        Via::Apt => in_chroot(dir, &format!("apt-get install -y {} 2>&1", copy_in(dir, a.deb)?)),
        Via::Rpm => {
            if !dir.join("root/.rpmdb").exists() && !dir.join("var/lib/rpm").exists() {
                rpm_in(dir, &["--initdb"], None)?;
            }
            rpm_in(dir, &["-i"], Some(a.rpm))
        }
        Via::Tarball => {
            crate::util::run(Command::new("tar").arg("-xzf").arg(a.tgz).arg("-C").arg(dir.join("tmp")))?;
            in_chroot(dir, &format!("sh /tmp/{NAME}-{}-x86_64/install.sh {url} -y --skip-deps 2>&1", a.version))
        }
    }
}

fn uninstall(dir: &Path, via: &Via) -> Result<String> {
    match via {
        Via::Dpkg | Via::Apt => in_chroot(dir, &format!("dpkg -r {NAME} 2>&1")),
        Via::Rpm => rpm_in(dir, &["-e", NAME], None),
        Via::Tarball => in_chroot(dir, &format!("sh /usr/local/share/{NAME}/uninstall.sh --force 2>&1")),
    }
}

/// Every scenario runs even when an earlier one failed; the error lists all
/// failures.
pub fn run(base: &Path, deb: &Path, rpm: &Path, apk: &Path, tgz: &Path, version: &str) -> Result<()> {
    let a = Art { deb, rpm, tgz, version };
    let mut failed = Vec::new();
    for via in [Via::Dpkg, Via::Apt, Via::Rpm, Via::Tarball] {
        let t = std::time::Instant::now();
        match over_standin(base, &via, &a) {
            Ok(line) => {
                eprintln!(
                    "    {}: taken over, then uninstalled and disabled ({:.1} s)",
                    via.name(),
                    t.elapsed().as_secs_f64()
                );
                if matches!(via, Via::Dpkg) {
                    eprintln!("      {line}");
                }
            }
            Err(e) => {
                eprintln!("    FAILED {}: {e:#}", via.name());
                failed.push(format!("{} over 1.0.3", via.name()));
            }
        }
    }
    match apk_scripts_over_standin(base, apk) {
        Ok(()) => eprintln!(
            "    .apk scripts (sh, no apk-tools): .post-install took over, config kept; .pre-deinstall exits 0"
        ),
        Err(e) => {
            eprintln!("    FAILED .apk scripts: {e:#}");
            failed.push(".apk scripts over 1.0.3".to_string());
        }
    }
    for via in [Via::Dpkg, Via::Rpm, Via::Tarball] {
        match over_hand_written_unit(base, &via, &a) {
            Ok(()) => {
                eprintln!("    {}: hand-written unit left alone, with a warning; disabled after uninstall", via.name())
            }
            Err(e) => {
                eprintln!("    FAILED {}: {e:#}", via.name());
                failed.push(format!("{} with a hand-written unit", via.name()));
            }
        }
    }
    if !failed.is_empty() {
        bail!("takeover checks failed: {}", failed.join("; "));
    }
    Ok(())
}

/// Install over the stand-in's layout, check, uninstall, check; returns the
/// takeover line.
fn over_standin(base: &Path, via: &Via, a: &Art) -> Result<String> {
    let dir = fresh_chroot(base, "chroot-takeover")?;
    lay_standin(&dir)?;
    let before = read_before(&dir)?;
    let out = install(&dir, via, a, "").with_context(|| format!("{} over the 1.0.3 layout", via.name()))?;
    check_taken_over(&dir, &before, &out, via.unit(), via.name())?;
    let line = out.lines().find(|l| l.contains(LINE)).unwrap_or_default().trim().to_string();
    uninstall(&dir, via)?;
    check_disabled(&dir, &format!("uninstalling ({})", via.name()))?;
    std::fs::remove_dir_all(&dir)?;
    Ok(line)
}

/// A unit a person wrote is not 1.0.3's: the artifact leaves it alone.
fn over_hand_written_unit(base: &Path, via: &Via, a: &Art) -> Result<()> {
    let dir = fresh_chroot(base, "chroot-foreign-unit")?;
    let unit = dir.join(format!("etc/systemd/system/{NAME}.service"));
    let hand = "[Unit]\nDescription=xcp-vm-agent, my way\n\n[Service]\n\
                ExecStart=/usr/bin/xcp-vm-agent --config /etc/xcp-vm-agent/mine.json run\n\n\
                [Install]\nWantedBy=multi-user.target\n";
    std::fs::write(&unit, hand)?;
    let out =
        install(&dir, via, a, super::TEST_URL).with_context(|| format!("{} with a hand-written unit", via.name()))?;
    ensure!(std::fs::read_to_string(&unit)? == hand, "{} changed the hand-written unit:\n{out}", via.name());
    ensure!(out.contains(FOREIGN), "{} did not say why the packaged unit may not be in force:\n{out}", via.name());
    ensure!(!dir.join(BACKUP).exists(), "{} made a 1.0.3 backup without 1.0.3:\n{out}", via.name());
    uninstall(&dir, via)?;
    ensure!(std::fs::read_to_string(&unit)? == hand, "uninstalling ({}) touched the hand-written unit", via.name());
    check_disabled(&dir, &format!("uninstalling ({}) with a hand-written unit", via.name()))?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// No apk-tools here: unpack the .apk's files as apk would (but keep the
/// protected /etc/xcp-vm-agent/config.json, which apk writes as .apk-new)
/// and run its .post-install and .pre-deinstall with sh. Under OpenRC in a
/// booted VM is the VM matrix's part.
fn apk_scripts_over_standin(base: &Path, apk: &Path) -> Result<()> {
    let dir = fresh_chroot(base, "chroot-takeover-apk")?;
    lay_standin(&dir)?;
    let before = read_before(&dir)?;
    let scripts = dir.join("tmp/apk");
    std::fs::create_dir_all(&scripts)?;
    // The .apk is gzip members that decompress to one tar stream.
    crate::util::run(Command::new("tar").arg("-xzf").arg(apk).arg("-C").arg(&scripts).args([
        "--wildcards",
        ".post-install",
        ".pre-deinstall",
    ]))?;
    crate::util::run(
        Command::new("tar")
            .arg("-xzf")
            .arg(apk)
            .arg("-C")
            .arg(&dir)
            .args(["--exclude=.*", &format!("--exclude=etc/{NAME}/config.json")]),
    )?;
    let out = in_chroot(&dir, "sh /tmp/apk/.post-install 2>&1")?;
    for (f, bytes) in &before.kept {
        ensure!(&std::fs::read(dir.join(format!("etc/{NAME}/{f}")))? == bytes, "/etc/{NAME}/{f} changed:\n{out}");
    }
    let log = std::fs::read(dir.join(format!("var/log/{NAME}/agent.log")))?;
    ensure!(log.starts_with(&before.log), "the old agent.log was not kept:\n{out}");
    ensure!(out.matches(LINE).count() == 1, ".post-install printed no takeover line:\n{out}");
    let sys = in_chroot(&dir, "grep -Rl /opt/xcp-vm-agent /etc/systemd/system || true")?;
    ensure!(sys.trim().is_empty(), "/etc/systemd/system still runs /opt/xcp-vm-agent: {sys}");
    ensure!(dir.join(BACKUP).join("opt-xcp-vm-agent/agent.py").is_file(), "no backup in /{BACKUP}:\n{out}");
    ensure!(
        !dir.join(format!("etc/systemd/system/multi-user.target.wants/{NAME}.service")).exists(),
        "the old unit is still enabled:\n{out}"
    );
    in_chroot(&dir, "sh /tmp/apk/.pre-deinstall")?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
