//! The offline install tier (`cargo xtask offline-test`, and part of
//! `cargo xtask test` after the packaging checks): `install.sh --root DIR`,
//! `install.sh --image FILE` and `uninstall.sh --root DIR`
//! (packaging/common/offline.sh). Root only: chroots, loop devices.
//!
//! The roots are Debian bookworm minbase trees with each init system
//! (`systemd-sysv`, `sysvinit-core`, `openrc`), made once by mmdebstrap and
//! cached as tarballs in `target/offline/`. For each init system,
//! `install.sh --root` goes into one fresh copy and the init system's own tool
//! into another (`systemctl --root DIR enable` from this machine,
//! `update-rc.d NAME defaults` and `rc-update add NAME default` in a chroot of
//! the copy): every symbolic link under /etc, and insserv's `.depend.*`
//! files, must be the same in both. `uninstall.sh --root` must then leave the
//! tree exactly as it was (paths, modes, link targets, and the contents of
//! /etc). Then: the standalone rc.local through an absolute symbolic link,
//! the takeover of the Python agent 1.0.3, the refusals, and `--image` on a
//! raw GPT disk image (loop device) and on a qcow2 copy, with an image held
//! open refused and Ctrl-C cleaning up.
use crate::dist;
use crate::pkgmeta::NAME;
use crate::util::{self, root, step};
use anyhow::{ensure, Context, Result};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

const SUITE: &str = "bookworm";
const URL: &str = "https://mgmt.example.invalid:8443";
/// (image, what minbase gets on top)
const IMAGES: &[(&str, &str)] =
    &[("systemd", "systemd-sysv"), ("sysv", "sysvinit-core"), ("openrc", "openrc,sysvinit-core")];

fn work() -> PathBuf {
    root().join("target/offline")
}

/// Where the trees and images go: a tmpfs on target/offline/t (the tier
/// writes about 2 GB of trees; on a busy shared disk that took minutes).
fn scratch() -> PathBuf {
    work().join("t")
}

/// The tmpfs on [`scratch`], unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount() -> Result<Tmpfs> {
        let d = scratch();
        let _ = Command::new("umount").arg("-l").arg(&d).stderr(Stdio::null()).status();
        std::fs::create_dir_all(&d)?;
        util::run(Command::new("mount").args(["-t", "tmpfs", "-o", "size=4g,mode=0755", "offline-test"]).arg(&d))?;
        Ok(Tmpfs(d))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if !Command::new("umount").arg(&self.0).status().map(|s| s.success()).unwrap_or(false) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

pub fn run(args: &[String]) -> Result<()> {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!(
            "cargo xtask offline-test\n\nAs root: install.sh --root into Debian trees with systemd, SysV init, OpenRC and\nno init system, compared with the links systemctl, update-rc.d and rc-update make;\nuninstall.sh --root; the refusals; links an untrusted image plants; install.sh --image on a raw and a qcow2\ndisk image, LVM, and btrfs subvolumes."
        );
        return Ok(());
    }
    ensure!(util::is_root(), "the offline install tier needs root (chroots, loop devices)");
    for tool in
        ["mmdebstrap", "systemctl", "insserv", "mkfs.ext4", "mkfs.btrfs", "mkfs.xfs", "sfdisk", "losetup", "qemu-img"]
    {
        dist::need(tool)?;
    }
    let t0 = Instant::now();
    std::fs::create_dir_all(work())?;
    for (name, include) in IMAGES {
        util::debian_tarball(&tarball(name), SUITE, include, &format!("offline: {name} image"))?;
    }
    let (bin, _) = dist::build_binary(dist::source_date_epoch()?)?;
    let _tmpfs = Tmpfs::mount()?;
    let stage = stage(&bin)?;
    let certs = certs()?;

    step("offline: an image that plants links to host files (config.json, temp names), a multi-line config value");
    hostile(&stage, &certs)?;
    step("offline: install.sh --root, links compared with the init system's own tools");
    for init in ["systemd", "sysv", "openrc"] {
        init_matches_tool(&stage, &certs, init)?;
    }
    step("offline: --init standalone, /etc/rc.local an absolute link (/etc/rc.d/rc.local)");
    standalone(&stage)?;
    step("offline: the Python agent 1.0.3 in the tree");
    takeover(&stage)?;
    step("offline: refusals");
    refusals(&stage)?;
    step("offline: install.sh --image (raw GPT image on a loop device, qcow2, VHD)");
    images(&stage)?;
    step("offline: install.sh --image with root and /var on LVM (no device-mapper)");
    lvm_image(&stage)?;
    step("offline: install.sh --image on btrfs, root in subvolume @, /var in @var (subvol= from the image's fstab)");
    btrfs_image(&stage)?;
    step("offline: install.sh --image on XFS while a clone of the image (same filesystem UUID) is mounted");
    xfs_clone_image(&stage)?;
    step(&format!("offline install checks passed in {:.0} s", t0.elapsed().as_secs_f64()));
    Ok(())
}

fn tarball(name: &str) -> PathBuf {
    work().join(format!("debian-{name}.tar"))
}

/// The tarball's layout: binary, installer and service files.
fn stage(bin: &Path) -> Result<PathBuf> {
    let dir = scratch().join("stage");
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    for f in [
        "install.sh",
        "uninstall.sh",
        "offline.sh",
        "config.json",
        "xcp-vm-agent.service",
        "xcp-vm-agent.logrotate",
        "xcp-vm-agent.init",
        "xcp-vm-agent.openrc",
    ] {
        std::fs::copy(root().join("packaging/common").join(f), dir.join(f))?;
    }
    std::fs::copy(bin, dir.join(NAME))?;
    Ok(dir)
}

/// Stand-in certificate files (only copied and checked for mode here).
fn certs() -> Result<[PathBuf; 3]> {
    let d = scratch().join("certs");
    std::fs::create_dir_all(&d)?;
    let files = [d.join("cert.pem"), d.join("key.pem"), d.join("ca.pem")];
    for (f, text) in files.iter().zip(["CERT", "KEY", "CA"]) {
        std::fs::write(f, format!("-----BEGIN {text}-----\n"))?;
    }
    Ok(files)
}

/// A fresh copy of image `image` in the scratch tmpfs (without
/// documentation, man pages and translations: nothing here reads them).
fn tree(image: &str, name: &str) -> Result<PathBuf> {
    let dir = scratch().join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    util::run(
        Command::new("tar")
            .arg("-xf")
            .arg(tarball(image))
            .args(["--exclude=./usr/share/doc/*", "--exclude=./usr/share/man/*", "--exclude=./usr/share/locale/*"])
            .arg("-C")
            .arg(&dir),
    )?;
    Ok(dir)
}

struct Out {
    ok: bool,
    text: String,
}

/// Run one of the staged scripts with a clean environment.
fn script(stage: &Path, name: &str, args: &[&str]) -> Result<Out> {
    let out = Command::new("sh")
        .arg(stage.join(name))
        .args(args)
        .env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LC_ALL", "C")
        .env("TMPDIR", tmpdir()?)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {name}"))?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok(Out { ok: out.status.success(), text })
}

