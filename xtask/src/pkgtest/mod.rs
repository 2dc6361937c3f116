//! The packaging checks (`cargo xtask test`, tier "packaging checks"; alone:
//! `cargo xtask pkgtest [--takeover-only]`). Offline, root for the chroot
//! parts. The takeover from the Python agent 1.0.3 is in [`takeover`] (a
//! part of this tier: it uses the chroot helpers here).
//!
//! In order: shellcheck on every shell script; `systemd-analyze verify` on
//! the unit; the APK checker proven on Alpine's own package and on broken
//! copies of it; the static binary built once and packaged as version N, as N
//! again (the two must be byte-identical: reproducibility) and as N+1 (with a
//! changed default config); lintian, rpmlint and the APK checker on the
//! packages; the binary alone in an empty chroot (`--version`, and a real
//! check-in by host name against mgmt-server); the .deb lifecycle in a
//! Debian chroot (install, edit config, upgrade, remove, purge: nothing of
//! ours left); the .rpm lifecycle with `rpm --root --nodeps`; install.sh and
//! uninstall.sh in a chroot under each init system. Writes the figures to
//! `target/pkgtest/figures.json`.
//!
//! The Debian chroot is made once by mmdebstrap (minbase plus the tools the
//! package depends on, which proves those names exist in Debian) and cached as
//! `target/pkgtest/debian-bookworm.tar`; each scenario unpacks a fresh copy.
mod takeover;

use crate::dist::{self, Opts};
use crate::pkgmeta::{self, NAME};
use crate::util::{self, in_ci, is_root, root, step};
use crate::{apk, apkcheck};
use anyhow::{bail, ensure, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

const SUITE: &str = "bookworm";
/// Packages the chroot gets on top of minbase: what our .deb depends on.
const CHROOT_INCLUDE: &str = "cloud-guest-utils,parted,gdisk,e2fsprogs,xfsprogs,logrotate";
/// The takeover chroots: a systemd distribution, as 1.0.3 supports only those.
const CHROOT_INCLUDE_SYSTEMD: &str = "cloud-guest-utils,parted,gdisk,e2fsprogs,xfsprogs,logrotate,systemd";
pub(crate) const TEST_URL: &str = "https://mgmt.example.invalid:8443";

pub(crate) fn work() -> PathBuf {
    root().join("target/pkgtest")
}

/// Shell scripts we ship or run, relative to packaging/.
const SCRIPTS: &[&str] = &[
    "common/install.sh",
    "common/uninstall.sh",
    "common/offline.sh",
    "common/xcp-vm-agent.init",
    "common/xcp-vm-agent.openrc",
    "deb/scripts/postinst",
    "deb/scripts/prerm",
    "deb/scripts/postrm",
    "rpm/post.sh",
    "rpm/preun.sh",
    "rpm/postun.sh",
    "apk/post-install",
    "apk/post-upgrade",
    "apk/pre-deinstall",
    "common/takeover.sh",
    "../vm-tests/fixtures/python-agent-1.0.3/install-agent.sh",
];

pub fn run(args: &[String]) -> Result<()> {
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("cargo xtask pkgtest [--takeover-only]\n  the packaging tier of cargo xtask test; --takeover-only: build the packages once and run only the checks of installing over the Python agent 1.0.3 (root)");
        return Ok(());
    }
    if args.iter().any(|a| a == "--takeover-only") {
        return takeover_only();
    }
    run_tier(args).map(|_| ())
}

