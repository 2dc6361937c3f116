//! `cargo xtask vm-test`: one booted-VM smoke test of the packaged agent.
//!
//! Proves what no loop-device test can: that InitializeDisk, run by the
//! service the .deb ships (its unit file, hardening and all) under a real
//! systemd PID 1, mounts the new filesystem so that it is visible OUTSIDE
//! the service's own mount namespace (docs/disk-safety item 27: the agent
//! mounts through `systemctl start X.mount`), and that the fstab entry
//! brings the mount back after a reboot.
//!
//! Flow: a Debian bookworm rootfs (mmdebstrap, cached in target/vmtest/) gets
//! the real .deb from `cargo xtask dist` (dpkg -i in a chroot: nothing may
//! start), a config pointing at `mgmt-server` on this machine's loopback, and
//! two small probe units that run outside the agent's sandbox and print
//! `VMTEST ...` markers on the serial console. QEMU (TCG) boots it twice:
//! boot 1 checks the agent in, the host queues InitializeDisk for the data
//! disk by its virtio serial, the probe sees `/data` mounted from outside and
//! writes a file; boot 2 finds `/data` mounted from fstab and reads it back,
//! then the host grows the data disk while the VM runs (QMP `block_resize`,
//! 512 MiB to 1 GiB) and queues ExtendPartition for `/data`: partition and
//! ext4 must grow ONLINE (mounted), through the service, and the probe must
//! see the larger `/data` from outside it (a virtio serial port tells the
//! probe the job ended). Online resize2fs needs CAP_SYS_RESOURCE, which
//! container tests lack: only this test shows it works under the real unit.
//!
//! Guest network: QEMU user networking with `restrict=on` (the guest reaches
//! nothing) plus one `guestfwd` from 10.0.2.100:8443 in the guest to the
//! server's port on 127.0.0.1 here; the guest calls it `mgmt.test`, a name the
//! test PKI's server certificate carries (`mgmt-server init-pki --san`).
use crate::util::{self, cargo, have, http_json, is_root, root, step};
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::io::{BufRead, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const HELP: &str = "\
cargo xtask vm-test [--keep] [--accel tcg|kvm] [--deb PATH]

Boots a Debian bookworm VM (QEMU, software emulation by default) with the real
.deb from `cargo xtask dist` installed and its systemd unit in charge, and
checks, with mgmt-server running on this machine's loopback:
  boot 1: the service is active and checks in; InitializeDisk on the data disk
          (/dev/disk/by-id/virtio-DATA1, ext4, /data) succeeds through the
          service; a probe unit OUTSIDE the service sees /data mounted (in PID
          1's mount namespace) and writes a file there; the VM powers off
  boot 2: /data is mounted again from its fstab entry; the file reads back;
          the host grows the data disk 512 MiB -> 1 GiB with QMP block_resize
          while the VM runs, ExtendPartition /data (through the service) grows
          partition and ext4 online (mounted); the probe sees /data larger
          from outside the service and the file still reads back
Progress lines for each step; on failure the console log tail is printed and
the work directory (target/vmtest/run) is kept. Takes about 1-2 minutes
(the first run also builds the cached base rootfs, about 1 minute).

Needs root (mmdebstrap, chroot). Installs QEMU from bookworm-backports with
apt-get when it is missing (as root; otherwise prints the command).

Options:
  --keep          keep target/vmtest/run (image, console logs, server state)
  --accel A       QEMU accelerator (default tcg: this machine's KVM does not boot guests)
  --deb PATH      install this .deb instead of building one with `cargo xtask dist`
  -h, --help      this text
";

const SUITE: &str = "bookworm";
/// On top of minbase: an init, udev (for /dev/disk/by-id), a kernel with its
/// initramfs, and what the .deb depends on (so dpkg -i needs no network).
const BASE_INCLUDE: &str = "systemd,systemd-sysv,udev,linux-image-cloud-amd64,initramfs-tools,\
cloud-guest-utils,parted,gdisk,e2fsprogs,xfsprogs,util-linux";
/// The name the guest uses for the management server (in the server cert).
const SERVER_NAME: &str = "mgmt.test";
/// Where the guest reaches the server (guestfwd to the host's loopback).
const GUEST_FWD_ADDR: &str = "10.0.2.100";
const GUEST_FWD_PORT: u16 = 8443;
const DATA_SERIAL: &str = "DATA1";
/// The data disk: blank at this size, grown to DATA_GROWN in boot 2.
const DATA_SIZE: u64 = 512 << 20;
const DATA_GROWN: u64 = 1 << 30;
const VM_UUID: &str = "6b1d3c6e-0f3a-4c55-9d7e-5a1e2b3c4d5e";
/// Per-boot limit (TCG boot is ~30 s; mkfs and the job add some).
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

/// The agent's, PID 1's and the probe's mount namespaces from the probe's
/// `NAMESPACES agent=mnt:[N] pid1=mnt:[N] probe=mnt:[N]` line. Each must be
/// a real reading: an empty one (MainPID 0, readlink failed) would differ
/// from PID 1's and pass the sandbox check while proving nothing.
fn parse_namespaces(line: &str) -> Result<(String, String, String)> {
    let get = |key: &str| -> Result<String> {
        let v = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
            .with_context(|| format!("no {key}= in the NAMESPACES line {line:?}"))?;
        let n = v.strip_prefix("mnt:[").and_then(|r| r.strip_suffix(']'));
        ensure!(
            n.is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())),
            "{key}'s mount namespace reads {v:?}, not mnt:[N]: {line:?}"
        );
        Ok(v.to_string())
    };
    Ok((get("agent")?, get("pid1")?, get("probe")?))
}

fn info(msg: &str) {
    eprintln!("    {msg}");
}

fn work() -> PathBuf {
    root().join("target/vmtest")
}

pub fn run(args: &[String]) -> Result<()> {
    let mut keep = false;
    let mut accel = "tcg".to_string();
    let mut deb: Option<PathBuf> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-h" | "--help" => {
                print!("{HELP}");
                return Ok(());
            }
            "--keep" => keep = true,
            "--accel" => accel = it.next().context("--accel needs a value")?.clone(),
            "--deb" => deb = Some(PathBuf::from(it.next().context("--deb needs a value")?)),
            other => bail!("unknown option {other:?}\n\n{HELP}"),
        }
    }
    let t0 = Instant::now();
    if !is_root() {
        bail!("cargo xtask vm-test needs root (mmdebstrap --mode=root, chroot, dpkg -i into the image)");
    }
    ensure_tools()?;

    let deb = match deb {
        Some(d) => d,
        None => {
            step("vm-test: building the .deb (cargo xtask dist)");
            crate::dist::run(&[])?;
            root().join("target/dist").join(crate::dist::deb_name(&crate::dist::workspace_version()?))
        }
    };
    ensure!(deb.exists(), "{} does not exist", deb.display());
    step("vm-test: building mgmt-server");
    util::run(cargo().args(["build", "-q", "-p", "vm-tests", "--bin", "mgmt-server"]))?;
    let server_bin = target_dir().join("debug/mgmt-server");

    let base = base_rootfs()?;
    let dir = work().join("run");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;

    let mut t = VmTest { dir: dir.clone(), server: None, qemu: None, console: PathBuf::new(), admin: String::new() };
    let r = t.run_all(&server_bin, &base, &deb, &accel);
    t.stop();
    match &r {
        Ok(()) => {
            step(&format!("vm-test: PASSED in {:.0} s", t0.elapsed().as_secs_f64()));
            if keep {
                info(&format!("work directory kept: {}", dir.display()));
            } else {
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
        Err(_) => {
            for name in ["console-boot1.log", "console-boot2.log"] {
                let p = dir.join(name);
                if p.exists() {
                    eprintln!("\n--- last 60 lines of {} ---", p.display());
                    eprintln!("{}", tail(&p, 60));
                }
            }
            let p = dir.join("server.log");
            if p.exists() {
                eprintln!("\n--- last 20 lines of {} ---", p.display());
                eprintln!("{}", tail(&p, 20));
            }
            eprintln!("\n    work directory kept: {}", dir.display());
        }
    }
    r
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("target"))
}