/// TMPDIR for the scripts: must be empty again after each --image run.
/// With a space: the list of mounts once split at it, and the clean-up
/// then removed the work directory with the image still mounted in it.
fn tmpdir() -> Result<PathBuf> {
    let d = scratch().join("tmp dir");
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

fn install(stage: &Path, args: &[&str]) -> Result<String> {
    let o = script(stage, "install.sh", args)?;
    ensure!(o.ok, "install.sh {} failed:\n{}", args.join(" "), o.text);
    Ok(o.text)
}

fn refused(stage: &Path, args: &[&str], want: &str) -> Result<()> {
    let o = script(stage, "install.sh", args)?;
    ensure!(!o.ok, "install.sh {} should have been refused, it succeeded:\n{}", args.join(" "), o.text);
    ensure!(o.text.contains(want), "install.sh {} refused without saying {want:?}:\n{}", args.join(" "), o.text);
    eprintln!("    refused: install.sh {}: {}", args.join(" "), o.text.lines().last().unwrap_or(""));
    Ok(())
}

fn chroot(dir: &Path, cmd: &str) -> Result<String> {
    util::output(
        Command::new("chroot")
            .arg(dir)
            .args(["/bin/sh", "-ec", cmd])
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("LC_ALL", "C")
            .stdin(Stdio::null()),
    )
}

/// Every entry of the tree: path -> kind, mode, link target; files under
/// /etc also by content.
fn snapshot(dir: &Path) -> Result<BTreeMap<String, String>> {
    let mut m = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("cannot read {}", d.display()))? {
            let e = e?;
            let p = e.path();
            let rel = format!("/{}", p.strip_prefix(dir)?.display());
            let md = std::fs::symlink_metadata(&p)?;
            let mode = md.permissions().mode() & 0o7777;
            let v = if md.file_type().is_symlink() {
                format!("link -> {}", std::fs::read_link(&p)?.display())
            } else if md.is_dir() {
                stack.push(p);
                format!("dir {mode:o} {}:{}", md.uid(), md.gid())
            } else if md.is_file() && rel.starts_with("/etc/init.d/.depend.") {
                // insserv writes names in directory order, which differs
                // between filesystems: compare the content as sets.
                let text = std::fs::read_to_string(&p)?;
                let mut lines: Vec<String> = text
                    .lines()
                    .map(|l| {
                        let mut w: Vec<&str> = l.split_whitespace().collect();
                        w.sort();
                        w.join(" ")
                    })
                    .collect();
                lines.sort();
                format!("file {mode:o} {}", crate::apk::sha256_hex(lines.join("\n").as_bytes()))
            } else if md.is_file() && rel.starts_with("/etc/") {
                format!("file {mode:o} {}", crate::apk::sha256_hex(&std::fs::read(&p)?))
            } else {
                format!("other {mode:o} {}", md.len())
            };
            m.insert(rel, v);
        }
    }
    Ok(m)
}

