//! One QEMU process: direct kernel boot (or, for cloud images, the image's
//! own bootloader) of an image overlay with data disks
//! by virtio serial, user networking restricted to one `guestfwd` to the
//! host's mgmt-server, a QMP socket (block_resize) and the test shell on the
//! virtio serial port `vmtest.ctl` ([`Vm::sh`]). Console on a log file.
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where the guest reaches the server (guestfwd to the host's loopback).
pub const GUEST_FWD_ADDR: &str = "10.0.2.100";
pub const GUEST_FWD_PORT: u16 = 8443;

/// A disk given to the VM: QEMU drive id, virtio serial, file.
#[derive(Clone, Debug)]
pub struct Disk {
    pub id: String,
    pub serial: String,
    pub path: PathBuf,
}

pub struct Spec<'a> {
    pub accel: &'a str,
    pub uuid: &'a str,
    /// Direct kernel boot; `None`: the root disk's own bootloader (cloud
    /// images), with `-cpu max` (EL9 kernels need x86-64-v2) and more memory
    /// (cloud-init is Python).
    pub kernel: Option<(&'a Path, &'a Path, &'a str)>,
    pub disks: &'a [Disk],
    pub server_port: u16,
    pub dir: &'a Path,
    /// Name of this boot (console-NAME.log, sockets).
    pub name: &'a str,
}

pub struct Vm {
    child: Option<Child>,
    qmp: PathBuf,
    ctl: Option<BufReader<UnixStream>>,
    ctl_path: PathBuf,
    stderr: PathBuf,
    next_id: u64,
}

impl Vm {
    pub fn start(s: &Spec) -> Result<Vm> {
        let console = s.dir.join(format!("console-{}.log", s.name));
        let qmp = s.dir.join(format!("qmp-{}.sock", s.name));
        let ctl_path = s.dir.join(format!("ctl-{}.sock", s.name));
        let stderr = s.dir.join(format!("qemu-{}.stderr", s.name));
        let _ = std::fs::remove_file(&qmp);
        let _ = std::fs::remove_file(&ctl_path);
        let mut cmd = Command::new("qemu-system-x86_64");
        let mem = if s.kernel.is_some() { "768" } else { "1024" };
        cmd.args(["-accel", s.accel, "-m", mem, "-smp", "1", "-nodefaults", "-display", "none", "-no-reboot"])
            .args(["-uuid", s.uuid])
            .arg("-serial")
            .arg(format!("file:{}", console.display()));
        match s.kernel {
            Some((kernel, initrd, append)) => {
                cmd.arg("-kernel").arg(kernel).arg("-initrd").arg(initrd).args(["-append", append]);
            }
            None => {
                cmd.args(["-cpu", "max"]);
            }
        }
        for d in s.disks {
            let fmt = if d.path.extension().is_some_and(|e| e == "qcow2") { "qcow2" } else { "raw" };
            // FILES is shared by every VM of a run: read-only, so QEMU takes
            // a shared lock (with two images at once the second QEMU failed
            // "Failed to get \"write\" lock").
            // The NoCloud seed too.
            let ro = if d.serial == "FILES" || d.serial == "CIDATA" { ",readonly=on" } else { "" };
            let boot = if s.kernel.is_none() && d.serial == "ROOT" { ",bootindex=0" } else { "" };
            cmd.arg("-drive")
                .arg(format!("file={},if=none,id={},format={fmt}{ro}", d.path.display(), d.id))
                .args(["-device", &format!("virtio-blk-pci,drive={},serial={}{boot}", d.id, d.serial)]);
        }
        // guestfwd to a `tcp:` chardev is ONE connection, opened when QEMU
        // starts: the server closed it after 30 s idle, before a slow TCG
        // boot reached the agent, and every check-in then hung. `cmd:`
        // spawns a relay per guest connection.
        cmd.args([
            "-netdev",
            &format!(
                "user,id=n0,restrict=on,guestfwd=tcp:{GUEST_FWD_ADDR}:{GUEST_FWD_PORT}-cmd:socat STDIO TCP:127.0.0.1:{}",
                s.server_port
            ),
        ])
        .args(["-device", "virtio-net-pci,netdev=n0"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .args(["-device", "virtio-serial-pci,id=vser0"])
        .arg("-chardev")
        .arg(format!("socket,id=ctl,path={},server=on,wait=off", ctl_path.display()))
        .args(["-device", "virtserialport,bus=vser0.0,chardev=ctl,name=vmtest.ctl"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr)?);
        std::fs::write(s.dir.join(format!("qemu-{}.cmd", s.name)), format!("{cmd:?}\n"))?;
        let child = cmd.spawn().context("cannot start qemu-system-x86_64")?;
        Ok(Vm { child: Some(child), qmp, ctl: None, ctl_path, stderr, next_id: 0 })
    }

    /// Fail if QEMU has exited.
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(st) = self.child.as_mut().and_then(|q| q.try_wait().ok().flatten()) {
            self.child = None;
            let err = std::fs::read_to_string(&self.stderr).unwrap_or_default();
            bail!("QEMU exited ({st}); its stderr: {}", err.trim());
        }
        ensure!(self.child.is_some(), "the VM is not running");
        Ok(())
    }

    fn connect(&mut self, path: &Path, deadline: Instant) -> Result<UnixStream> {
        loop {
            match UnixStream::connect(path) {
                Ok(s) => return Ok(s),
                Err(e) if Instant::now() > deadline => {
                    return Err(e).with_context(|| format!("cannot connect to {}", path.display()))
                }
                Err(_) => {}
            }
            self.check_running()?;
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Wait until the guest's test shell answers (the boot got that far).
    pub fn wait_shell(&mut self, deadline: Instant) -> Result<()> {
        loop {
            match self.sh_once("echo ok", Instant::now() + Duration::from_secs(3).min(left(deadline))) {
                Ok((0, out)) if out.trim() == "ok" => return Ok(()),
                Ok(_) | Err(_) => {}
            }
            self.check_running()?;
            ensure!(Instant::now() < deadline, "the guest's test shell did not answer before the deadline");
        }
    }

    fn sh_once(&mut self, script: &str, deadline: Instant) -> Result<(i32, String)> {
        if self.ctl.is_none() {
            let s = self.connect(&self.ctl_path.clone(), deadline)?;
            self.ctl = Some(BufReader::new(s));
        }
        self.next_id += 1;
        let id = self.next_id;
        let b64 = b64_encode(script.as_bytes());
        let r = self.ctl.as_mut().unwrap();
        writeln!(r.get_mut(), "{id} {b64}")?;
        loop {
            let t = left(deadline);
            ensure!(!t.is_zero(), "no answer from the guest shell in time");
            r.get_ref().set_read_timeout(Some(t.max(Duration::from_millis(10))))?;
            let mut line = String::new();
            match r.read_line(&mut line) {
                Ok(0) => {
                    self.ctl = None;
                    bail!("the guest shell's port closed");
                }
                Ok(_) => {}
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    bail!("no answer from the guest shell in time")
                }
                Err(e) => return Err(e.into()),
            }
            let w: Vec<&str> = line.trim_end().splitn(4, ' ').collect();
            if w.len() >= 3 && w[0] == "R" && w[1] == id.to_string() {
                let rc: i32 = w[2].parse().unwrap_or(-1);
                let out = b64_decode(w.get(3).unwrap_or(&""));
                return Ok((rc, String::from_utf8_lossy(&out).into_owned()));
            }
        }
    }

    /// Run a bash script in the guest (outside any service), return exit
    /// code and combined output.
    pub fn sh(&mut self, script: &str, deadline: Instant) -> Result<(i32, String)> {
        self.check_running()?;
        self.sh_once(script, deadline).with_context(|| format!("guest command {script:?}"))
    }

    /// Grow a drive through QMP as a hypervisor does while the guest runs.
    pub fn block_resize(&mut self, drive: &str, bytes: u64, deadline: Instant) -> Result<()> {
        let stream = self.connect(&self.qmp.clone(), deadline)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut w = stream.try_clone()?;
        let mut r = BufReader::new(stream);
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
        call(json!({"execute": "qmp_capabilities"}))?;
        call(json!({"execute": "block_resize", "arguments": {"device": drive, "size": bytes}}))?;
        Ok(())
    }

    /// Ask the guest to power off and wait for QEMU to exit.
    pub fn poweroff(&mut self, deadline: Instant) -> Result<()> {
        // Detached: the shell itself is stopped by the power-off.
        let _ = self.sh("(sleep 1; poweroff) >/dev/null 2>&1 &", deadline);
        self.ctl = None;
        self.wait_exit(deadline)
    }

    pub fn wait_exit(&mut self, deadline: Instant) -> Result<()> {
        loop {
            match self.child.as_mut() {
                None => return Ok(()),
                Some(q) => {
                    if let Some(st) = q.try_wait()? {
                        self.child = None;
                        ensure!(st.success(), "QEMU exited with {st}");
                        return Ok(());
                    }
                }
            }
            if Instant::now() > deadline {
                self.kill();
                bail!("the VM did not power off before the deadline (killed)");
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut q) = self.child.take() {
            let _ = q.kill();
            let _ = q.wait();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn left(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// The last `n` lines of a console log, colour escapes removed.
pub fn tail(p: &Path, n: usize) -> String {
    let text = strip_ansi(&String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).replace('\r', ""));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Drop the colour escapes (`ESC [ ... letter`) systemd writes to the console.
pub fn strip_ansi(s: &str) -> String {
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

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (the guest decodes with coreutils `base64 -d`).
pub fn b64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n =
            (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(B64[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decode standard base64 (ignores padding and anything not in the alphabet).
pub fn b64_decode(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for b in s.bytes() {
        let Some(v) = B64.iter().position(|&x| x == b) else { continue };
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_round_trip() {
        for s in ["", "a", "ab", "abc", "abcd", "echo ok\n\u{e9}"] {
            let e = super::b64_encode(s.as_bytes());
            assert_eq!(super::b64_decode(&e), s.as_bytes(), "{s:?} -> {e}");
        }
        assert_eq!(super::b64_encode(b"abcd"), "YWJjZA==");
    }
}