fn tail(p: &Path, n: usize) -> String {
    let text = strip_ansi(&String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).replace('\r', ""));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// qemu-system-x86_64 (from bookworm-backports) and mmdebstrap.
fn ensure_tools() -> Result<()> {
    const SOURCES: &str = "/etc/apt/sources.list.d/debian.sources";
    const SED: &str = "0,/^Suites: bookworm bookworm-updates$/s//Suites: bookworm bookworm-updates bookworm-backports/";
    let mut missing = Vec::new();
    if !have("mmdebstrap") {
        missing.push("mmdebstrap");
    }
    if !have("qemu-system-x86_64") {
        missing.push("qemu-system-x86");
    }
    if missing.is_empty() {
        return Ok(());
    }
    let cmd = format!(
        "sed -i -E '{SED}' {SOURCES} && apt-get update && apt-get install -y -t bookworm-backports {}",
        missing.join(" ")
    );
    if !have("apt-get") || !Path::new(SOURCES).exists() {
        bail!("missing {}; on Debian 12 install them (as root) with:\n    {cmd}", missing.join(", "));
    }
    step(&format!("vm-test: installing {} (QEMU from bookworm-backports)", missing.join(" ")));
    let text = std::fs::read_to_string(SOURCES)?;
    if !text.contains("bookworm-backports") {
        util::run(Command::new("sed").args(["-i", "-E", SED, SOURCES]))?;
        ensure!(
            std::fs::read_to_string(SOURCES)?.contains("bookworm-backports"),
            "{SOURCES} has no `Suites: bookworm bookworm-updates` line to add bookworm-backports to; run:\n    {cmd}"
        );
    }
    util::run(Command::new("apt-get").args(["update", "-q"]))?;
    util::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "-t", "bookworm-backports"])
            .args(&missing),
    )?;
    Ok(())
}

/// The cached base rootfs tarball (mmdebstrap on first use or when the
/// package list changed).
fn base_rootfs() -> Result<PathBuf> {
    let tar = work().join(format!("base-{SUITE}.tar"));
    let t = Instant::now();
    if util::debian_tarball(&tar, SUITE, BASE_INCLUDE, "vm-test")? {
        info(&format!("built in {:.0} s", t.elapsed().as_secs_f64()));
    } else {
        step(&format!("vm-test: base rootfs cached ({})", tar.display()));
    }
    Ok(tar)
}