/// The packaging tier: Ok(true) when every check ran, Ok(false) when the
/// chroot checks were skipped (not root, outside CI), so that `cargo xtask
/// test` does not count a partial tier as passed.
pub fn run_tier(_args: &[String]) -> Result<bool> {
    let t0 = Instant::now();
    for tool in ["shellcheck", "systemd-analyze", "lintian", "rpmlint", "rpm", "mmdebstrap"] {
        dist::need(tool)?;
    }
    std::fs::create_dir_all(work())?;

    step("packaging: shellcheck");
    let mut sc = Command::new("shellcheck");
    sc.args(["-s", "sh", "-S", "style"]);
    for s in SCRIPTS {
        sc.arg(root().join("packaging").join(s));
    }
    util::run(&mut sc)?;

    step("packaging: systemd-analyze verify");
    let exposure = verify_unit()?;

    step("packaging: APK checker on Alpine's rssh-2.3.4-r3.apk and broken copies");
    prove_apk_checker()?;

    step("packaging: build the binary and the packages (N, N again, N+1)");
    let epoch = dist::source_date_epoch()?;
    let (bin, target) = dist::build_binary(epoch)?;
    let version = pkgmeta::workspace_version()?;
    let next = next_version(&version);
    let n = Opts { version: version.clone(), epoch, out: work().join("n"), config: None };
    let n_again = Opts { version: version.clone(), epoch, out: work().join("n-again"), config: None };
    let mut cfg1 = dist::read_pkg("common/config.json")?;
    let cfg1_text = String::from_utf8(cfg1.clone())?.replacen('{', "{\n  \"log_level\": \"info\",", 1);
    cfg1 = cfg1_text.into_bytes();
    let n1 = Opts { version: next.clone(), epoch, out: work().join("n1"), config: Some(cfg1.clone()) };
    for o in [&n, &n_again, &n1] {
        if o.out.exists() {
            std::fs::remove_dir_all(&o.out)?;
        }
        dist::package_all(o, &bin)?;
    }

    step("packaging: reproducibility (binary built twice in two target dirs, packages built twice)");
    let (bin2, _) = dist::build_binary_in(epoch, &root().join("target/dist-build-repro"))?;
    let (h1, h2) = (apk::sha256_hex(&std::fs::read(&bin)?), apk::sha256_hex(&std::fs::read(&bin2)?));
    ensure!(h1 == h2, "two builds of the binary differ: {} {h1} versus {} {h2}", bin.display(), bin2.display());
    eprintln!("    binary identical: {h1}");
    let a = std::fs::read_to_string(n.out.join("SHA256SUMS"))?;
    let b = std::fs::read_to_string(n_again.out.join("SHA256SUMS"))?;
    if a != b {
        bail!("two builds with SOURCE_DATE_EPOCH={epoch} differ:\n{a}\nversus\n{b}");
    }
    eprintln!("    identical:\n{a}");

    let deb = n.out.join(pkgmeta::deb_name(&version));
    let rpm = n.out.join(pkgmeta::rpm_name(&version));
    let apk = n.out.join(pkgmeta::apk_name(&version));
    let tgz = n.out.join(pkgmeta::tarball_name(&version));

    step("packaging: lintian");
    lintian(&deb)?;
    step("packaging: rpmlint");
    rpmlint(&rpm)?;
    step("packaging: APK checker on our package");
    let s = apkcheck::check_file(&apk)?;
    eprintln!("    ok: {} {} ({} files, size {})", s.name, s.version, s.files, s.size);
    rpm_queries(&rpm)?;

    if !is_root() {
        if in_ci() {
            bail!("the chroot checks need root, and CI=true forbids skipping them");
        }
        eprintln!("\n    note: not root: the chroot checks (static binary, .deb, .rpm, install.sh) were skipped");
        return Ok(false);
    }

    step("packaging: the static binary in an empty chroot (no libc)");
    empty_chroot(&bin, &version)?;

    let base = chroot_base()?;
    step("packaging: .deb lifecycle in a Debian chroot");
    deb_lifecycle(&base, &deb, &n1.out.join(pkgmeta::deb_name(&next)), &version, &next)?;
    step("packaging: .rpm lifecycle with rpm --root --nodeps");
    rpm_lifecycle(&base, &rpm, &n1.out.join(pkgmeta::rpm_name(&next)), &cfg1)?;
    step("packaging: install.sh / uninstall.sh in a chroot, per init system");
    tarball_install(&base, &tgz, &version)?;
    step("packaging: taking over from the Python agent 1.0.3 (stand-in layout, systemd chroots)");
    let sd = chroot_base_systemd()?;
    takeover::run(&sd, &deb, &rpm, &apk, &tgz, &version)?;

    write_figures(&n, &bin, target, &exposure)?;
    step(&format!("packaging checks passed in {:.0} s", t0.elapsed().as_secs_f64()));
    Ok(true)
}

fn takeover_only() -> Result<()> {
    ensure!(is_root(), "the takeover checks need root (chroots)");
    let epoch = dist::source_date_epoch()?;
    let (bin, _) = dist::build_binary(epoch)?;
    let version = pkgmeta::workspace_version()?;
    let n = Opts { version: version.clone(), epoch, out: work().join("n"), config: None };
    if n.out.exists() {
        std::fs::remove_dir_all(&n.out)?;
    }
    dist::package_all(&n, &bin)?;
    let sd = chroot_base_systemd()?;
    takeover::run(
        &sd,
        &n.out.join(pkgmeta::deb_name(&version)),
        &n.out.join(pkgmeta::rpm_name(&version)),
        &n.out.join(pkgmeta::apk_name(&version)),
        &n.out.join(pkgmeta::tarball_name(&version)),
        &version,
    )
}