/// What an init system's tool looks at: the links under /etc and the
/// dependency files insserv writes (from a snapshot).
fn links(snap: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    snap.iter()
        .filter(|(k, v)| k.starts_with("/etc/") && (v.starts_with("link") || k.starts_with("/etc/init.d/.depend.")))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn differences(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> Vec<String> {
    let mut d = Vec::new();
    for (k, v) in a {
        match b.get(k) {
            None => d.push(format!("only in the first: {k} ({v})")),
            Some(w) if w != v => d.push(format!("{k}: {v} versus {w}")),
            _ => {}
        }
    }
    for (k, v) in b {
        if !a.contains_key(k) {
            d.push(format!("only in the second: {k} ({v})"));
        }
    }
    d
}

fn mode(p: &Path) -> Result<u32> {
    Ok(std::fs::symlink_metadata(p).with_context(|| format!("{} is missing", p.display()))?.permissions().mode()
        & 0o7777)
}

/// The files every --root install leaves, whatever the init system.
fn check_common(dir: &Path, with_certs: bool) -> Result<()> {
    let e = |p: &str| dir.join(p.trim_start_matches('/'));
    ensure!(mode(&e("/usr/local/bin/xcp-vm-agent"))? == 0o755, "binary not 0755");
    let cfg = std::fs::read_to_string(e("/etc/xcp-vm-agent/config.json"))?;
    ensure!(mode(&e("/etc/xcp-vm-agent/config.json"))? == 0o600, "config not 0600");
    ensure!(cfg.contains(&format!("\"server_url\": \"{URL}\"")), "config lacks server_url:\n{cfg}");
    serde_json::from_str::<serde_json::Value>(&cfg).with_context(|| format!("config is not JSON:\n{cfg}"))?;
    if with_certs {
        ensure!(
            cfg.contains(r#""client_cert": ["/etc/xcp-vm-agent/agent-cert.pem", "/etc/xcp-vm-agent/agent-key.pem"]"#)
                && cfg.contains(r#""server_cert": "/etc/xcp-vm-agent/ca-cert.pem""#),
            "config lacks the certificates:\n{cfg}"
        );
        ensure!(mode(&e("/etc/xcp-vm-agent/agent-key.pem"))? == 0o600, "client key not 0600");
        ensure!(mode(&e("/etc/xcp-vm-agent/agent-cert.pem"))? == 0o644, "client certificate not 0644");
        ensure!(mode(&e("/etc/xcp-vm-agent/ca-cert.pem"))? == 0o644, "CA not 0644");
    }
    ensure!(mode(&e("/etc/logrotate.d/xcp-vm-agent"))? == 0o644, "logrotate file not 0644");
    ensure!(mode(&e("/var/lib/xcp-vm-agent"))? == 0o700, "state dir not 0700");
    ensure!(mode(&e("/var/log/xcp-vm-agent"))? == 0o750, "log dir not 0750");
    ensure!(e("/usr/local/share/xcp-vm-agent/uninstall.sh").exists(), "uninstall.sh not installed");
    Ok(())
}

/// install.sh --root in one copy, the init system's own tool in another:
/// the same links. Then uninstall.sh --root restores the tree.
fn init_matches_tool(stage: &Path, certs: &[PathBuf; 3], init: &str) -> Result<()> {
    let a = tree(init, &format!("{init}-ours"))?;
    let b = tree(init, &format!("{init}-tool"))?;
    let pristine = snapshot(&a)?;
    let [c, k, ca] = certs;
    let out = install(
        stage,
        &[
            "--root",
            &a.to_string_lossy(),
            URL,
            "--client-cert",
            &c.to_string_lossy(),
            &k.to_string_lossy(),
            "--server-cert",
            &ca.to_string_lossy(),
        ],
    )?;
    let why = match init {
        "systemd" => "init system: systemd (/sbin/init is /usr/lib/systemd/systemd)",
        "sysv" => "init system: sysv (/sbin/init is not systemd, /etc/init.d exists, /etc/rc.conf does not)",
        _ => "init system: openrc (/sbin/init is not systemd, /etc/init.d and /etc/rc.conf exist)",
    };
    ensure!(out.contains(why), "install.sh --root did not say {why:?}:\n{out}");
    ensure!(
        out.contains("disk tools missing in the target: growpart xfs_growfs sfdisk")
            && out.contains("apt-get install cloud-guest-utils xfsprogs fdisk"),
        "install.sh --root did not list the missing disk tools with Debian's package names:\n{out}"
    );
    check_common(&a, true)?;
    if init == "openrc" {
        openrc_deps_resolve(&a)?;
    }
    // The same service file, enabled by the init system's own tool.
    let tool = match init {
        "systemd" => {
            let unit = format!("etc/systemd/system/{NAME}.service");
            std::fs::copy(a.join(&unit), b.join(&unit))?;
            util::output(Command::new("systemctl").arg("--root").arg(&b).args(["enable", &format!("{NAME}.service")]))?;
            "systemctl --root DIR enable"
        }
        "sysv" => {
            let s = format!("etc/init.d/{NAME}");
            std::fs::copy(a.join(&s), b.join(&s))?;
            chroot(&b, &format!("update-rc.d {NAME} defaults"))?;
            "update-rc.d defaults (chroot)"
        }
        _ => {
            let s = format!("etc/init.d/{NAME}");
            std::fs::copy(a.join(&s), b.join(&s))?;
            chroot(&b, &format!("rc-update add {NAME} default"))?;
            "rc-update add default (chroot)"
        }
    };
    let (la, lb) = (links(&snapshot(&a)?), links(&snapshot(&b)?));
    let d = differences(&la, &lb);
    ensure!(d.is_empty(), "{init}: install.sh --root and {tool} made different links:\n{}", d.join("\n"));
    let ours: Vec<String> = differences(&links(&pristine), &lb);
    ensure!(!ours.is_empty(), "{init}: {tool} changed no link: the comparison proves nothing");
    eprintln!("    {init}: the same links as {tool}:\n      {}", ours.join("\n      "));

    // Uninstall: the links the tool leaves when it removes the service, and
    // otherwise the tree as it was. (insserv regenerates its .depend files
    // when a script goes, not byte for byte as the image was built: those
    // are compared with the tool's, not with the image.)
    let o = script(stage, "uninstall.sh", &["--root", &a.to_string_lossy()])?;
    ensure!(o.ok, "uninstall.sh --root failed:\n{}", o.text);
    let undo = match init {
        "systemd" => {
            util::output(
                Command::new("systemctl").arg("--root").arg(&b).args(["disable", &format!("{NAME}.service")]),
            )?;
            std::fs::remove_file(b.join(format!("etc/systemd/system/{NAME}.service")))?;
            "systemctl --root DIR disable"
        }
        "sysv" => {
            chroot(&b, &format!("rm /etc/init.d/{NAME}; update-rc.d {NAME} remove"))?;
            "update-rc.d remove (chroot)"
        }
        _ => {
            chroot(&b, &format!("rc-update del {NAME} default; rm /etc/init.d/{NAME}"))?;
            "rc-update del (chroot)"
        }
    };
    let after = snapshot(&a)?;
    let d = differences(&links(&after), &links(&snapshot(&b)?));
    ensure!(d.is_empty(), "{init}: uninstall.sh --root and {undo} left different links:\n{}", d.join("\n"));
    let d: Vec<String> =
        differences(&pristine, &after).into_iter().filter(|l| !l.starts_with("/etc/init.d/.depend.")).collect();
    ensure!(d.is_empty(), "{init}: after uninstall.sh --root the tree differs from before:\n{}", d.join("\n"));
    eprintln!("    {init}: uninstall.sh --root left the links {undo} leaves, and otherwise the tree as it was");
    std::fs::remove_dir_all(&a)?;
    std::fs::remove_dir_all(&b)?;
    Ok(())
}

/// The tree's own OpenRC computes its dependency tree (rc-depend -u, in a
/// chroot with a tmpfs on /run, so nothing is written into the tree) and
/// finds every service ours needs; the script is the LSB one, as the .deb
/// ships it. Debian's OpenRC runs the LSB scripts of /etc/init.d: it has no
/// `localmount` and its start-stop-daemon (dpkg's) no `--stdout`. The
/// openrc-run script written there once needed both, so OpenRC never
/// started the agent (inject-offline on debian-12-openrc: "ERROR:
/// xcp-vm-agent needs service(s) localmount", then "start-stop-daemon:
/// unrecognized option '--stdout'").
fn openrc_deps_resolve(dir: &Path) -> Result<()> {
    let script = std::fs::read_to_string(dir.join(format!("etc/init.d/{NAME}")))?;
    ensure!(
        script.starts_with("#!/bin/sh\n### BEGIN INIT INFO"),
        "Debian's OpenRC got a script that is not the LSB one:\n{}",
        script.lines().take(3).collect::<Vec<_>>().join("\n")
    );
    let out = util::output(
        Command::new("unshare")
            .args([
                "-m",
                "sh",
                "-ec",
                "mount -t tmpfs openrc \"$1/run\"; chroot \"$1\" /usr/lib/rc/bin/rc-depend -u 2>&1",
                "sh",
            ])
            .arg(dir)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::null()),
    )?;
    ensure!(out.contains("Caching service dependencies"), "rc-depend -u in the tree did not run:\n{out}");
    ensure!(!out.contains("non existent"), "the tree's OpenRC cannot start {NAME}:\n{out}");
    eprintln!("    openrc: the tree's own rc-depend resolves every dependency of {NAME}");
    Ok(())
}

/// No init system (--init standalone) and a Red Hat style /etc/rc.local, an
/// absolute link to /etc/rc.d/rc.local: the line lands inside the tree,
/// never in this machine's /etc.
fn standalone(stage: &Path) -> Result<()> {
    let a = tree("sysv", "standalone")?;
    std::fs::create_dir_all(a.join("etc/rc.d"))?;
    std::fs::write(a.join("etc/rc.d/rc.local"), "#!/bin/sh\ntouch /var/lock/subsys/local\nexit 0\n")?;
    std::fs::set_permissions(a.join("etc/rc.d/rc.local"), std::fs::Permissions::from_mode(0o644))?;
    let _ = std::fs::remove_file(a.join("etc/rc.local"));
    std::os::unix::fs::symlink("/etc/rc.d/rc.local", a.join("etc/rc.local"))?;
    let host = Path::new("/etc/rc.d/rc.local");
    let host_before = std::fs::read(host).ok();
    let pristine = snapshot(&a)?;
    let out = install(stage, &["--root", &a.to_string_lossy(), URL, "--init", "standalone"])?;
    ensure!(out.contains("init system: standalone (chosen with --init)"), "{out}");
    check_common(&a, false)?;
    let rc = std::fs::read_to_string(a.join("etc/rc.d/rc.local"))?;
    let want = format!(
        "#!/bin/sh\ntouch /var/lock/subsys/local\n/usr/local/bin/{NAME} --config /etc/{NAME}/config.json run >>/var/log/{NAME}/console.log 2>&1 & # {NAME} (added by install.sh)\nexit 0\n"
    );
    ensure!(rc == want, "rc.local in the tree is\n{rc}\nwanted\n{want}");
    ensure!(mode(&a.join("etc/rc.d/rc.local"))? == 0o755, "rc.local not made executable");
    ensure!(std::fs::read(host).ok() == host_before, "install.sh --root changed this machine's {}", host.display());
    let o = script(stage, "uninstall.sh", &["--root", &a.to_string_lossy()])?;
    ensure!(o.ok, "uninstall.sh --root failed:\n{}", o.text);
    // rc.local stays executable (it may run other lines; its content is
    // checked below); anything else is a leftover.
    let d: Vec<String> = differences(&pristine, &snapshot(&a)?)
        .into_iter()
        .filter(|l| !l.starts_with("/etc/rc.d/rc.local: file 644"))
        .collect();
    ensure!(d.is_empty(), "standalone: after uninstall.sh --root:\n{d:#?}");
    let rc = std::fs::read_to_string(a.join("etc/rc.d/rc.local"))?;
    ensure!(rc == "#!/bin/sh\ntouch /var/lock/subsys/local\nexit 0\n", "rc.local after uninstall:\n{rc}");
    eprintln!(
        "    standalone: the line went into the tree's /etc/rc.d/rc.local through the link; uninstall removed it"
    );
    std::fs::remove_dir_all(&a)?;
    Ok(())
}

/// A tree with the 1.0.3 layout, laid by the stand-in's install-agent.sh
/// (vm-tests/fixtures/python-agent-1.0.3): its unit and /opt go to the
/// backup, config, certificates and log stay byte for byte, our unit runs.
fn takeover(stage: &Path) -> Result<()> {
    let a = tree("systemd", "takeover")?;
    let e = |p: &str| a.join(p);
    let fixture = root().join("vm-tests/fixtures/python-agent-1.0.3/install-agent.sh");
    util::output(Command::new("sh").arg(&fixture).arg("--root").arg(&a).arg(URL))?;
    let kept = [
        "etc/xcp-vm-agent/config.json",
        "etc/xcp-vm-agent/agent-cert.pem",
        "etc/xcp-vm-agent/agent-key.pem",
        "etc/xcp-vm-agent/ca-cert.pem",
    ];
    let log = e("var/log/xcp-vm-agent/agent.log");
    let old_log = std::fs::read_to_string(&log)?;
    let before: Vec<Vec<u8>> = kept.iter().map(|p| std::fs::read(e(p))).collect::<std::io::Result<_>>()?;

    let out = install(stage, &["--root", &a.to_string_lossy(), URL])?;
    ensure!(out.contains("takeover: took over from the Python agent 1.0.3"), "no takeover line:\n{out}");
    let new_log = std::fs::read_to_string(&log)?;
    ensure!(
        new_log.starts_with(&old_log) && new_log[old_log.len()..].contains("took over from the Python agent 1.0.3"),
        "the old log is not kept with one takeover line after it:\n{new_log}"
    );
    for (p, b) in kept.iter().zip(&before) {
        ensure!(&std::fs::read(e(p))? == b, "/{p} changed in the takeover");
    }
    ensure!(!e("opt/xcp-vm-agent").exists(), "/opt/xcp-vm-agent is still there");
    let bk = e("var/backups/xcp-vm-agent-1.0.3");
    for f in ["opt-xcp-vm-agent/agent.py", "xcp-vm-agent.service", "README"] {
        ensure!(bk.join(f).exists(), "no {f} in /var/backups/xcp-vm-agent-1.0.3");
    }
    // uninstall.sh --root removes /etc/xcp-vm-agent and the log: the 1.0.3
    // config, certificates and log must survive in the backup (the README
    // once said they were kept while uninstall deleted them).
    let uninst = script(stage, "uninstall.sh", &["--root", &a.to_string_lossy()])?;
    ensure!(uninst.ok, "uninstall.sh --root after the takeover failed:\n{}", uninst.text);
    for (p, b) in kept.iter().zip(&before) {
        let copy = bk.join(p.replace("etc/xcp-vm-agent/", "etc-xcp-vm-agent/"));
        ensure!(
            std::fs::read(&copy).ok().as_ref() == Some(b),
            "after uninstall.sh --root, the 1.0.3 /{p} is not in the backup"
        );
    }
    ensure!(
        std::fs::read_to_string(bk.join("agent.log")).ok() == Some(old_log.clone()),
        "the 1.0.3 agent.log is not in the backup"
    );
    let readme = std::fs::read_to_string(bk.join("README"))?;
    ensure!(
        readme.contains("etc-xcp-vm-agent") && readme.contains("uninstall.sh --root removes them"),
        "README:\n{readme}"
    );
    install(stage, &["--root", &a.to_string_lossy(), URL])?;
    ensure!(mode(&bk)? == 0o700, "the backup is not 0700");
    let ours = std::fs::read_to_string(e("etc/systemd/system/xcp-vm-agent.service"))?;
    ensure!(ours.contains("ExecStart=/usr/local/bin/xcp-vm-agent "), "the unit is not ours:\n{ours}");
    let link = std::fs::read_link(e("etc/systemd/system/multi-user.target.wants/xcp-vm-agent.service"))?;
    ensure!(link == Path::new("/etc/systemd/system/xcp-vm-agent.service"), "enable link: {}", link.display());
    let grep = util::output(
        Command::new("grep").args(["-rl", "/opt/xcp-vm-agent"]).arg(e("etc/systemd")).stdin(Stdio::null()),
    );
    ensure!(grep.is_err(), "something under /etc/systemd still runs /opt/xcp-vm-agent: {grep:?}");
    eprintln!("    1.0.3 (stand-in): unit and /opt moved to /var/backups/xcp-vm-agent-1.0.3; config and certificates unchanged, log kept with the takeover line; our unit enabled");

    // A unit someone else wrote is left alone: refused.
    let other = "[Service]\nExecStart=/usr/local/bin/my-own-agent\n";
    std::fs::write(e("etc/systemd/system/xcp-vm-agent.service"), other)?;
    refused(stage, &["--root", &a.to_string_lossy(), URL], "written by someone else")?;
    ensure!(std::fs::read_to_string(e("etc/systemd/system/xcp-vm-agent.service"))? == other, "their unit changed");
    std::fs::remove_dir_all(&a)?;
    Ok(())
}

/// The image's owner is untrusted: links it plants must never make the
/// installer read or write a host file (issue 15 review: config.json -> a
/// host file was copied into the image and chmod 0600 on the host; a link
/// at the predictable temp name `config.json.tmp.$$` got the config written
/// through it). And a value spanning lines (`jq .` style) is refused, not
/// turned into invalid JSON.
fn hostile(stage: &Path, certs: &[PathBuf; 3]) -> Result<()> {
    let a = tree("systemd", "hostile")?;
    let host = scratch().join("host");
    std::fs::create_dir_all(&host)?;
    let secret = host.join("hostsecret.json");
    let secret_text = "{\"db_password\": \"HOST-SECRET\"}\n";
    std::fs::write(&secret, secret_text)?;
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    let victim = host.join("victim");
    std::fs::write(&victim, "HOST FILE\n")?;
    std::fs::set_permissions(&victim, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    let conf = a.join("etc/xcp-vm-agent");
    std::fs::create_dir_all(&conf)?;
    std::os::unix::fs::symlink(&secret, conf.join("config.json"))?;
    // The next 5000 process ids: one of them is install.sh's $$.
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/ns_last_pid")?.trim().parse()?;
    let bin = a.join("usr/local/bin");
    std::fs::create_dir_all(&bin)?;
    for pid in last + 1..last + 5001 {
        std::os::unix::fs::symlink(&victim, conf.join(format!("config.json.tmp.{pid}")))?;
        std::os::unix::fs::symlink(&victim, bin.join(format!("xcp-vm-agent.tmp.{pid}")))?;
    }
    let out = install(stage, &["--root", &a.to_string_lossy(), URL])?;
    ensure!(
        std::fs::read_to_string(&secret)? == secret_text,
        "the host file behind the image's config.json link changed"
    );
    ensure!(mode(&secret)? == 0o644, "the host file behind the image's config.json link became {:o}", mode(&secret)?);
    ensure!(std::fs::read(&victim)? == b"HOST FILE\n", "a host file was written through a planted temp name");
    ensure!(mode(&victim)? == 0o644, "a host file's mode changed through a planted temp name: {:o}", mode(&victim)?);
    // The link is followed as the guest would follow it: inside the tree.
    let inside = a.join(secret.strip_prefix("/")?);
    let cfg = std::fs::read_to_string(&inside)?;
    ensure!(!cfg.contains("HOST-SECRET"), "the host file's content went into the image:\n{cfg}");
    ensure!(cfg.contains(URL), "config.json does not name the server:\n{cfg}\n{out}");
    eprintln!("    config.json -> host file and 2 x 5000 planted temp-name links: no host file read or written");

    // "client_cert": [ on its own line: refused, config unchanged.
    let multi = "{\n  \"server_url\": \"https://old.example.invalid\",\n  \"client_cert\": [\n    \"/etc/a.pem\",\n    \"/etc/b.pem\"\n  ]\n}\n";
    let c = conf.join("config.json");
    std::fs::remove_file(&c)?;
    std::fs::write(&c, multi)?;
    let [cert, key, _] = certs;
    refused(
        stage,
        &["--root", &a.to_string_lossy(), URL, "--client-cert", &cert.to_string_lossy(), &key.to_string_lossy()],
        "spans several lines",
    )?;
    ensure!(std::fs::read_to_string(&c)? == multi, "the multi-line config was changed by a refused install");
    std::fs::remove_dir_all(&a)?;

    // A second takeover's backup goes to xcp-vm-agent-1.0.3.<time>: the image
    // may already have directories at the next seconds' names, with links
    // where the 1.0.3 unit, /opt and the README are put.
    let b = tree("systemd", "hostile-backup")?;
    let fixture = root().join("vm-tests/fixtures/python-agent-1.0.3/install-agent.sh");
    util::output(Command::new("sh").arg(&fixture).arg("--root").arg(&b).arg(URL))?;
    let hostdir = host.join("dir");
    std::fs::create_dir_all(&hostdir)?;
    let backups = b.join("var/backups");
    std::fs::create_dir_all(backups.join("xcp-vm-agent-1.0.3"))?;
    let names = util::output(
        Command::new("sh")
            .args(["-c", "n=$(date +%s); for i in $(seq -2 60); do date -u -d @$((n + i)) +%Y%m%d-%H%M%S; done"])
            .env_clear()
            .env("PATH", "/usr/bin:/bin"),
    )?;
    for t in names.lines() {
        let d = backups.join(format!("xcp-vm-agent-1.0.3.{t}"));
        std::fs::create_dir_all(&d)?;
        for f in ["xcp-vm-agent.service", "opt-xcp-vm-agent", "etc-xcp-vm-agent", "agent.log", "README"] {
            std::os::unix::fs::symlink(&hostdir, d.join(f))?;
        }
    }
    install(stage, &["--root", &b.to_string_lossy(), URL])?;
    let into: Vec<_> =
        std::fs::read_dir(&hostdir)?.map(|e| e.map(|e| e.file_name())).collect::<std::io::Result<_>>()?;
    ensure!(into.is_empty(), "the takeover moved or wrote {into:?} into a host directory through a planted backup dir");
    eprintln!("    backup directories planted at the next 60 s of names, with links to a host dir: nothing went there");
    std::fs::remove_dir_all(&b)?;
    std::fs::remove_dir_all(&host)?;
    Ok(())
}

fn refusals(stage: &Path) -> Result<()> {
    let d = scratch().join("not-a-root");
    if d.exists() {
        std::fs::remove_dir_all(&d)?;
    }
    std::fs::create_dir_all(d.join("data"))?;
    let ds = d.to_string_lossy().into_owned();
    refused(stage, &["--root", &ds, URL], "has no /etc: not a Linux root filesystem")?;
    std::fs::create_dir_all(d.join("etc"))?;
    refused(stage, &["--root", &ds, URL], "has no /etc/os-release")?;
    refused(stage, &["--root", "/", URL], "this machine's own /")?;
    let slash = scratch().join("slash");
    let _ = std::fs::remove_file(&slash);
    std::os::unix::fs::symlink("/", &slash)?;
    refused(stage, &["--root", &slash.to_string_lossy(), URL], "this machine's own /")?;
    refused(stage, &["--root", &ds, "http://mgmt.example.invalid"], "must start with https://")?;
    refused(stage, &["--root", &ds, "--image", "x.raw", URL], "not both")?;
    refused(stage, &["--root", &ds, URL, "--init", "upstart"], "--init takes systemd, openrc, sysv or standalone")?;
    let left: Vec<_> = std::fs::read_dir(d.join("etc"))?.collect();
    ensure!(left.is_empty() && !d.join("usr").exists(), "a refused install wrote into {ds}");
    std::fs::remove_dir_all(&d)?;
    std::fs::remove_file(&slash)?;
    Ok(())
}

/// A GPT disk image with one ext4 partition made from the tree at `src`
/// (mkfs.ext4 -d: no mount needed).
fn disk_image(src: &Path, out: &Path) -> Result<()> {
    let fs = out.with_extension("fs");
    let _ = std::fs::remove_file(&fs);
    let _ = std::fs::remove_file(out);
    util::run(Command::new("mkfs.ext4").args(["-q", "-L", "offroot", "-d"]).arg(src).arg(&fs).arg("400M"))?;
    std::fs::File::create(out)?.set_len(402 << 20)?;
    let mut sf = Command::new("sfdisk")
        .args(["-q", "--no-reread", "--no-tell-kernel"])
        .arg(out)
        .stdin(Stdio::piped())
        .spawn()?;
    use std::io::Write;
    sf.stdin.take().unwrap().write_all(b"label: gpt\nstart=2048, size=819200, type=L\n")?;
    ensure!(sf.wait()?.success(), "sfdisk on {} failed", out.display());
    util::run(Command::new("dd").arg(format!("if={}", fs.display())).arg(format!("of={}", out.display())).args([
        "bs=1M",
        "seek=1",
        "conv=notrunc,sparse",
        "status=none",
    ]))?;
    std::fs::remove_file(&fs)?;
    Ok(())
}

/// Loop devices attached to `file` (none must stay behind).
fn loops_of(file: &Path) -> Result<String> {
    util::output(Command::new("losetup").arg("-j").arg(file))
}

/// Nothing of an --image run is left: loop devices, mounts, temp dirs.
fn nothing_left(file: &Path) -> Result<()> {
    let l = loops_of(file)?;
    ensure!(l.trim().is_empty(), "loop devices left attached to {}: {l}", file.display());
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    let tmp = tmpdir()?;
    ensure!(!mounts.contains(&*tmp.to_string_lossy()), "mounts left under {}:\n{mounts}", tmp.display());
    let left: Vec<_> = std::fs::read_dir(&tmp)?.flatten().map(|e| e.path()).collect();
    ensure!(left.is_empty(), "temporary files left: {left:?}");
    Ok(())
}

/// Mount partition 1 of a raw image read-only and check what --image put there.
fn check_image(raw: &Path) -> Result<()> {
    let dev = util::output(Command::new("losetup").args(["--find", "--show", "--partscan", "--read-only"]).arg(raw))?;
    let dev = dev.trim().to_string();
    let mnt = scratch().join("check-mnt");
    std::fs::create_dir_all(&mnt)?;
    let r = (|| -> Result<()> {
        let part = format!("{dev}p1");
        // This machine's kernel does not scan partition tables: tell it (BLKPG).
        if !Path::new(&part).exists() {
            util::run(Command::new("partx").arg("-a").arg(&dev))?;
        }
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        while !Path::new(&part).exists() {
            ensure!(Instant::now() < deadline, "{part} did not appear");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        util::run(Command::new("mount").args(["-o", "ro"]).arg(&part).arg(&mnt))?;
        let r = check_common(&mnt, false).and_then(|_| {
            let l = std::fs::read_link(mnt.join("etc/systemd/system/multi-user.target.wants/xcp-vm-agent.service"))?;
            ensure!(l == Path::new("/etc/systemd/system/xcp-vm-agent.service"), "enable link {}", l.display());
            Ok(())
        });
        util::run(Command::new("umount").arg(&mnt))?;
        r
    })();
    let _ = Command::new("partx").arg("-d").arg(&dev).status();
    util::run(Command::new("losetup").arg("-d").arg(&dev))?;
    r
}

fn images(stage: &Path) -> Result<()> {
    let src = tree("systemd", "image-tree")?;
    let raw = scratch().join("disk.raw");
    let t = Instant::now();
    disk_image(&src, &raw)?;
    std::fs::remove_dir_all(&src)?;
    let qcow = scratch().join("disk.qcow2");
    let vhd = scratch().join("disk.vhd");
    for (f, fmt) in [(&qcow, "qcow2"), (&vhd, "vpc")] {
        let _ = std::fs::remove_file(f);
        util::run(Command::new("qemu-img").args(["convert", "-O", fmt]).arg(&raw).arg(f))?;
    }
    eprintln!("    built a 402 MiB GPT image and qcow2 and VHD copies in {:.1} s", t.elapsed().as_secs_f64());
    let raws = raw.to_string_lossy().into_owned();

    // Held open by another process: refused, nothing attached.
    let mut holder = Command::new("sleep").arg("60").stdin(std::fs::File::open(&raw)?).spawn()?;
    let r = refused(stage, &["--image", &raws, URL], &format!("is open by {} (sleep)", holder.id()));
    let _ = holder.kill();
    let _ = holder.wait();
    r?;
    nothing_left(&raw)?;

    // Ctrl-C while mounted: everything undone.
    interrupted(stage, &raw)?;
    nothing_left(&raw)?;

    let t = Instant::now();
    let out = install(stage, &["--image", &raws, URL])?;
    ensure!(out.contains("root filesystem: /dev/loop") && out.contains("detached"), "{out}");
    eprintln!("    raw: installed in {:.1} s", t.elapsed().as_secs_f64());
    nothing_left(&raw)?;
    check_image(&raw)?;

    let nbd = Path::new("/sys/block/nbd0").exists();
    let how = if nbd { "attached with qemu-nbd" } else { "attached with qemu-storage-daemon" };
    let back = scratch().join("disk-back.raw");
    for (f, fmt) in [(&qcow, "qcow2"), (&vhd, "vpc")] {
        let t = Instant::now();
        let out = install(stage, &["--image", &f.to_string_lossy(), URL])?;
        ensure!(out.contains(&format!("format {fmt})")) && out.contains(how), "{fmt}: expected {how:?}:\n{out}");
        eprintln!(
            "    {fmt}: installed in {:.1} s ({how}{})",
            t.elapsed().as_secs_f64(),
            if nbd { "" } else { ": this kernel has no nbd module" }
        );
        nothing_left(f)?;
        let _ = std::fs::remove_file(&back);
        util::run(Command::new("qemu-img").args(["convert", "-O", "raw"]).arg(f).arg(&back))?;
        check_image(&back)?;
    }

    // An image with no root filesystem: refused, and still nothing left.
    let empty = scratch().join("empty-tree");
    if empty.exists() {
        std::fs::remove_dir_all(&empty)?;
    }
    std::fs::create_dir_all(empty.join("data"))?;
    let blank = scratch().join("blank.raw");
    disk_image(&empty, &blank)?;
    refused(stage, &["--image", &blank.to_string_lossy(), URL], "no root filesystem (one with /etc/os-release)")?;
    nothing_left(&blank)?;
    for f in [&raw, &qcow, &vhd, &back, &blank] {
        std::fs::remove_file(f)?;
    }
    std::fs::remove_dir_all(&empty)?;
    Ok(())
}

/// install.sh --image paused after mounting (test hook), then Ctrl-C (SIGINT
/// to its whole process group, as a terminal sends it).
///
/// install.sh starts with SIGINT's default disposition, as from a terminal,
/// whatever this test was started with: a shell cannot trap a signal that
/// was ignored when it started, and a test run started in the background of
/// a non-interactive shell (`cmd &`, or under `nohup`) ignores SIGINT, which
/// every child inherits (a clean-clone run started that way went on past the
/// Ctrl-C and failed here).
fn interrupted(stage: &Path, raw: &Path) -> Result<()> {
    let mut child = Command::new("env")
        .args(["--default-signal=INT", "sh"])
        .arg(stage.join("install.sh"))
        .arg("--image")
        .arg(raw)
        .arg(URL)
        .env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .env("TMPDIR", tmpdir()?)
        .env("XCP_VM_AGENT_TEST_PAUSE", "60")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()?;
    let pid = child.id();
    let mut seen = String::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line?;
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("paused (test hook)") {
            ensure!(!loops_of(raw)?.trim().is_empty(), "paused, but no loop device is attached");
            util::run(Command::new("kill").args(["-INT", "--", &format!("-{pid}")]))?;
        }
    }
    let st = child.wait()?;
    ensure!(seen.contains("paused (test hook)"), "install.sh --image never paused:\n{seen}");
    ensure!(st.code() == Some(130) && seen.contains("interrupted"), "after Ctrl-C: {st}\n{seen}");
    eprintln!("    Ctrl-C while the image was mounted: exit 130, cleaned up");
    Ok(())
}

const LVM_CFG: &str = "devices { obtain_device_list_from_udev=0 } activation { udev_sync=0 udev_rules=0 }";

/// `lvm ARGS` restricted to one device, as this machine (no device-mapper,
/// no udev) allows.
fn lvm(dev: &str, args: &[&str]) -> Result<String> {
    util::output(
        Command::new("lvm")
            .arg(args[0])
            .args(["--devices", dev, "--config", LVM_CFG])
            .args(&args[1..])
            .env("LVM_SUPPRESS_FD_WARNINGS", "1"),
    )
}

const MIB: u64 = 1 << 20;

/// Mount `len` bytes at `offset` of `file` read-only, run `f` on the mount.
fn with_mounted(file: &Path, offset: u64, len: u64, f: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dev = util::output(
        Command::new("losetup")
            .args(["--find", "--show", "--read-only", "--offset", &offset.to_string(), "--sizelimit", &len.to_string()])
            .arg(file),
    )?;
    let dev = dev.trim().to_string();
    let mnt = scratch().join("check-mnt");
    std::fs::create_dir_all(&mnt)?;
    let r = util::run(Command::new("mount").args(["-o", "ro"]).arg(&dev).arg(&mnt)).and_then(|_| {
        let r = f(&mnt);
        util::run(Command::new("umount").arg(&mnt))?;
        r
    });
    util::run(Command::new("losetup").arg("-d").arg(&dev))?;
    r
}

/// A disk whose partition 1 is an LVM physical volume of VG `off-vg` with
/// linear volumes swap (4 extents), root and var (the tree's /var, mounted
/// from the image's fstab as /dev/mapper/off--vg-var). The volumes are
/// written into the VG's metadata with vgcfgrestore (lvcreate needs
/// device-mapper) and the filesystems copied in at their offsets.
fn lvm_image(stage: &Path) -> Result<()> {
    let t0 = Instant::now();
    let tree = tree("systemd", "lvm-tree")?;
    let var = scratch().join("lvm-var");
    if var.exists() {
        std::fs::remove_dir_all(&var)?;
    }
    std::fs::rename(tree.join("var"), &var)?;
    std::fs::create_dir(tree.join("var"))?;
    std::fs::write(
        tree.join("etc/fstab"),
        // With entries that are no disk of the image (tmpfs, bind, NFS,
        // noauto, a /var/cache elsewhere): once made the install refuse.
        "/dev/mapper/off--vg-root / ext4 defaults 0 1\n/dev/mapper/off--vg-var /var ext4 defaults 0 2\ntmpfs /var/tmp tmpfs defaults 0 0\n/srv/logs /var/log/xcp-vm-agent none bind 0 0\nnas:/export /var/lib/xcp-vm-agent nfs defaults 0 0\nUUID=00000000-dead /var/backups ext4 defaults,noauto 0 0\nUUID=00000000-beef /var/cache ext4 defaults 0 2\n",
    )?;
    let (root_fs, var_fs) = (scratch().join("lvm-root.fs"), scratch().join("lvm-var.fs"));
    let (swap_ext, root_ext, var_ext) = (4u64, 75u64, 8u64);
    for (src, fs, ext) in [(&tree, &root_fs, root_ext), (&var, &var_fs, var_ext)] {
        let _ = std::fs::remove_file(fs);
        util::run(Command::new("mkfs.ext4").args(["-q", "-d"]).arg(src).arg(fs).arg(format!("{}M", ext * 4)))?;
    }
    std::fs::remove_dir_all(&tree)?;
    std::fs::remove_dir_all(&var)?;
    let disk = scratch().join("lvm.raw");
    let _ = std::fs::remove_file(&disk);
    std::fs::File::create(&disk)?.set_len((4 + (swap_ext + root_ext + var_ext) * 4) * MIB)?;
    let mut sf = Command::new("sfdisk")
        .args(["-q", "--no-reread", "--no-tell-kernel"])
        .arg(&disk)
        .stdin(Stdio::piped())
        .spawn()?;
    use std::io::Write;
    sf.stdin.take().unwrap().write_all(b"label: gpt\nstart=2048, type=E6D6D379-F507-44C2-A23C-238F2A3DF928\n")?;
    ensure!(sf.wait()?.success(), "sfdisk failed");

    // The VG, on the partition through a loop device.
    let dev = util::output(Command::new("losetup").args(["--find", "--show", "--partscan"]).arg(&disk))?;
    let dev = dev.trim().to_string();
    let pv = format!("{dev}p1");
    let made = (|| -> Result<u64> {
        if !Path::new(&pv).exists() {
            util::run(Command::new("partx").arg("-a").arg(&dev))?;
        }
        lvm(&pv, &["pvcreate", "-q", &pv])?;
        lvm(&pv, &["vgcreate", "-q", "-s", "4m", "off-vg", &pv])?;
        let backup = scratch().join("off-vg.txt");
        lvm(&pv, &["vgcfgbackup", "-q", "-f", &backup.to_string_lossy(), "off-vg"])?;
        let mut text = std::fs::read_to_string(&backup)?;
        let lv = |name: &str, first: u64, count: u64| {
            let id = format!("{name:0<6}-0000-0000-0000-0000-0000-000000");
            format!(
                "\t\t{name} {{\n\t\t\tid = \"{id}\"\n\t\t\tstatus = [\"READ\", \"WRITE\", \"VISIBLE\"]\n\t\t\tflags = []\n\t\t\tsegment_count = 1\n\t\t\tsegment1 {{\n\t\t\t\tstart_extent = 0\n\t\t\t\textent_count = {count}\n\t\t\t\ttype = \"striped\"\n\t\t\t\tstripe_count = 1\n\t\t\t\tstripes = [\"pv0\", {first}]\n\t\t\t}}\n\t\t}}\n",
            )
        };
        let lvs = format!(
            "\tlogical_volumes {{\n{}{}{}\t}}\n",
            lv("swap", 0, swap_ext),
            lv("root", swap_ext, root_ext),
            lv("var", swap_ext + root_ext, var_ext)
        );
        let end = text.rfind('}').context("no end in the VG backup")?;
        text.insert_str(end, &lvs);
        std::fs::write(&backup, text)?;
        lvm(&pv, &["vgcfgrestore", "-q", "-f", &backup.to_string_lossy(), "off-vg"])?;
        let pe = lvm(&pv, &["pvs", "--noheadings", "--units", "b", "--nosuffix", "-o", "pe_start", &pv])?;
        Ok(pe.trim().parse()?)
    })();
    let _ = Command::new("partx").arg("-d").arg(&dev).status();
    util::run(Command::new("losetup").arg("-d").arg(&dev))?;
    let pe_start = made?;
    let base = MIB + pe_start;
    let (root_off, var_off) = (base + swap_ext * 4 * MIB, base + (swap_ext + root_ext) * 4 * MIB);
    for (fs, off) in [(&root_fs, root_off), (&var_fs, var_off)] {
        util::run(
            Command::new("dd").arg(format!("if={}", fs.display())).arg(format!("of={}", disk.display())).args([
                "bs=1M",
                &format!("seek={}", off / MIB),
                "conv=notrunc,sparse",
                "status=none",
            ]),
        )?;
        std::fs::remove_file(fs)?;
    }
    eprintln!(
        "    built a disk with LVM (swap, root, var; PV data at {pe_start} bytes) in {:.1} s",
        t0.elapsed().as_secs_f64()
    );

    let out = install(stage, &["--image", &disk.to_string_lossy(), URL])?;
    for want in [
        "LVM volume off-vg/root",
        "LVM volume off-vg/var",
        "mounted /dev/mapper/off--vg-var on /var",
        "not mounting /var/log/xcp-vm-agent (bind",
        "not mounting /var/lib/xcp-vm-agent (nfs",
        "not mounting /var/backups (defaults,noauto",
    ] {
        ensure!(out.contains(want), "install.sh --image on LVM did not say {want:?}:\n{out}");
    }
    nothing_left(&disk)?;
    with_mounted(&disk, root_off, root_ext * 4 * MIB, |m| {
        ensure!(m.join("usr/local/bin/xcp-vm-agent").exists(), "no binary on the root volume");
        ensure!(m.join("etc/systemd/system/multi-user.target.wants/xcp-vm-agent.service").is_symlink(), "not enabled");
        ensure!(
            !m.join("var/lib/xcp-vm-agent").exists(),
            "the state dir went onto the root volume, under /var's mount point"
        );
        Ok(())
    })?;
    with_mounted(&disk, var_off, var_ext * 4 * MIB, |m| {
        ensure!(mode(&m.join("lib/xcp-vm-agent"))? == 0o700, "state dir not on the var volume (or not 0700)");
        ensure!(mode(&m.join("log/xcp-vm-agent"))? == 0o750, "log dir not on the var volume (or not 0750)");
        Ok(())
    })?;
    eprintln!("    LVM: root found in off-vg/root, /var mounted from off-vg/var by the image's fstab, both written, nothing left attached");
    std::fs::remove_file(&disk)?;
    Ok(())
}

/// openSUSE and Fedora layout: one btrfs, root in a subvolume, /var in
/// another named by `subvol=` in the image's fstab. The mount once dropped
/// the option, so the state and log directories went into the top level.
fn btrfs_image(stage: &Path) -> Result<()> {
    let tree = tree("systemd", "btrfs-tree")?;
    let fs = scratch().join("btrfs.raw");
    let _ = std::fs::remove_file(&fs);
    std::fs::File::create(&fs)?.set_len(1024 * MIB)?;
    util::run(Command::new("mkfs.btrfs").args(["-q", "-L", "offbtrfs"]).arg(&fs))?;
    let uuid = util::output(Command::new("blkid").args(["-p", "-o", "value", "-s", "UUID"]).arg(&fs))?;
    let uuid = uuid.trim();
    std::fs::write(
        tree.join("etc/fstab"),
        format!("UUID={uuid} / btrfs subvol=@ 0 0\nUUID={uuid} /var btrfs defaults,subvol=@var,compress=zstd 0 0\n"),
    )?;
    let m = scratch().join("btrfs-mnt");
    std::fs::create_dir_all(&m)?;
    util::run(Command::new("mount").arg("-o").arg("loop").arg(&fs).arg(&m))?;
    let filled = util::run(Command::new("sh").args(["-ec", "btrfs -q subvolume create \"$1/@\"; btrfs -q subvolume create \"$1/@var\"; tar -C \"$2\" --exclude=./var -cf - . | tar -C \"$1/@\" -xf -; mkdir \"$1/@/var\"; tar -C \"$2/var\" -cf - . | tar -C \"$1/@var\" -xf -", "sh"]).arg(&m).arg(&tree));
    util::run(Command::new("umount").arg(&m))?;
    filled?;
    std::fs::remove_dir_all(&tree)?;

    let out = install(stage, &["--image", &fs.to_string_lossy(), URL])?;
    ensure!(out.contains("(subvol=@var)"), "/var not mounted with its subvolume:\n{out}");
    nothing_left(&fs)?;
    util::run(Command::new("mount").args(["-o", "loop,ro"]).arg(&fs).arg(&m))?;
    let checked = (|| -> Result<()> {
        ensure!(m.join("@/usr/local/bin/xcp-vm-agent").exists(), "no binary in subvolume @");
        ensure!(mode(&m.join("@var/lib/xcp-vm-agent"))? == 0o700, "state dir not in subvolume @var");
        ensure!(m.join("@var/log/xcp-vm-agent").is_dir(), "log dir not in subvolume @var");
        ensure!(!m.join("lib").exists() && !m.join("log").exists(), "files went into the top level of the btrfs");
        ensure!(!m.join("@/var/lib").exists(), "files went under @'s /var mount point");
        Ok(())
    })();
    util::run(Command::new("umount").arg(&m))?;
    checked?;
    eprintln!("    btrfs: root found in subvolume @, /var mounted from @var by the fstab's subvol=, files in @var");
    std::fs::remove_file(&fs)?;
    Ok(())
}

/// Root on XFS (debian-13's layout, and RHEL's), the image a clone of
/// another whose filesystem is mounted on this machine: both carry the same
/// XFS UUID, and XFS refuses a second mount of one UUID unless `nouuid`.
/// Two clones of one template injected at once once failed this way.
fn xfs_clone_image(stage: &Path) -> Result<()> {
    let tree = tree("systemd", "xfs-tree")?;
    let fs = scratch().join("xfs.raw");
    let clone = scratch().join("xfs-clone.raw");
    for f in [&fs, &clone] {
        let _ = std::fs::remove_file(f);
    }
    std::fs::File::create(&fs)?.set_len(512 * MIB)?;
    util::run(Command::new("mkfs.xfs").args(["-q", "-L", "offxfs"]).arg(&fs))?;
    let m = scratch().join("xfs-mnt");
    std::fs::create_dir_all(&m)?;
    util::run(Command::new("mount").arg("-o").arg("loop").arg(&fs).arg(&m))?;
    let filled = util::run(
        Command::new("sh").args(["-ec", "tar -C \"$2\" -cf - . | tar -C \"$1\" -xf -", "sh"]).arg(&m).arg(&tree),
    );
    util::run(Command::new("umount").arg(&m))?;
    filled?;
    std::fs::remove_dir_all(&tree)?;
    util::run(Command::new("cp").arg("--sparse=always").arg(&fs).arg(&clone))?;

    // The clone mounted (as another install.sh --image on it would hold it).
    let other = scratch().join("xfs-other");
    std::fs::create_dir_all(&other)?;
    util::run(Command::new("mount").args(["-o", "loop,ro"]).arg(&clone).arg(&other))?;
    let out = install(stage, &["--image", &fs.to_string_lossy(), URL]);
    util::run(Command::new("umount").arg(&other))?;
    let out = out.context("install.sh --image on an XFS image while a clone of it is mounted")?;
    ensure!(out.contains("root filesystem: /dev/loop") && out.contains("detached"), "{out}");
    nothing_left(&fs)?;
    util::run(Command::new("mount").args(["-o", "loop,ro"]).arg(&fs).arg(&m))?;
    let checked = (|| -> Result<()> {
        ensure!(m.join("usr/local/bin/xcp-vm-agent").exists(), "no binary on the XFS root");
        ensure!(m.join("etc/systemd/system/multi-user.target.wants/xcp-vm-agent.service").is_symlink(), "not enabled");
        Ok(())
    })();
    util::run(Command::new("umount").arg(&m))?;
    checked?;
    eprintln!("    XFS: installed into a clone's image while the other clone (same XFS UUID) was mounted");
    std::fs::remove_file(&fs)?;
    std::fs::remove_file(&clone)?;
    Ok(())
}