struct VmTest {
    dir: PathBuf,
    server: Option<Child>,
    qemu: Option<Child>,
    console: PathBuf,
    admin: String,
}

/// The guest's probe: `vmtest-probe pre` (ordered before the agent) and
/// `vmtest-probe main` (after it). Runs in PID 1's mount namespace, without
/// any of the agent's sandboxing, and prints `VMTEST ...` lines on the console.
const PROBE: &str = r#"#!/bin/bash
# vm-test probe: runs OUTSIDE xcp-vm-agent.service (no sandboxing), prints
# VMTEST markers on the console, powers the VM off when done.
say() { echo "VMTEST $*"; }
diag() {
    echo "--- journal of xcp-vm-agent ---"; journalctl -u xcp-vm-agent --no-pager -n 40
    echo "--- /etc/fstab ---"; cat /etc/fstab
    echo "--- findmnt ---"; findmnt -l
}
fail() { say "FAIL $*"; diag; systemctl poweroff; exit 1; }
arg() { sed -n "s/.*vmtest\.$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
# wait_for SECONDS CMD...: run CMD every second until it succeeds.
wait_for() {
    local n=$1; shift
    for _ in $(seq "$n"); do "$@" && return 0; sleep 1; done
    return 1
}
boot=$(arg boot)
token=$(arg token)
case "$1.$boot" in
pre.1)
    if findmnt -n /data >/dev/null; then fail "/data is mounted before the agent ran"; fi
    say "DATA-NOT-MOUNTED-BEFORE"
    ;;
pre.*) ;;
main.1)
    wait_for 120 systemctl is-active --quiet xcp-vm-agent || fail "xcp-vm-agent is not active"
    say "AGENT-ACTIVE"
    pid=$(systemctl show -p MainPID --value xcp-vm-agent)
    say "NAMESPACES agent=$(readlink /proc/"$pid"/ns/mnt) pid1=$(readlink /proc/1/ns/mnt) probe=$(readlink /proc/self/ns/mnt)"
    wait_for 120 findmnt -n /data >/dev/null || fail "/data did not become visible outside the service"
    say "MOUNT-VISIBLE $(findmnt -n -o SOURCE,FSTYPE,TARGET /data)"
    grep -q ' /data ' /proc/1/mountinfo || fail "/data is not in PID 1's mount namespace"
    say "MOUNT-IN-PID1-NAMESPACE"
    say "FSTAB $(grep ' /data ' /etc/fstab)"
    echo "$token" > /data/vmtest-token || fail "cannot write /data/vmtest-token"
    sync
    say "WROTE $token"
    say "BOOT1-DONE"
    systemctl poweroff
    ;;
main.2)
    wait_for 90 findmnt -n /data >/dev/null || fail "/data is not mounted after the reboot"
    say "BOOT2-MOUNTED $(findmnt -n -o SOURCE,FSTYPE,TARGET /data)"
    say "MOUNT-UNIT-SOURCE $(systemctl show -p SourcePath --value data.mount)"
    say "READ $(cat /data/vmtest-token)"
    wait_for 60 systemctl is-active --quiet xcp-vm-agent || fail "xcp-vm-agent is not active after the reboot"
    say "AGENT-ACTIVE"
    # Online growth: the host grows the data disk (QMP block_resize) while
    # /data stays mounted, then runs ExtendPartition through the service and
    # says so on the signal port; this probe checks the result from outside.
    disk=/dev/disk/by-id/virtio-DATA1
    disk_before=$(blockdev --getsize64 "$disk") || fail "cannot read the size of $disk"
    fs_before=$(findmnt -bno SIZE /data) || fail "cannot read the size of /data"
    say "SIZES-BEFORE disk=$disk_before fs=$fs_before"
    say "READY-FOR-RESIZE"
    grown() { [ "$(blockdev --getsize64 "$disk")" -gt "$disk_before" ]; }
    wait_for 60 grown || fail "the kernel did not see $disk grow within 60 s"
    say "DISK-GROWN $(blockdev --getsize64 "$disk")"
    # The host's word that ExtendPartition ended (EOF while the host is not
    # connected: try again until the deadline).
    msg=
    end=$((SECONDS + 150))
    while [ "$SECONDS" -lt "$end" ]; do
        msg=$(timeout 5 head -n 1 /dev/virtio-ports/vmtest.signal 2>/dev/null) && [ -n "$msg" ] && break
        sleep 1
    done
    [ -n "$msg" ] || fail "no word from the host on the signal port within the deadline"
    say "SIGNAL $msg"
    fs_after=$(findmnt -bno SIZE /data)
    [ "$fs_after" -gt "$fs_before" ] || fail "/data did not grow: $fs_before -> $fs_after bytes"
    findmnt -n /data >/dev/null || fail "/data is no longer mounted"
    say "FS-GROWN before=$fs_before after=$fs_after"
    say "DF $(df -B1 --output=source,size,target /data | tail -n 1)"
    say "READ-AFTER $(cat /data/vmtest-token)"
    say "BOOT2-DONE"
    systemctl poweroff
    ;;
*) fail "unknown mode $1.$boot" ;;
esac
"#;