fn next_version(v: &str) -> String {
    let mut parts: Vec<u64> = v.split('.').filter_map(|p| p.parse().ok()).collect();
    if let Some(last) = parts.last_mut() {
        *last += 1;
    }
    parts.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(".")
}

/// `systemd-analyze verify` in a scratch root that holds the unit and a
/// binary at the path ExecStart names.
fn verify_unit() -> Result<String> {
    let dir = work().join("verify");
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    let unit = dir.join(format!("{NAME}.service"));
    std::fs::create_dir_all(&dir)?;
    std::fs::copy(root().join("packaging/common/xcp-vm-agent.service"), &unit)?;
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit)
        .env("SYSTEMD_LOG_LEVEL", "notice")
        .output()
        .context("cannot run systemd-analyze")?;
    let err = String::from_utf8_lossy(&out.stderr);
    // The only acceptable complaint: the binary is not installed on the
    // build machine.
    let problems: Vec<&str> = err
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| !(l.contains("/usr/bin/xcp-vm-agent") && l.contains("No such file")))
        .filter(|l| !l.contains("Unit configuration has fatal error, unit will not be started"))
        .collect();
    if !problems.is_empty() {
        bail!("systemd-analyze verify {}:\n{}", unit.display(), problems.join("\n"));
    }
    eprintln!("    clean");
    let sec = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit)
        .output()
        .context("cannot run systemd-analyze security")?;
    let text = String::from_utf8_lossy(&sec.stdout);
    let score = text
        .lines()
        .find_map(|l| l.split("Overall exposure level for").nth(1))
        .and_then(|r| r.split(": ").nth(1))
        .map(|s| s.trim().to_string())
        .context("systemd-analyze security printed no exposure level")?;
    eprintln!("    systemd-analyze security: exposure {score}");
    Ok(score)
}

fn prove_apk_checker() -> Result<()> {
    let fixture = root().join("../shared/fixtures/apk/rssh-2.3.4-r3.apk");
    let fixture = if fixture.exists() { fixture } else { PathBuf::from("/work/shared/fixtures/apk/rssh-2.3.4-r3.apk") };
    let s = apkcheck::check_file(&fixture).context("the checker must accept Alpine's own package")?;
    ensure!(s.signed && s.name == "rssh" && s.version == "2.3.4-r3", "fixture read wrongly");
    eprintln!("    accepted {} ({} {}, signed, {} files)", fixture.display(), s.name, s.version, s.files);
    let bytes = std::fs::read(&fixture)?;
    for (what, copy) in apkcheck::broken_copies(&bytes)? {
        match apkcheck::check_bytes(&copy) {
            Ok(_) => bail!("the APK checker accepted a copy with {what}"),
            Err(e) => eprintln!("    rejected ({what}): {e:#}"),
        }
    }
    Ok(())
}

fn lintian(deb: &Path) -> Result<()> {
    let out = Command::new("lintian")
        .args(["--fail-on", "error", "--display-info", "--tag-display-limit", "0"])
        .arg(deb)
        .output()
        .context("cannot run lintian")?;
    let text = String::from_utf8_lossy(&out.stdout);
    eprint!("{text}{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() || text.lines().any(|l| l.starts_with("E: ")) {
        bail!("lintian reports errors on {}", deb.display());
    }
    eprintln!("    no errors");
    Ok(())
}

fn rpmlint(rpm: &Path) -> Result<()> {
    let cfg = root().join("packaging/rpm/rpmlint.toml");
    let out = Command::new("rpmlint").arg("-c").arg(&cfg).arg(rpm).output().context("cannot run rpmlint")?;
    let text = String::from_utf8_lossy(&out.stdout);
    eprint!("{text}{}", String::from_utf8_lossy(&out.stderr));
    if text.lines().any(|l| l.contains(": E: ")) {
        bail!("rpmlint reports errors on {}", rpm.display());
    }
    eprintln!("    no errors");
    Ok(())
}

fn rpm_queries(rpm: &Path) -> Result<()> {
    let q = |args: &[&str]| util::output(Command::new("rpm").args(args).arg(rpm));
    let conf = q(&["-qpc"])?;
    ensure!(conf.contains(&format!("/etc/{NAME}/config.json")), "config.json is not an rpm config file: {conf}");
    let scripts = q(&["-qp", "--scripts"])?;
    for s in ["postinstall scriptlet", "preuninstall scriptlet", "postuninstall scriptlet"] {
        ensure!(scripts.contains(s), "rpm has no {s}");
    }
    let req = q(&["-qp", "--requires"])?;
    ensure!(req.contains("growpart") && req.contains("xfsprogs"), "rpm requires lack the disk tools: {req}");
    eprintln!("    rpm -qpc: {}", conf.trim().replace('\n', ", "));
    Ok(())
}

/// Run a shell script inside a chroot with a clean environment; returns
/// stdout, fails with stdout and stderr.
pub(crate) fn in_chroot(dir: &Path, script: &str) -> Result<String> {
    let out = Command::new("chroot")
        .arg(dir)
        .args(["/bin/sh", "-ec", script])
        .env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .context("cannot run chroot")?;
    let so = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "in chroot {}: `{script}` failed with {}\nstdout:\n{so}\nstderr:\n{}",
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(so)
}

/// Processes whose root directory is inside `dir` (a service started where
/// it must not be).
pub(crate) fn processes_in(dir: &Path) -> Vec<String> {
    let want = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let mut found = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let root = std::fs::read_link(e.path().join("root"));
            if let Ok(r) = root {
                if r.starts_with(&want) {
                    let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
                    found.push(format!("{} {}", e.file_name().to_string_lossy(), comm.trim()));
                }
            }
        }
    }
    found
}

fn empty_chroot(bin: &Path, version: &str) -> Result<()> {
    let dir = work().join("empty-root");
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    std::fs::copy(bin, dir.join(NAME))?;
    let out = Command::new("chroot")
        .arg(&dir)
        .arg(format!("/{NAME}"))
        .arg("--version")
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output()
        .context("cannot run chroot")?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && text.contains(version),
        "`{NAME} --version` in an empty chroot: {} {text} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("    {}", text.trim());
    checkin_in_empty_chroot(&dir)
}