const PRE_UNIT: &str = "\
[Unit]
Description=vm-test probe: /data before the agent starts
Before=xcp-vm-agent.service

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/vmtest-probe pre
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
";

const MAIN_UNIT: &str = "\
[Unit]
Description=vm-test probe: the agent's mount seen from outside its service
After=xcp-vm-agent.service

[Service]
Type=simple
ExecStart=/usr/local/sbin/vmtest-probe main
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
";

impl VmTest {
    fn run_all(&mut self, server_bin: &Path, base: &Path, deb: &Path, accel: &str) -> Result<()> {
        let pki = self.dir.join("pki");
        step(&format!("vm-test: test PKI (server certificate also for {SERVER_NAME}) and mgmt-server on loopback"));
        util::run(
            Command::new(server_bin).arg("init-pki").arg(&pki).args(["--san", SERVER_NAME]).stdout(Stdio::null()),
        )?;
        let port = self.start_server(server_bin, &pki)?;

        let (kernel, initrd, root_img, data_img) = self.build_image(base, deb, &pki)?;
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let token = format!("t{:x}", nanos as u64 ^ u64::from(std::process::id()));

        // Boot 1.
        let b1 = Instant::now();
        step("vm-test: boot 1 (TCG takes ~30 s to reach the agent)");
        self.boot(1, accel, port, &kernel, &initrd, &root_img, &data_img, &token)?;
        let agent = self.wait_for_agent(b1)?;
        info(&format!(
            "{:>5.1} s  agent checked in: vm_uuid {} (from {}), version {}",
            b1.elapsed().as_secs_f64(),
            agent["vm_uuid"].as_str().unwrap_or("?"),
            agent["identity"]["source"].as_str().unwrap_or("?"),
            agent["agent_version"].as_str().unwrap_or("?")
        ));
        step("vm-test: queueing InitializeDisk /dev/disk/by-id/virtio-DATA1 -> ext4 on /data");
        let job = self.run_job(
            b1,
            json!({
                "vm_uuid": VM_UUID,
                "operation": "InitializeDisk",
                "params": {
                    "device": format!("/dev/disk/by-id/virtio-{DATA_SERIAL}"),
                    "filesystem": "ext4",
                    "mount_point": "/data",
                    "label": "vmdata",
                }
            }),
        )?;
        let d = &job["result"]["details"];
        info(&format!("fstab line    {}", d["fstab_line"].as_str().unwrap_or("?")));
        info(&format!("mount method  {}", d["mount_method"].as_str().unwrap_or("?")));
        ensure!(
            job["status"] == "succeeded",
            "InitializeDisk ended {}: {}\n{}",
            job["status"],
            job["result"]["message"],
            serde_json::to_string_pretty(&job["result"]).unwrap_or_default()
        );
        ensure!(
            d["mount_method"].as_str().unwrap_or("").starts_with("systemd unit"),
            "the agent did not mount through systemd (mount_method {})",
            d["mount_method"]
        );
        step("vm-test: waiting for the guest probe (outside the service) and the power-off");
        self.wait_poweroff(b1)?;
        let c1 = self.console_markers();
        for m in ["DATA-NOT-MOUNTED-BEFORE", "AGENT-ACTIVE", "MOUNT-VISIBLE", "MOUNT-IN-PID1-NAMESPACE", "BOOT1-DONE"] {
            need_marker(&c1, m)?;
        }
        let ns = need_marker(&c1, "NAMESPACES")?;
        info(&format!("NAMESPACES {ns}"));
        let (agent_ns, pid1_ns, probe_ns) = parse_namespaces(&ns)?;
        ensure!(
            agent_ns != pid1_ns,
            "the agent shares PID 1's mount namespace ({ns}): the unit's sandboxing is not in force, so the test \
             proves nothing"
        );
        ensure!(probe_ns == pid1_ns, "the probe is not in PID 1's mount namespace ({ns})");
        ensure!(need_marker(&c1, "WROTE")? == token, "boot 1 wrote an unexpected token");
        info(&format!("MOUNT-VISIBLE {}", need_marker(&c1, "MOUNT-VISIBLE")?));
        info(&format!("FSTAB {}", need_marker(&c1, "FSTAB")?));
        info(&format!("boot 1 done in {:.0} s", b1.elapsed().as_secs_f64()));

        // Boot 2.
        let b2 = Instant::now();
        step("vm-test: boot 2 (the mount must come back from fstab; then the online growth)");
        self.boot(2, accel, port, &kernel, &initrd, &root_img, &data_img, &token)?;
        // Connected from the start: the guest reads EOF from the port while
        // no host end is connected.
        let sig_path = self.signal_path(2);
        let mut signal = self.connect(&sig_path, b2)?;
        let ready = self.wait_marker(b2, "SIZES-BEFORE")?;
        self.wait_marker(b2, "READY-FOR-RESIZE")?;
        info(&format!("{:>5.1} s  /data mounted from fstab, token read back; {ready}", b2.elapsed().as_secs_f64()));
        step(&format!(
            "vm-test: growing the data disk to {} MiB with QMP block_resize, the VM running",
            DATA_GROWN >> 20
        ));
        self.qmp_block_resize(2, b2, DATA_GROWN)?;
        let grown = self.wait_marker(b2, "DISK-GROWN")?;
        info(&format!("{:>5.1} s  the guest kernel sees the data disk as {grown} bytes", b2.elapsed().as_secs_f64()));
        ensure!(grown == DATA_GROWN.to_string(), "the guest sees the data disk as {grown} bytes, not {DATA_GROWN}");
        step("vm-test: queueing ExtendPartition /data (mounted)");
        let job = self.run_job(
            b2,
            json!({"vm_uuid": VM_UUID, "operation": "ExtendPartition", "params": {"mount_point": "/data"}}),
        )?;
        let d = &job["result"]["details"];
        ensure!(
            job["status"] == "succeeded",
            "ExtendPartition ended {}: {}\n{}",
            job["status"],
            job["result"]["message"],
            serde_json::to_string_pretty(&job["result"]).unwrap_or_default()
        );
        info(&format!("message       {}", job["result"]["message"].as_str().unwrap_or("?")));
        let num = |k: &str| d[k].as_u64().with_context(|| format!("ExtendPartition's details have no number {k}: {d}"));
        let (pb, pa) = (num("partition_bytes_before")?, num("partition_bytes_after")?);
        let (fb, fa) = (num("filesystem_bytes_before")?, num("filesystem_bytes_after")?);
        info(&format!("partition     {} {pb} -> {pa} bytes", d["device"].as_str().unwrap_or("?")));
        info(&format!("filesystem    {fb} -> {fa} bytes"));
        ensure!(pa > pb, "the partition did not grow ({pb} -> {pa} bytes)");
        ensure!(fa > fb, "the filesystem did not grow ({fb} -> {fa} bytes)");
        let how = d["steps"][0]["how"].as_str().unwrap_or("");
        info(&format!("how           {how}"));
        ensure!(how.contains("online"), "the filesystem was not grown online (steps: {})", d["steps"]);
        writeln!(signal, "EXTENDED {fa}").context("cannot signal the guest probe")?;
        step("vm-test: waiting for the guest probe to see /data grown, and the power-off");
        self.wait_poweroff(b2)?;
        drop(signal);
        let c2 = self.console_markers();
        let mounted = need_marker(&c2, "BOOT2-MOUNTED")?;
        info(&format!("BOOT2-MOUNTED {mounted}"));
        let src = need_marker(&c2, "MOUNT-UNIT-SOURCE")?;
        info(&format!("data.mount SourcePath {src}"));
        ensure!(src == "/etc/fstab", "data.mount did not come from /etc/fstab (SourcePath {src:?})");
        let read = need_marker(&c2, "READ")?;
        ensure!(read == token, "boot 2 read {read:?} from /data/vmtest-token, boot 1 wrote {token:?}");
        info(&format!("READ {read} (as written in boot 1)"));
        need_marker(&c2, "AGENT-ACTIVE")?;
        let fs = need_marker(&c2, "FS-GROWN")?;
        info(&format!("FS-GROWN {fs} (findmnt -b, outside the service)"));
        info(&format!("DF {}", need_marker(&c2, "DF")?));
        let read = need_marker(&c2, "READ-AFTER")?;
        ensure!(read == token, "after the growth /data/vmtest-token reads {read:?}, not {token:?}");
        info(&format!("READ-AFTER {read}"));
        need_marker(&c2, "BOOT2-DONE")?;
        info(&format!("boot 2 done in {:.0} s", b2.elapsed().as_secs_f64()));
        Ok(())
    }