/// A real check-in by host name (`localhost`, from the chroot's /etc/hosts)
/// against the reference mgmt-server, from the binary alone in the chroot.
fn checkin_in_empty_chroot(dir: &Path) -> Result<()> {
    util::run(util::cargo().args(["build", "-q", "-p", "vm-tests", "--bin", "mgmt-server"]))?;
    let server = root().join("target/debug/mgmt-server");
    let pki = dir.join("pki");
    let state = work().join("server-state");
    if state.exists() {
        std::fs::remove_dir_all(&state)?;
    }
    util::run(Command::new(&server).arg("init-pki").arg(&pki))?;
    let ready = work().join("server-ready");
    let _ = std::fs::remove_file(&ready);
    let mut child = Command::new(&server)
        .args(["serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--pki"])
        .arg(&pki)
        .arg("--state")
        .arg(&state)
        .arg("--ready-file")
        .arg(&ready)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let r = (|| -> Result<()> {
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        let line = loop {
            if let Ok(l) = std::fs::read_to_string(&ready) {
                if l.contains("admin") {
                    break l;
                }
            }
            ensure!(Instant::now() < deadline, "mgmt-server did not become ready");
            std::thread::sleep(std::time::Duration::from_millis(100));
        };
        // "listening https://127.0.0.1:PORT admin http://127.0.0.1:PORT2"
        let port =
            line.split("https://127.0.0.1:").nth(1).and_then(|s| s.split_whitespace().next()).context("no port")?;
        std::fs::create_dir_all(dir.join("etc"))?;
        std::fs::write(dir.join("etc/hosts"), "127.0.0.1 localhost\n")?;
        let cfg = format!(
            r#"{{"server_url": "https://localhost:{port}", "client_cert": ["/pki/agent-cert.pem", "/pki/agent-key.pem"],
 "server_cert": "/pki/ca.pem", "state_dir": "/state", "log_file": "/agent.log", "fstab_path": "/fstab", "xenstore_publish": "never"}}"#
        );
        std::fs::write(dir.join("config.json"), cfg)?;
        std::fs::create_dir_all(dir.join("state"))?;
        let out = Command::new("chroot")
            .arg(dir)
            .args([&format!("/{NAME}"), "--config", "/config.json", "once"])
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .output()
            .context("cannot run chroot")?;
        let log = std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
        ensure!(
            out.status.success(),
            "`{NAME} once` against https://localhost:{port} in the empty chroot failed: {}\nstdout: {}\nstderr: {}\nlog:\n{log}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let agents = std::fs::read_dir(state.join("agents")).map(|d| d.count()).unwrap_or(0);
        ensure!(agents > 0, "`{NAME} once` exited 0 but mgmt-server recorded no agent in {}", state.display());
        eprintln!("    checked in by host name: https://localhost:{port} (mgmt-server recorded the agent)");
        Ok(())
    })();
    let _ = child.kill();
    let out = child.wait_with_output()?;
    if r.is_err() {
        eprintln!("    mgmt-server stderr:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    r
}

/// The cached Debian chroot tarball (made by mmdebstrap on first use).
pub(crate) fn chroot_base() -> Result<PathBuf> {
    let tar = work().join(format!("debian-{SUITE}.tar"));
    util::debian_tarball(&tar, SUITE, CHROOT_INCLUDE, "packaging")?;
    Ok(tar)
}

/// The cached Debian chroot with systemd (the takeover scenarios).
fn chroot_base_systemd() -> Result<PathBuf> {
    let tar = work().join(format!("debian-{SUITE}-systemd.tar"));
    util::debian_tarball(&tar, SUITE, CHROOT_INCLUDE_SYSTEMD, "packaging (systemd)")?;
    Ok(tar)
}

/// A fresh copy of the chroot in target/pkgtest/NAME.
pub(crate) fn fresh_chroot(base: &Path, name: &str) -> Result<PathBuf> {
    let dir = work().join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    util::run(Command::new("tar").arg("-xf").arg(base).arg("-C").arg(&dir))?;
    Ok(dir)
}

/// Every path under the chroot except the places package managers and
/// tests write their own records.
fn snapshot(dir: &Path) -> Result<std::collections::BTreeSet<String>> {
    let skip = [
        "/proc",
        "/sys",
        "/dev",
        "/tmp",
        "/var/lib/dpkg",
        "/var/log",
        "/var/cache",
        "/run",
        "/var/lib/rpm",
        "/usr/lib/sysimage",
        // Debian's rpm keeps its database here.
        "/root/.rpmdb",
    ];
    let mut set = std::collections::BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let rel = format!("/{}", e.path().strip_prefix(dir)?.display());
            if skip.iter().any(|s| rel == *s || rel.starts_with(&format!("{s}/"))) {
                continue;
            }
            let ft = e.file_type()?;
            if ft.is_dir() {
                stack.push(e.path());
            }
            set.insert(rel);
        }
    }
    // Our log directory lives under the skipped /var/log: look at it alone.
    if dir.join("var/log").join(NAME).exists() {
        set.insert(format!("/var/log/{NAME}"));
    }
    Ok(set)
}

fn diff(before: &std::collections::BTreeSet<String>, after: &std::collections::BTreeSet<String>) -> Vec<String> {
    let mut v: Vec<String> = after.difference(before).map(|p| format!("+ {p}")).collect();
    v.extend(before.difference(after).map(|p| format!("- {p}")));
    v
}

pub(crate) fn copy_in(dir: &Path, file: &Path) -> Result<String> {
    let name = file.file_name().unwrap().to_string_lossy().into_owned();
    std::fs::copy(file, dir.join("tmp").join(&name))?;
    Ok(format!("/tmp/{name}"))
}