    /// Start `mgmt-server serve` on free loopback ports; returns the agent API port.
    fn start_server(&mut self, bin: &Path, pki: &Path) -> Result<u16> {
        let mut child = Command::new(bin)
            .args(["serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--pki"])
            .arg(pki)
            .arg("--state")
            .arg(self.dir.join("server-state"))
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(self.dir.join("server.log"))?)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line)?;
        self.server = Some(child);
        let https = line.split_whitespace().find(|w| w.starts_with("https://")).context("no https address")?;
        self.admin = line.split_whitespace().find(|w| w.starts_with("http://")).context("no admin address")?.into();
        let port: u16 = https.rsplit(':').next().and_then(|p| p.trim_end_matches('/').parse().ok()).context("port")?;
        info(&format!("agent API {https} (guest: https://{SERVER_NAME}:{GUEST_FWD_PORT}), admin API {}", self.admin));
        Ok(port)
    }

    /// Unpack the base rootfs, install the .deb, configure, make the ext4 image.
    fn build_image(&self, base: &Path, deb: &Path, pki: &Path) -> Result<(PathBuf, PathBuf, PathBuf, PathBuf)> {
        let t = Instant::now();
        step(&format!("vm-test: root image: base rootfs + dpkg -i {}", deb.file_name().unwrap().to_string_lossy()));
        let rootfs = self.dir.join("rootfs");
        std::fs::create_dir_all(&rootfs)?;
        util::run(Command::new("tar").arg("-xf").arg(base).arg("-C").arg(&rootfs))?;
        let deb_in = rootfs.join("tmp").join(deb.file_name().unwrap());
        std::fs::copy(deb, &deb_in)?;
        let out = util::output(
            Command::new("chroot")
                .arg(&rootfs)
                .args(["dpkg", "-i"])
                .arg(Path::new("/tmp").join(deb.file_name().unwrap()))
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
        for l in out.lines().filter(|l| l.starts_with("Setting up")) {
            info(l);
        }
        std::fs::remove_file(&deb_in)?;

        let etc = rootfs.join("etc");
        let agent_pki = etc.join("xcp-vm-agent/pki");
        std::fs::create_dir_all(&agent_pki)?;
        for (f, mode) in [("ca.pem", 0o644), ("agent-cert.pem", 0o644), ("agent-key.pem", 0o600)] {
            std::fs::copy(pki.join(f), agent_pki.join(f))?;
            set_mode(&agent_pki.join(f), mode)?;
        }
        let config = json!({
            "server_url": format!("https://{SERVER_NAME}:{GUEST_FWD_PORT}"),
            "server_cert": "/etc/xcp-vm-agent/pki/ca.pem",
            "client_cert": ["/etc/xcp-vm-agent/pki/agent-cert.pem", "/etc/xcp-vm-agent/pki/agent-key.pem"],
            "check_in_interval": 5,
            "log_level": "debug",
        });
        let cfg = etc.join("xcp-vm-agent/config.json");
        std::fs::write(&cfg, serde_json::to_vec_pretty(&config)?)?;
        set_mode(&cfg, 0o600)?;
        std::fs::write(etc.join("hostname"), "vmtest\n")?;
        std::fs::write(
            etc.join("hosts"),
            format!("127.0.0.1 localhost\n127.0.1.1 vmtest\n{GUEST_FWD_ADDR} {SERVER_NAME}\n"),
        )?;
        std::fs::write(etc.join("fstab"), "LABEL=vmroot / ext4 defaults 0 1\n")?;
        std::fs::write(etc.join("machine-id"), format!("{:032x}\n", 0x7a3c_u128 << 64 | std::process::id() as u128))?;
        std::fs::create_dir_all(etc.join("systemd/network"))?;
        std::fs::write(
            etc.join("systemd/network/50-vmtest.network"),
            "[Match]\nType=ether\n\n[Network]\nAddress=10.0.2.15/24\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n",
        )?;
        let probe = rootfs.join("usr/local/sbin/vmtest-probe");
        std::fs::create_dir_all(probe.parent().unwrap())?;
        std::fs::write(&probe, PROBE)?;
        set_mode(&probe, 0o755)?;
        std::fs::write(etc.join("systemd/system/vmtest-pre.service"), PRE_UNIT)?;
        std::fs::write(etc.join("systemd/system/vmtest-probe.service"), MAIN_UNIT)?;
        // In boot 2 the agent starts only after /data is mounted from fstab:
        // the case where a filesystem mounted before the service started must
        // still be writable inside it (online growth). Ordering only; boot 1
        // has no data.mount, and then it changes nothing.
        let dropin = etc.join("systemd/system/xcp-vm-agent.service.d");
        std::fs::create_dir_all(&dropin)?;
        std::fs::write(dropin.join("vmtest-order.conf"), "[Unit]\nAfter=data.mount\n")?;
        util::output(Command::new("chroot").arg(&rootfs).args([
            "systemctl",
            "enable",
            "systemd-networkd.service",
            "systemd-networkd-wait-online.service",
            "vmtest-pre.service",
            "vmtest-probe.service",
        ]))?;
        // The package enabled the service at install time, as on any machine
        // (the link is absolute inside the guest: look at the link itself).
        let wants = etc.join("systemd/system/multi-user.target.wants/xcp-vm-agent.service");
        ensure!(
            wants.symlink_metadata().is_ok(),
            "dpkg -i did not enable xcp-vm-agent.service ({} missing)",
            wants.display()
        );

        let boot = rootfs.join("boot");
        let find = |prefix: &str| -> Result<PathBuf> {
            let mut v: Vec<PathBuf> = std::fs::read_dir(&boot)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix))
                .collect();
            v.sort();
            v.pop().with_context(|| format!("no {prefix}* in {}", boot.display()))
        };
        let kernel = self.dir.join("vmlinuz");
        let initrd = self.dir.join("initrd.img");
        std::fs::copy(find("vmlinuz-")?, &kernel)?;
        std::fs::copy(find("initrd.img-")?, &initrd)?;

        let root_img = self.dir.join("root.img");
        util::run(Command::new("mkfs.ext4").args(["-q", "-L", "vmroot", "-d"]).arg(&rootfs).arg(&root_img).arg("2G"))?;
        std::fs::remove_dir_all(&rootfs)?;
        let data_img = self.dir.join("data.img");
        std::fs::File::create(&data_img)?.set_len(DATA_SIZE)?;
        info(&format!(
            "root image (ext4, LABEL=vmroot) and a blank 512 MiB data disk in {:.0} s",
            t.elapsed().as_secs_f64()
        ));
        Ok((kernel, initrd, root_img, data_img))
    }

    #[allow(clippy::too_many_arguments)]
    fn boot(
        &mut self,
        n: u32,
        accel: &str,
        port: u16,
        kernel: &Path,
        initrd: &Path,
        root_img: &Path,
        data_img: &Path,
        token: &str,
    ) -> Result<()> {
        self.console = self.dir.join(format!("console-boot{n}.log"));
        let append = format!(
            "root=LABEL=vmroot rw console=ttyS0 net.ifnames=0 panic=-1 loglevel=4 vmtest.boot={n} vmtest.token={token}"
        );
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", accel, "-m", "1024", "-smp", "2", "-nodefaults", "-display", "none", "-no-reboot"])
            .args(["-uuid", VM_UUID])
            .arg("-serial")
            .arg(format!("file:{}", self.console.display()))
            .arg("-kernel")
            .arg(kernel)
            .arg("-initrd")
            .arg(initrd)
            .args(["-append", &append])
            .arg("-drive")
            .arg(format!("file={},if=none,id=root,format=raw", root_img.display()))
            .args(["-device", "virtio-blk-pci,drive=root,serial=ROOT"])
            .arg("-drive")
            .arg(format!("file={},if=none,id=d1,format=raw", data_img.display()))
            .args(["-device", &format!("virtio-blk-pci,drive=d1,serial={DATA_SERIAL}")])
            // restrict=on: the guest reaches nothing but the forward to this
            // machine's loopback.
            .args([
                "-netdev",
                &format!("user,id=n0,restrict=on,guestfwd=tcp:{GUEST_FWD_ADDR}:{GUEST_FWD_PORT}-tcp:127.0.0.1:{port}"),
            ])
            .args(["-device", "virtio-net-pci,netdev=n0"])
            // QMP, for growing the data disk while the guest runs, and a
            // virtio serial port for telling the guest probe a job ended.
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", self.qmp_path(n).display()))
            .args(["-device", "virtio-serial-pci,id=vser0"])
            .arg("-chardev")
            .arg(format!("socket,id=sig,path={},server=on,wait=off", self.signal_path(n).display()))
            .args(["-device", "virtserialport,bus=vser0.0,chardev=sig,name=vmtest.signal"])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(self.dir.join(format!("qemu-boot{n}.log")))?)
            .stderr(std::fs::File::create(self.dir.join(format!("qemu-boot{n}.stderr")))?);
        info(&format!("$ {cmd:?}"));
        self.qemu = Some(cmd.spawn().context("cannot start qemu-system-x86_64")?);
        Ok(())
    }

    fn qmp_path(&self, n: u32) -> PathBuf {
        self.dir.join(format!("qmp-boot{n}.sock"))
    }

    fn signal_path(&self, n: u32) -> PathBuf {
        self.dir.join(format!("signal-boot{n}.sock"))
    }

    /// Connect to a QEMU socket (retrying while QEMU is still creating it).
    fn connect(&mut self, path: &Path, since: Instant) -> Result<UnixStream> {
        loop {
            match UnixStream::connect(path) {
                Ok(s) => return Ok(s),
                Err(e) if since.elapsed() > BOOT_TIMEOUT => {
                    return Err(e).with_context(|| format!("cannot connect to {}", path.display()))
                }
                Err(_) => {}
            }
            self.check_qemu_running(&format!("{}", path.display()))?;
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Grow the data drive (`-drive id=d1`) to `bytes` through QMP, as a
    /// hypervisor does while the guest runs.
    fn qmp_block_resize(&mut self, n: u32, since: Instant, bytes: u64) -> Result<()> {
        let path = self.qmp_path(n);
        let stream = self.connect(&path, since)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut w = stream.try_clone()?;
        let mut r = std::io::BufReader::new(stream);
        // One command, its answer (events in between are skipped).
        let mut call = |cmd: Value| -> Result<Value> {
            writeln!(w, "{cmd}")?;
            loop {
                let mut line = String::new();
                ensure!(r.read_line(&mut line)? > 0, "QMP closed the connection");
                let v: Value = serde_json::from_str(&line).with_context(|| format!("QMP sent {line:?}"))?;
                if let Some(e) = v.get("error") {
                    bail!("QMP {cmd}: {e}");
                }
                if v.get("return").is_some() {
                    return Ok(v);
                }
            }
        };
        // The greeting line has neither "return" nor "error": skipped.
        call(json!({"execute": "qmp_capabilities"}))?;
        call(json!({"execute": "block_resize", "arguments": {"device": "d1", "size": bytes}}))?;
        Ok(())
    }

    /// Wait for `VMTEST key` on the current console (failing on a `FAIL`
    /// marker, QEMU's exit or the boot's time limit).
    fn wait_marker(&mut self, since: Instant, key: &str) -> Result<String> {
        loop {
            let c = self.console_markers();
            if let Some(f) = c.iter().find(|(k, _)| k == "FAIL") {
                bail!("the guest probe failed: {}", f.1);
            }
            if let Some((_, v)) = c.iter().find(|(k, _)| k == key) {
                return Ok(v.clone());
            }
            self.check_qemu_running(&format!("`VMTEST {key}` on the console"))?;
            if since.elapsed() > BOOT_TIMEOUT {
                bail!("no `VMTEST {key}` on the console within {BOOT_TIMEOUT:?} of the boot");
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Fail if QEMU has exited (with its stderr).
    fn check_qemu_running(&mut self, what: &str) -> Result<()> {
        if let Some(st) = self.qemu.as_mut().and_then(|q| q.try_wait().ok().flatten()) {
            self.qemu = None;
            bail!("QEMU exited ({st}) while waiting for {what}; its stderr: {}", self.console_stderr().trim());
        }
        Ok(())
    }

    fn console_stderr(&self) -> String {
        let name =
            self.console.file_name().unwrap().to_string_lossy().replace("console-", "qemu-").replace(".log", ".stderr");
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }

    fn admin_call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        http_json(method, &self.admin, path, body).with_context(|| format!("admin API {method} {path}"))
    }

    fn wait_for_agent(&mut self, since: Instant) -> Result<Value> {
        loop {
            let v = self.admin_call("GET", "/admin/v1/agents", None)?;
            if let Some(a) = v["agents"].as_array().and_then(|a| a.iter().find(|a| a["vm_uuid"] == VM_UUID)) {
                return Ok(a.clone());
            }
            if let Some(a) = v["agents"].as_array().and_then(|a| a.first()) {
                bail!("an agent checked in with vm_uuid {} instead of {VM_UUID} (QEMU -uuid)", a["vm_uuid"]);
            }
            self.check_qemu_running("the agent's check-in")?;
            if since.elapsed() > BOOT_TIMEOUT {
                bail!("the agent did not check in within {BOOT_TIMEOUT:?} of the boot");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Queue a job and wait for its final state, printing state changes.
    fn run_job(&mut self, since: Instant, body: Value) -> Result<Value> {
        let id = self.admin_call("POST", "/admin/v1/jobs", Some(&body))?["id"].as_str().unwrap_or("").to_string();
        info(&format!("job id {id}"));
        let mut last = String::new();
        loop {
            let j = self.admin_call("GET", &format!("/admin/v1/jobs/{id}?wait=5"), None)?;
            let st = j["status"].as_str().unwrap_or("?").to_string();
            if st != last {
                info(&format!("{:>5.1} s  {st}", since.elapsed().as_secs_f64()));
                last = st.clone();
            }
            if !matches!(st.as_str(), "queued" | "delivered" | "running") {
                return Ok(j);
            }
            self.check_qemu_running(&format!("job {id}"))?;
            if since.elapsed() > BOOT_TIMEOUT {
                bail!("job {id} did not finish within {BOOT_TIMEOUT:?} of the boot (status {st})");
            }
        }
    }

    fn wait_poweroff(&mut self, since: Instant) -> Result<()> {
        loop {
            if let Some(q) = self.qemu.as_mut() {
                if let Some(st) = q.try_wait()? {
                    self.qemu = None;
                    info(&format!("{:>5.1} s  the VM powered off ({st})", since.elapsed().as_secs_f64()));
                    ensure!(st.success(), "QEMU exited with {st}: {}", self.console_stderr().trim());
                    let c = self.console_markers();
                    if let Some(f) = c.iter().find(|(k, _)| k == "FAIL") {
                        bail!("the guest probe failed: {}", f.1);
                    }
                    return Ok(());
                }
            }
            if since.elapsed() > BOOT_TIMEOUT {
                bail!("the VM did not power off within {BOOT_TIMEOUT:?} of the boot");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// `VMTEST KEY rest` lines of the current console log.
    fn console_markers(&self) -> Vec<(String, String)> {
        let text = String::from_utf8_lossy(&std::fs::read(&self.console).unwrap_or_default()).replace('\r', "");
        text.lines()
            .filter_map(|l| l.find("VMTEST ").map(|i| &l[i + 7..]))
            .map(|m| match m.split_once(' ') {
                Some((k, v)) => (k.to_string(), v.trim().to_string()),
                None => (m.trim().to_string(), String::new()),
            })
            .collect()
    }

    fn stop(&mut self) {
        if let Some(mut q) = self.qemu.take() {
            let _ = q.kill();
            let _ = q.wait();
        }
        if let Some(mut s) = self.server.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
    }
}

impl Drop for VmTest {
    fn drop(&mut self) {
        self.stop();
    }
}

fn need_marker(markers: &[(String, String)], key: &str) -> Result<String> {
    markers
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .with_context(|| format!("the guest console has no `VMTEST {key}` line"))
}

/// Drop the colour escapes (`ESC [ ... letter`) systemd writes to the console.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\u{1b}' && it.peek() == Some(&'[') {
            for d in it.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn set_mode(p: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot chmod {}", p.display()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn namespaces_must_be_real_readings() {
        let (a, p, q) =
            super::parse_namespaces("agent=mnt:[4026532301] pid1=mnt:[4026531841] probe=mnt:[4026531841]").unwrap();
        assert_eq!((a.as_str(), p.as_str(), q.as_str()), ("mnt:[4026532301]", "mnt:[4026531841]", "mnt:[4026531841]"));
        // MainPID 0: readlink /proc/0/ns/mnt prints nothing.
        let e = super::parse_namespaces("agent= pid1=mnt:[4026531841] probe=mnt:[4026531841]").unwrap_err();
        assert!(e.to_string().contains("agent's mount namespace reads \"\""), "{e}");
        assert!(super::parse_namespaces("pid1=mnt:[1] probe=mnt:[1]").is_err(), "agent missing");
        assert!(super::parse_namespaces("agent=mnt:[] pid1=mnt:[1] probe=mnt:[1]").is_err());
    }
}