fn deb_lifecycle(base: &Path, deb: &Path, deb1: &Path, v: &str, v1: &str) -> Result<()> {
    let dir = fresh_chroot(base, "chroot-deb")?;
    let before = snapshot(&dir)?;
    let (p, p1) = (copy_in(&dir, deb)?, copy_in(&dir, deb1)?);

    in_chroot(&dir, &format!("dpkg -i {p}"))?;
    let procs = processes_in(&dir);
    ensure!(procs.is_empty(), "the service was started inside a chroot: {procs:?}");
    let check = in_chroot(
        &dir,
        &format!(
            "dpkg-query -W -f='${{Version}} ${{Status}}\\n' {NAME}
             dpkg-query -W -f='${{Conffiles}}\\n' {NAME}
             stat -c '%a %n' /usr/bin/{NAME} /etc/{NAME}/config.json /var/lib/{NAME} /var/log/{NAME}
             ls /usr/lib/systemd/system/{NAME}.service /etc/init.d/{NAME} /etc/logrotate.d/{NAME} /usr/share/man/man8/{NAME}.8.gz
             ls /etc/systemd/system/multi-user.target.wants/{NAME}.service
             ls /etc/rc2.d/ | grep -q {NAME}
             {NAME} --version"
        ),
    )?;
    ensure!(check.contains(&format!("{v} install ok installed")), "not installed: {check}");
    ensure!(
        !check.lines().any(|l| l.starts_with(&format!(" /etc/{NAME}/config.json "))),
        "config.json is a dpkg conffile (a config 1.0.3 wrote would make dpkg prompt): {check}"
    );
    for want in ["755 /usr/bin/", "600 /etc/", "700 /var/lib/", "750 /var/log/"] {
        ensure!(check.contains(want), "wrong mode, want {want:?}: {check}");
    }
    eprintln!(
        "    installed {v}: files, config made from the template (not a conffile), modes, systemd enablement and rc.d links in place; nothing started"
    );

    // The administrator edits the config; the agent writes state and logs.
    in_chroot(
        &dir,
        &format!(
            "printf '{{\"server_url\": \"{TEST_URL}\"}}\\n' > /etc/{NAME}/config.json
             echo admin > /etc/{NAME}/admin-notes.txt
             echo state > /var/lib/{NAME}/state.json
             echo log > /var/log/{NAME}/agent.log"
        ),
    )?;
    in_chroot(&dir, &format!("dpkg -i {p1}"))?;
    let up = in_chroot(
        &dir,
        &format!(
            "dpkg-query -W -f='${{Version}}\\n' {NAME}; cat /etc/{NAME}/config.json; ls /etc/{NAME}/
             grep -q log_level /usr/share/{NAME}/config.json"
        ),
    )?;
    ensure!(up.starts_with(v1), "upgrade to {v1} did not happen: {up}");
    ensure!(up.contains(TEST_URL), "the edited config did not survive the upgrade: {up}");
    ensure!(!up.contains("log_level"), "the upgrade replaced the edited config: {up}");
    eprintln!("    upgraded to {v1} with stdin closed, no prompt: edited config kept, new default in /usr/share/{NAME}/config.json");

    in_chroot(&dir, &format!("dpkg -r {NAME}"))?;
    let rm = in_chroot(&dir, &format!("test ! -e /usr/bin/{NAME}; cat /etc/{NAME}/config.json; ls /var/lib/{NAME}"))?;
    ensure!(rm.contains(TEST_URL) && rm.contains("state.json"), "remove must keep config and state: {rm}");
    in_chroot(&dir, &format!("dpkg -P {NAME}"))?;
    let procs = processes_in(&dir);
    ensure!(procs.is_empty(), "processes left in the chroot: {procs:?}");
    let after = snapshot(&dir)?;
    let d = diff(&before, &after);
    let allowed = [format!("+ /etc/{NAME}"), format!("+ /etc/{NAME}/admin-notes.txt")];
    let extra: Vec<&String> = d.iter().filter(|l| !allowed.contains(l)).collect();
    ensure!(extra.is_empty(), "after purge the chroot differs from before install:\n{extra:#?}");
    eprintln!("    removed (config and state kept), purged: only the administrator's own file is left");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

fn rpm_lifecycle(base: &Path, rpm: &Path, rpm1: &Path, cfg1: &[u8]) -> Result<()> {
    let dir = fresh_chroot(base, "chroot-rpm")?;
    let before = snapshot(&dir)?;
    let rpm_cmd = |args: &[&str], pkg: Option<&Path>| -> Result<String> {
        let mut c = Command::new("rpm");
        c.arg("--root").arg(&dir);
        if matches!(args.first(), Some(&"-i") | Some(&"-U") | Some(&"-e")) {
            c.args(["--nodeps", "--noplugins"]);
        }
        c.args(args);
        if let Some(p) = pkg {
            c.arg(p);
        }
        let out = c.env("LC_ALL", "C").output().context("cannot run rpm")?;
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if !out.status.success() || text.contains("scriptlet failed") {
            bail!("rpm {args:?} {pkg:?} failed ({}):\n{text}", out.status);
        }
        Ok(text)
    };
    rpm_cmd(&["--initdb"], None)?;
    rpm_cmd(&["-i"], Some(rpm))?;
    ensure!(processes_in(&dir).is_empty(), "the rpm scriptlets started the service inside a chroot");
    let check = in_chroot(
        &dir,
        &format!(
            "stat -c '%a %n' /usr/bin/{NAME} /etc/{NAME}/config.json /var/lib/{NAME} /var/log/{NAME}
             ls /usr/lib/systemd/system/{NAME}.service /etc/init.d/{NAME}
             ls /etc/rc2.d/ | grep {NAME}"
        ),
    )?;
    for want in ["755 /usr/bin/", "600 /etc/", "700 /var/lib/", "750 /var/log/"] {
        ensure!(check.contains(want), "wrong mode after rpm -i, want {want:?}: {check}");
    }
    let conf = rpm_cmd(&["-qc", NAME], None)?;
    ensure!(conf.contains("config.json"), "rpm -qc: {conf}");
    eprintln!(
        "    rpm -i: files in place, %post registered the SysV script (no systemd in the chroot), nothing started"
    );

    std::fs::write(dir.join(format!("etc/{NAME}/config.json")), format!("{{\"server_url\": \"{TEST_URL}\"}}\n"))?;
    rpm_cmd(&["-U"], Some(rpm1))?;
    let kept = std::fs::read_to_string(dir.join(format!("etc/{NAME}/config.json")))?;
    ensure!(kept.contains(TEST_URL), "rpm -U replaced the edited config: {kept}");
    let new = std::fs::read(dir.join(format!("etc/{NAME}/config.json.rpmnew"))).context("rpm -U wrote no .rpmnew")?;
    ensure!(new == cfg1, "config.json.rpmnew is not the new default");
    eprintln!("    rpm -U: edited config kept, new default in config.json.rpmnew; scriptlets exit 0");

    rpm_cmd(&["-e", NAME], None)?;
    let rc = in_chroot(&dir, &format!("ls /etc/rc2.d/ | grep -c {NAME} || true"))?;
    ensure!(rc.trim() == "0", "rpm -e left rc.d links");
    ensure!(!dir.join(format!("usr/bin/{NAME}")).exists(), "rpm -e left the binary");
    let after = snapshot(&dir)?;
    let d = diff(&before, &after);
    let extra = rpm_e_leftovers(&d);
    ensure!(extra.is_empty(), "after rpm -e the chroot differs from before install:\n{extra:#?}");
    eprintln!("    rpm -e: service deregistered, files gone (edited config kept as .rpmsave)");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// What `rpm -e` left that it should not: rpm keeps an edited config as
/// .rpmsave and the .rpmnew it wrote (and so their directory); anything
/// else, under /etc/NAME or not, is a leftover.
fn rpm_e_leftovers(diff: &[String]) -> Vec<&String> {
    let allowed = [
        format!("+ /etc/{NAME}"),
        format!("+ /etc/{NAME}/config.json.rpmsave"),
        format!("+ /etc/{NAME}/config.json.rpmnew"),
    ];
    diff.iter().filter(|l| !allowed.contains(l)).collect()
}

fn tarball_install(base: &Path, tgz: &Path, version: &str) -> Result<()> {
    let dir = fresh_chroot(base, "chroot-tarball")?;
    util::run(Command::new("tar").arg("-xzf").arg(tgz).arg("-C").arg(dir.join("tmp")))?;
    let src = format!("/tmp/{NAME}-{version}-x86_64");
    let before = snapshot(&dir)?;
    let install = format!("sh {src}/install.sh {TEST_URL} -y --skip-deps");
    let uninstall = format!("sh /usr/local/share/{NAME}/uninstall.sh --force");
    let common = format!(
        "grep -q '\"server_url\": \"{TEST_URL}\"' /etc/{NAME}/config.json
         test \"$(stat -c %a /etc/{NAME}/config.json)\" = 600
         test -x /usr/local/bin/{NAME}
         /usr/local/bin/{NAME} --config /etc/{NAME}/config.json check-config"
    );
    let stubs = "mkdir -p /usr/lib/systemd /tmp/stub
        printf '#!/bin/sh\\necho \"$(basename \"$0\") $*\" >> /tmp/stub/calls\\n' > /tmp/stub/stub
        chmod 755 /tmp/stub/stub";
    let variants: [(&str, String, String, String); 4] = [
        (
            "sysv",
            String::new(),
            format!("grep -q /usr/local/bin/{NAME} /etc/init.d/{NAME}; ls /etc/rc2.d | grep -q {NAME}"),
            String::new(),
        ),
        (
            "systemd (installed, not running)",
            format!("{stubs}; cp /tmp/stub/stub /usr/bin/systemctl; cp /tmp/stub/stub /usr/lib/systemd/systemd"),
            format!(
                "grep -q 'ExecStart=/usr/local/bin/{NAME}' /etc/systemd/system/{NAME}.service
                 grep -q 'systemctl enable {NAME}.service' /tmp/stub/calls
                 ! grep -q 'systemctl restart' /tmp/stub/calls"
            ),
            "rm -f /usr/bin/systemctl /usr/lib/systemd/systemd /tmp/stub/calls".to_string(),
        ),
        (
            "openrc (installed, not running)",
            format!("{stubs}; cp /tmp/stub/stub /sbin/openrc-run; cp /tmp/stub/stub /sbin/rc-update; cp /tmp/stub/stub /sbin/rc-service"),
            format!(
                "head -n 1 /etc/init.d/{NAME} | grep -q openrc-run
                 grep -q 'rc-update add {NAME} default' /tmp/stub/calls
                 ! grep -q 'rc-service' /tmp/stub/calls"
            ),
            "rm -f /sbin/openrc-run /sbin/rc-update /sbin/rc-service /tmp/stub/calls".to_string(),
        ),
        (
            "none (rc.local)",
            "mv /usr/sbin/update-rc.d /usr/sbin/update-rc.d.hidden".to_string(),
            format!("grep -q '/usr/local/bin/{NAME} --config' /etc/rc.local; test ! -e /etc/init.d/{NAME}"),
            "mv /usr/sbin/update-rc.d.hidden /usr/sbin/update-rc.d".to_string(),
        ),
    ];
    for (name, setup, verify, teardown) in &variants {
        if !setup.is_empty() {
            in_chroot(&dir, setup)?;
        }
        let out = in_chroot(&dir, &install)?;
        let init = name.split_whitespace().next().unwrap();
        ensure!(out.contains(&format!("init system: {init}")), "install.sh did not detect {name}:\n{out}");
        in_chroot(&dir, &common).with_context(|| format!("after install.sh ({name})"))?;
        in_chroot(&dir, verify).with_context(|| format!("after install.sh ({name}):\n{out}"))?;
        ensure!(processes_in(&dir).is_empty(), "install.sh started the agent inside a chroot ({name})");
        in_chroot(&dir, &uninstall).with_context(|| format!("uninstall.sh ({name})"))?;
        if !teardown.is_empty() {
            in_chroot(&dir, teardown)?;
        }
        let d = diff(&before, &snapshot(&dir)?);
        // rc.local created by the none variant stays (it may hold other lines).
        let extra: Vec<&String> = d.iter().filter(|l| *l != "+ /etc/rc.local").collect();
        ensure!(extra.is_empty(), "uninstall.sh ({name}) left:\n{extra:#?}");
        eprintln!("    {name}: install.sh wrote config and service files, uninstall.sh removed them");
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

fn write_figures(n: &Opts, bin: &Path, target: &str, exposure: &str) -> Result<()> {
    let mut fig = serde_json::Map::new();
    fig.insert("systemd_exposure".into(), exposure.into());
    fig.insert("target".into(), target.into());
    fig.insert("binary_bytes".into(), std::fs::metadata(bin)?.len().into());
    let version = &n.version;
    for (k, f) in [
        ("deb_bytes", pkgmeta::deb_name(version)),
        ("rpm_bytes", pkgmeta::rpm_name(version)),
        ("apk_bytes", pkgmeta::apk_name(version)),
        ("tarball_bytes", pkgmeta::tarball_name(version)),
    ] {
        let len = std::fs::metadata(n.out.join(&f))?.len();
        ensure!(len < 1_500_000, "{f} is {len} bytes, above the 1.5 MB target");
        fig.insert(k.into(), len.into());
    }
    let text = serde_json::to_string_pretty(&fig)?;
    std::fs::write(work().join("figures.json"), &text)?;
    eprintln!("    figures: {text}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::NAME;

    #[test]
    fn rpm_e_may_leave_only_rpmsave_and_rpmnew() {
        let d = |v: &[&str]| v.iter().map(|s| s.replace("NAME", NAME)).collect::<Vec<String>>();
        let ok = d(&["+ /etc/NAME", "+ /etc/NAME/config.json.rpmsave", "+ /etc/NAME/config.json.rpmnew"]);
        assert!(super::rpm_e_leftovers(&ok).is_empty());
        let bad = d(&["+ /etc/NAME", "+ /etc/NAME/config.json", "+ /etc/NAME/tls", "- /etc/passwd"]);
        let left: Vec<&str> = super::rpm_e_leftovers(&bad).into_iter().map(String::as_str).collect();
        assert_eq!(left, ["+ /etc/xcp-vm-agent/config.json", "+ /etc/xcp-vm-agent/tls", "- /etc/passwd"]);
    }
}
