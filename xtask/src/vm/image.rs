//! The VM images as data ([`IMAGES`]) and how one is built: a Debian rootfs
//! from mmdebstrap (cached per suite and package list), provisioned with the
//! test shell and network settings, written onto a partitioned raw disk
//! (GPT or MBR with ext4 on partition 1, or GPT + LVM + XFS), cached under
//! `target/vm/images/` by a hash of its whole recipe. Each VM run boots a
//! qcow2 overlay of that disk, so the cached disk is never written.
use crate::util::{self, root, step};
use anyhow::{bail, ensure, Context, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// The init system an image boots with.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Init {
    Systemd,
    Sysvinit,
    Openrc,
}

impl Init {
    pub fn name(self) -> &'static str {
        match self {
            Init::Systemd => "systemd",
            Init::Sysvinit => "sysvinit",
            Init::Openrc => "openrc",
        }
    }
    /// Packages that make this init PID 1 (and bring the network up).
    fn packages(self) -> &'static str {
        match self {
            Init::Systemd => "systemd,systemd-sysv",
            Init::Sysvinit => "sysvinit-core,ifupdown",
            Init::Openrc => "sysvinit-core,openrc,ifupdown",
        }
    }
    /// Guest shell: exit 0 when the agent service is running, as the init
    /// system itself reports it.
    pub fn service_running(self) -> &'static str {
        match self {
            Init::Systemd => "systemctl is-active --quiet xcp-vm-agent",
            Init::Sysvinit => "service xcp-vm-agent status >/dev/null",
            Init::Openrc => "rc-service xcp-vm-agent status >/dev/null",
        }
    }
    /// Guest shell: exit 0 when the service starts at boot.
    pub fn service_enabled(self) -> &'static str {
        match self {
            Init::Systemd => "systemctl is-enabled --quiet xcp-vm-agent",
            Init::Sysvinit => "ls /etc/rc2.d/S*xcp-vm-agent >/dev/null",
            Init::Openrc => "rc-update show default | grep -qw xcp-vm-agent",
        }
    }
    /// Guest shell: exit 0 when the init system no longer knows the service.
    pub fn service_gone(self) -> &'static str {
        match self {
            Init::Systemd => {
                "! systemctl cat xcp-vm-agent.service >/dev/null 2>&1 && ! systemctl is-active --quiet xcp-vm-agent"
            }
            Init::Sysvinit => "[ ! -e /etc/init.d/xcp-vm-agent ] && ! ls /etc/rc?.d/*xcp-vm-agent >/dev/null 2>&1",
            Init::Openrc => "[ ! -e /etc/init.d/xcp-vm-agent ] && ! rc-update show | grep -qw xcp-vm-agent",
        }
    }
    /// Guest shell: prints the main PID of the service (empty when none).
    pub fn service_pid(self) -> &'static str {
        match self {
            Init::Systemd => {
                "p=$(systemctl show -p MainPID --value xcp-vm-agent); [ \"$p\" != 0 ] && echo \"$p\" || true"
            }
            Init::Sysvinit | Init::Openrc => "pgrep -o -x xcp-vm-agent || true",
        }
    }
    /// Guest shell: restart the service through the init system.
    pub fn service_restart(self) -> &'static str {
        match self {
            Init::Systemd => "systemctl restart xcp-vm-agent",
            Init::Sysvinit => "service xcp-vm-agent restart",
            // Debian's OpenRC images have `service` (init-system-helpers);
            // Alpine has OpenRC's own rc-service only.
            Init::Openrc => {
                "if command -v service >/dev/null; then service xcp-vm-agent restart; \
                 else rc-service xcp-vm-agent restart; fi"
            }
        }
    }
    #[cfg(test)]
    /// Every guest command of this init system, named (checked as POSIX sh
    /// by the tests and by `vm-test --check-catalogue`).
    pub fn commands(self) -> Vec<(&'static str, &'static str)> {
        vec![
            ("service_running", self.service_running()),
            ("service_enabled", self.service_enabled()),
            ("service_gone", self.service_gone()),
            ("service_pid", self.service_pid()),
            ("service_restart", self.service_restart()),
            ("boot_finished", self.boot_finished()),
        ]
    }
    /// Guest shell: wait until the boot finished (exit 0) or failed.
    pub fn boot_finished(self) -> &'static str {
        match self {
            // running or degraded (a cloud image has units that fail in a VM
            // with no network beyond the host); not starting/maintenance.
            Init::Systemd => {
                "s=$(systemctl is-system-running --wait); echo \"$s\"; case $s in running|degraded) exit 0;; esac; \
                 systemctl --failed --no-pager; exit 1"
            }
            // The shell is started from inittab after the runlevel's rc
            // scripts finished.
            Init::Sysvinit | Init::Openrc => "echo runlevel $(runlevel)",
        }
    }
}

/// How the root disk is laid out.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Layout {
    /// ext4 on partition 1 of a GPT disk.
    GptExt4,
    /// ext4 on partition 1 of an MBR (dos) disk.
    MbrExt4,
    /// GPT partition 1 is an LVM PV of VG `vmvg`; XFS on LV `root`.
    LvmXfs,
    /// A catalogue image whose root is on LVM (the distribution's VG and LV
    /// names, e.g. RHEL-family XFS on LVM).
    CloudLvm,
}

impl Layout {
    pub fn describe(self) -> &'static str {
        match self {
            Layout::GptExt4 => "gpt/ext4",
            Layout::MbrExt4 => "mbr/ext4",
            Layout::LvmXfs => "gpt/lvm/xfs",
            Layout::CloudLvm => "lvm (the image's own)",
        }
    }
}

/// How an image is made and provisioned.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    /// A Debian rootfs from mmdebstrap, provisioned (test shell, network)
    /// when the disk is built, booted with `-kernel`.
    Built,
    /// A cloud image, booted by its own bootloader and provisioned at its
    /// first boot by cloud-init from a NoCloud seed ([`super::cloud`]): the
    /// test shell, the agent's config and certificates, and (in the chain
    /// with the `install` scenario) our package installed from the FILES
    /// disk by the `install` command of catalogue entry `entry`.
    Cloud { source: CloudSource, entry: &'static str },
}

/// Where a cloud image's disk comes from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum CloudSource {
    /// Built here from Debian's archive to look like Debian's own cloud
    /// image (`crate::cloudimg`): the cloud path, proven without downloads.
    Genericcloud,
    /// Downloaded and verified from the catalogue (`crate::catalogue::fetch`).
    Catalogue,
}

/// One image definition. Catalogue images (ci/distros.toml) are rows of the
/// `Cloud` kind made at run time ([`by_name`]); everything else (scenarios,
/// report) only reads these fields.
pub struct Image {
    pub name: &'static str,
    /// Debian suite for mmdebstrap (empty for catalogue images).
    pub suite: &'static str,
    pub init: Init,
    pub layout: Layout,
    pub kind: Kind,
}

pub const IMAGES: &[Image] = &[
    Image { name: "debian-11", suite: "bullseye", init: Init::Systemd, layout: Layout::GptExt4, kind: Kind::Built },
    Image { name: "debian-12", suite: "bookworm", init: Init::Systemd, layout: Layout::GptExt4, kind: Kind::Built },
    Image { name: "debian-13", suite: "trixie", init: Init::Systemd, layout: Layout::LvmXfs, kind: Kind::Built },
    Image {
        name: "debian-12-sysvinit",
        suite: "bookworm",
        init: Init::Sysvinit,
        layout: Layout::MbrExt4,
        kind: Kind::Built,
    },
    Image {
        name: "debian-12-openrc",
        suite: "bookworm",
        init: Init::Openrc,
        layout: Layout::GptExt4,
        kind: Kind::Built,
    },
    // Installs with the catalogue's debian-12 entry, the image it mimics.
    Image {
        name: "debian-12-genericcloud",
        suite: "bookworm",
        init: Init::Systemd,
        layout: Layout::GptExt4,
        kind: Kind::Cloud { source: CloudSource::Genericcloud, entry: "debian-12" },
    },
];

/// On top of minbase, in every image: udev (for /dev/disk/by-id), a kernel
/// and its initramfs, what our .deb depends on, LVM (root layout and the LVM
/// scenario), python3 with requests (the 1.0.3 stand-in), iproute2, procps.
const COMMON_PACKAGES: &str = "udev,linux-image-cloud-amd64,initramfs-tools,cloud-guest-utils,parted,gdisk,fdisk,\
e2fsprogs,xfsprogs,util-linux,lvm2,iproute2,procps,python3,python3-requests";

/// The root disk's size as built (grown by the grow-root-online scenario).
pub const ROOT_DISK: u64 = 2 << 30;
/// Bump when the provisioning below changes in a way the hash cannot see.
const RECIPE_VERSION: &str = "1";

/// A built image: the raw disk and the kernel/initrd for direct boot.
pub struct Built {
    pub disk: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Kernel command line (root=..., console).
    pub append: String,
    /// Tool versions inside the image (for the report).
    pub versions: Vec<(String, String)>,
    /// Cloud kind: booted by its own bootloader, provisioned by cloud-init.
    pub cloud: Option<super::cloud::CloudBuilt>,
}

pub fn images_dir() -> PathBuf {
    root().join("target/vm/images")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn mirror_uri() -> Result<String> {
    let text = std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
    if let Some(u) = text.lines().find_map(|l| l.strip_prefix("URIs:")) {
        return Ok(u.split_whitespace().next().unwrap_or("").to_string());
    }
    let list = std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    list.lines()
        .find_map(|l| l.strip_prefix("deb ").and_then(|r| r.split_whitespace().find(|w| w.contains("://"))))
        .map(str::to_string)
        .context("no Debian archive configured in /etc/apt (debian.sources or sources.list)")
}

fn base_packages(img: &Image) -> String {
    format!("{COMMON_PACKAGES},{}", img.init.packages())
}

/// One lock per suite: two images of one suite (bookworm has three) build
/// their tarballs one after the other, so the second takes every package
/// from the first one's download cache instead of the archive.
fn suite_lock(suite: &str) -> std::sync::Arc<std::sync::Mutex<()>> {
    use std::sync::{Arc, Mutex, OnceLock};
    type Locks = Mutex<Vec<(String, Arc<Mutex<()>>)>>;
    static LOCKS: OnceLock<Locks> = OnceLock::new();
    let mut l = LOCKS.get_or_init(Default::default).lock().unwrap();
    if let Some((_, m)) = l.iter().find(|(s, _)| s == suite) {
        return m.clone();
    }
    let m = Arc::new(Mutex::new(()));
    l.push((suite.to_string(), m.clone()));
    m
}

/// The mmdebstrap tarball for this image's suite and init, cached by the
/// hash of its package list. The downloaded .debs are kept per suite under
/// `target/vm/apt-cache/SUITE/` (mmdebstrap's sync-in/sync-out hooks; apt
/// checks every file against the archive's index before using it, and the
/// tarball itself leaves them out), so the three bookworm images download
/// their packages once.
fn base_tarball(img: &Image) -> Result<PathBuf> {
    let include = base_packages(img);
    let key = hex(&Sha256::digest(format!("{}\n{include}", img.suite))[..6]);
    let dir = root().join("target/vm/base");
    std::fs::create_dir_all(&dir)?;
    let tar = dir.join(format!("{}-{}-{key}.tar", img.suite, img.init.name()));
    if tar.exists() {
        return Ok(tar);
    }
    let lock = suite_lock(img.suite);
    let _held = lock.lock().unwrap_or_else(|e| e.into_inner());
    if tar.exists() {
        return Ok(tar);
    }
    let t = Instant::now();
    step(&format!("vm: {}: mmdebstrap {} minbase + {include} (cached afterwards)", img.name, img.suite));
    let uri = mirror_uri()?;
    let tmp = tar.with_extension("tmp");
    let cache = root().join("target/vm/apt-cache").join(img.suite);
    std::fs::create_dir_all(&cache)?;
    let cached =
        std::fs::read_dir(&cache)?.flatten().filter(|e| e.file_name().to_string_lossy().ends_with(".deb")).count();
    let mut cmd = Command::new("mmdebstrap");
    cmd.args(["--variant=minbase", "--mode=root", "--format=tar", "--quiet"]);
    // The hooks split their arguments at spaces: no cache for such a path.
    if !cache.to_string_lossy().contains(char::is_whitespace) {
        cmd.arg("--skip=essential/unlink")
            .arg("--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/")
            .arg(format!("--setup-hook=sync-in {} /var/cache/apt/archives/", cache.display()))
            .arg(format!("--customize-hook=sync-out /var/cache/apt/archives {}", cache.display()));
    }
    util::run(
        cmd.arg(format!("--include={include}")).arg(img.suite).arg(&tmp).arg(format!("deb {uri} {} main", img.suite)),
    )?;
    std::fs::rename(&tmp, &tar)?;
    eprintln!(
        "    {}: base rootfs in {:.0} s ({cached} packages were in the download cache)",
        img.name,
        t.elapsed().as_secs_f64()
    );
    Ok(tar)
}

/// The guest's test shell: runs what the host sends on the virtio serial
/// port `vmtest.ctl` (one line: ID and a base64 script) with bash, outside
/// any service sandbox, and answers `R ID RC BASE64-OUTPUT`. No SSH needed.
pub const GUEST_SHELL: &str = r#"#!/bin/sh
# vmtest-shell: the VM matrix's remote shell over a virtio serial port.
# POSIX sh: runs, and runs every command, under dash or BusyBox ash (no bash
# in the guest). `command exec`: a failed redirection of the special
# built-in `exec` would end a POSIX shell.
port=/dev/virtio-ports/vmtest.ctl
echo "VMTEST SHELL-STARTED" > /dev/console 2>/dev/null || true
while :; do
    if [ ! -e "$port" ]; then sleep 1; continue; fi
    command exec 3<>"$port" || { sleep 1; continue; }
    while IFS=' ' read -r id b64 <&3; do
        [ -n "$id" ] || continue
        out=$(printf '%s' "$b64" | base64 -d > /run/vmtest-cmd.sh && sh /run/vmtest-cmd.sh < /dev/null 3>&- 2>&1)
        rc=$?
        printf 'R %s %s %s\n' "$id" "$rc" "$(printf '%s' "$out" | base64 -w0)" >&3
    done
    exec 3<&-
    sleep 1
done
"#;

/// The test shell's unit (systemd); the cloud kind installs the same one.
pub const SHELL_UNIT: &str = "\
[Unit]
Description=VM matrix test shell (virtio serial vmtest.ctl)
DefaultDependencies=no
After=systemd-udevd.service

[Service]
ExecStart=/usr/local/sbin/vmtest-shell
Restart=always

[Install]
WantedBy=multi-user.target
";

fn set_mode(p: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot chmod {}", p.display()))
}

/// Provision the unpacked rootfs: hostname, hosts, network, fstab for the
/// root, the test shell and how the init system starts it.
fn provision(img: &Image, rootfs: &Path, root_fstab: &str) -> Result<()> {
    let etc = rootfs.join("etc");
    std::fs::write(etc.join("hostname"), format!("{}\n", img.name))?;
    std::fs::write(
        etc.join("hosts"),
        format!(
            "127.0.0.1 localhost\n127.0.1.1 {}\n{} {}\n",
            img.name,
            super::qemu::GUEST_FWD_ADDR,
            super::SERVER_NAME
        ),
    )?;
    std::fs::write(etc.join("fstab"), format!("{root_fstab}\n"))?;
    // Empty: systemd makes one at first boot; the overlays share the disk.
    std::fs::write(etc.join("machine-id"), "")?;
    let shell = rootfs.join("usr/local/sbin/vmtest-shell");
    std::fs::create_dir_all(shell.parent().unwrap())?;
    std::fs::write(&shell, GUEST_SHELL)?;
    set_mode(&shell, 0o755)?;
    match img.init {
        Init::Systemd => {
            std::fs::create_dir_all(etc.join("systemd/network"))?;
            std::fs::write(
                etc.join("systemd/network/50-vmtest.network"),
                "[Match]\nName=eth0\n\n[Network]\nAddress=10.0.2.15/24\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n",
            )?;
            std::fs::write(etc.join("systemd/system/vmtest-shell.service"), SHELL_UNIT)?;
            util::output(Command::new("chroot").arg(rootfs).args([
                "systemctl",
                "enable",
                "systemd-networkd.service",
                "vmtest-shell.service",
            ]))?;
        }
        Init::Sysvinit | Init::Openrc => {
            std::fs::write(
                etc.join("network/interfaces"),
                "auto lo\niface lo inet loopback\n\nauto eth0\niface eth0 inet static\n    address 10.0.2.15/24\n",
            )?;
            // Started by init after the runlevel's rc scripts ran (inittab
            // entries run in order; `l2` waits).
            let inittab = etc.join("inittab");
            let mut text = std::fs::read_to_string(&inittab).context("the image has no /etc/inittab")?;
            text.push_str("\nvt:2345:respawn:/usr/local/sbin/vmtest-shell\n");
            std::fs::write(&inittab, text)?;
        }
    }
    Ok(())
}

/// Version strings of the tools the report lists, read in the rootfs.
fn tool_versions(rootfs: &Path) -> Result<Vec<(String, String)>> {
    let q = |pkg: &str| -> String {
        util::output(Command::new("chroot").arg(rootfs).args(["dpkg-query", "-W", "-f=${Version}", pkg]))
            .unwrap_or_else(|_| "?".into())
    };
    let kernel = std::fs::read_dir(rootfs.join("lib/modules"))
        .or_else(|_| std::fs::read_dir(rootfs.join("usr/lib/modules")))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .max()
        .unwrap_or_default();
    let mut init = q("systemd");
    if init == "?" || init.is_empty() {
        init = q("sysvinit-core");
    }
    Ok(vec![
        ("kernel".into(), kernel),
        ("growpart".into(), q("cloud-guest-utils")),
        ("e2fsprogs".into(), q("e2fsprogs")),
        ("xfsprogs".into(), q("xfsprogs")),
        ("util-linux".into(), q("util-linux")),
        ("lvm2".into(), q("lvm2")),
        ("init".into(), init),
        ("openrc".into(), q("openrc")),
    ]
    .into_iter()
    .filter(|(_, v)| !v.is_empty() && v != "?")
    .collect())
}

/// Build (or take from the cache, or download) the disk of `img`.
pub fn build(img: &Image) -> Result<Built> {
    if let Kind::Cloud { source, entry } = img.kind {
        return super::cloud::build(img, source, entry);
    }
    let tar = base_tarball(img)?;
    let recipe = format!(
        "{RECIPE_VERSION}\n{}\n{}\n{:?}\n{:?}\n{ROOT_DISK}\n{GUEST_SHELL}\n{SHELL_UNIT}\n{}",
        img.name,
        // The tarball's name (suite, init, hash of its package list), not
        // its path: a cache copied to another checkout stays valid.
        tar.file_name().unwrap_or_default().to_string_lossy(),
        img.init,
        img.layout,
        std::fs::metadata(&tar)?.len()
    );
    let key = hex(&Sha256::digest(recipe.as_bytes())[..8]);
    let dir = images_dir().join(format!("{}-{key}", img.name));
    let done = dir.join("built.json");
    if let Ok(text) = std::fs::read_to_string(&done) {
        let v: serde_json::Value = serde_json::from_str(&text)?;
        let versions = v["versions"]
            .as_array()
            .map(|a| a.iter().filter_map(|p| Some((p[0].as_str()?.to_string(), p[1].as_str()?.to_string()))).collect())
            .unwrap_or_default();
        return Ok(Built {
            disk: dir.join("disk.raw"),
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initrd.img"),
            append: v["append"].as_str().unwrap_or("").to_string(),
            versions,
            cloud: None,
        });
    }
    let t = Instant::now();
    step(&format!("vm: {}: building the disk image ({}, {})", img.name, img.init.name(), img.layout.describe()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    let rootfs = dir.join("rootfs");
    std::fs::create_dir_all(&rootfs)?;
    util::run(Command::new("tar").arg("-xf").arg(&tar).arg("-C").arg(&rootfs))?;
    let fs_uuid = uuid_from(&key);
    let (root_fstab, append_root) = match img.layout {
        Layout::GptExt4 | Layout::MbrExt4 => {
            (format!("UUID={fs_uuid} / ext4 errors=remount-ro 0 1"), format!("root=UUID={fs_uuid}"))
        }
        Layout::LvmXfs => ("/dev/mapper/vmvg-root / xfs defaults 0 0".to_string(), "root=/dev/mapper/vmvg-root".into()),
        Layout::CloudLvm => bail!("{}: the layout of a catalogue image is not built here", img.name),
    };
    provision(img, &rootfs, &root_fstab)?;
    if img.layout == Layout::LvmXfs {
        // The initramfs must activate the root LV: make sure lvm2's hook
        // is in it (it was installed with the kernel; regenerate to be sure).
        util::output(Command::new("chroot").arg(&rootfs).args(["update-initramfs", "-u", "-k", "all"]))?;
    }
    let versions = tool_versions(&rootfs)?;
    let boot = rootfs.join("boot");
    let find = |prefix: &str| -> Result<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&boot)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix))
            .collect();
        v.sort();
        v.pop().with_context(|| format!("no {prefix}* in {}", boot.display()))
    };
    std::fs::copy(find("vmlinuz-")?, dir.join("vmlinuz"))?;
    std::fs::copy(find("initrd.img-")?, dir.join("initrd.img"))?;
    let disk = dir.join("disk.raw");
    match img.layout {
        Layout::GptExt4 | Layout::MbrExt4 => ext4_disk(img, &rootfs, &disk, &fs_uuid)?,
        Layout::LvmXfs => lvm_xfs_disk(&rootfs, &disk, &fs_uuid)?,
        Layout::CloudLvm => unreachable!("refused above"),
    }
    std::fs::remove_dir_all(&rootfs)?;
    let append = format!("{append_root} rw console=ttyS0 net.ifnames=0 panic=-1 loglevel=4");
    let v = serde_json::json!({ "append": append, "versions": versions, "seconds": t.elapsed().as_secs() });
    std::fs::write(&done, serde_json::to_vec_pretty(&v)?)?;
    eprintln!("    {}: disk image in {:.0} s ({})", img.name, t.elapsed().as_secs_f64(), dir.display());
    Ok(Built { disk, kernel: dir.join("vmlinuz"), initrd: dir.join("initrd.img"), append, versions, cloud: None })
}

/// A stable UUID for the root filesystem (from the recipe hash).
fn uuid_from(key: &str) -> String {
    let h = hex(&Sha256::digest(key.as_bytes()));
    format!("{}-{}-4{}-8{}-{}", &h[0..8], &h[8..12], &h[13..16], &h[17..20], &h[20..32])
}

const PART_START: u64 = 1 << 20;

fn sfdisk(disk: &Path, script: &str) -> Result<()> {
    use std::io::Write;
    let mut c = Command::new("sfdisk")
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(disk)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()?;
    c.stdin.take().unwrap().write_all(script.as_bytes())?;
    ensure!(c.wait()?.success(), "sfdisk {} failed", disk.display());
    Ok(())
}

/// ext4 made from the rootfs (with the image's own mke2fs.conf, so an old
/// e2fsck can check it) copied onto partition 1.
fn ext4_disk(img: &Image, rootfs: &Path, disk: &Path, uuid: &str) -> Result<()> {
    std::fs::File::create(disk)?.set_len(ROOT_DISK)?;
    let label = if img.layout == Layout::MbrExt4 { "dos" } else { "gpt" };
    let ty = if img.layout == Layout::MbrExt4 { "83" } else { "0FC63DAF-8483-4772-8E79-3D69D8477DE4" };
    sfdisk(disk, &format!("label: {label}\nstart=2048, type={ty}\n"))?;
    let part_bytes = part_size(disk)?;
    let fs = disk.with_extension("part");
    let mut cmd = Command::new("mkfs.ext4");
    let conf = rootfs.join("etc/mke2fs.conf");
    if conf.exists() {
        cmd.env("MKE2FS_CONFIG", &conf);
    }
    util::output(
        cmd.args(["-q", "-F", "-L", "vmroot", "-U", uuid, "-d"])
            .arg(rootfs)
            .arg(&fs)
            .arg(format!("{}k", part_bytes / 1024)),
    )?;
    copy_into(&fs, disk, PART_START)?;
    std::fs::remove_file(&fs)?;
    Ok(())
}

/// Size in bytes of partition 1 (sfdisk --json on the file).
fn part_size(disk: &Path) -> Result<u64> {
    let out = util::output(Command::new("sfdisk").arg("--json").arg(disk))?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let p = &v["partitiontable"]["partitions"][0];
    let sectors = p["size"].as_u64().context("sfdisk --json: no size of partition 1")?;
    Ok(sectors * 512)
}

/// Copy `src` into `dst` at byte `offset`, keeping holes.
fn copy_into(src: &Path, dst: &Path, offset: u64) -> Result<()> {
    util::output(
        Command::new("dd")
            .arg(format!("if={}", src.display()))
            .arg(format!("of={}", dst.display()))
            .args(["bs=1M", "conv=sparse,notrunc", "status=none", "oflag=seek_bytes"])
            .arg(format!("seek={offset}")),
    )?;
    Ok(())
}

/// LVM needs no device-mapper to write its metadata: the PV and VG `vmvg`
/// are made on a loop device over partition 1, and the LV `root` (all
/// extents, linear) is added to the VG's text metadata and written back with
/// `vgcfgrestore` (lvcreate wants device-mapper even with `-an`). The XFS is
/// made in a file of the LV's size and copied to the LV's linear offset.
fn lvm_xfs_disk(rootfs: &Path, disk: &Path, uuid: &str) -> Result<()> {
    std::fs::File::create(disk)?.set_len(ROOT_DISK)?;
    sfdisk(disk, "label: gpt\nstart=2048, type=E6D6D379-F507-44C2-A23C-238F2A3DF928\n")?;
    let part_bytes = part_size(disk)?;
    let loopdev = util::output(
        Command::new("losetup")
            .args(["--find", "--show", "--offset", &PART_START.to_string(), "--sizelimit", &part_bytes.to_string()])
            .arg(disk),
    )?
    .trim()
    .to_string();
    let r = (|| -> Result<()> {
        let cfg = format!(
            "devices {{ filter=[\"a|^{loopdev}$|\", \"r|.*|\"] obtain_device_list_from_udev=0 }} \
             activation {{ udev_sync=0 udev_rules=0 }} backup {{ backup=0 archive=0 }}"
        );
        let lvm = |args: &[&str]| -> Result<String> {
            util::output(
                Command::new("lvm")
                    .args(args)
                    .args(["--config", &cfg])
                    .env("DM_DISABLE_UDEV", "1")
                    .env("LVM_SUPPRESS_FD_WARNINGS", "1"),
            )
        };
        lvm(&["pvcreate", "-ff", "-y", &loopdev])?;
        lvm(&["vgcreate", "vmvg", &loopdev])?;
        let pv = lvm(&[
            "pvs",
            "--noheadings",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            "pe_start,pv_pe_count,vg_extent_size",
            &loopdev,
        ])?;
        let w: Vec<u64> = pv.split_whitespace().map(|x| x.parse()).collect::<Result<_, _>>().context("pvs output")?;
        ensure!(w.len() == 3, "unexpected pvs output {pv:?}");
        let (pe_start, pe_count, extent) = (w[0], w[1], w[2]);
        let meta = disk.with_extension("vg");
        lvm(&["vgcfgbackup", "-f", &meta.display().to_string(), "vmvg"])?;
        let text = std::fs::read_to_string(&meta)?;
        let end = text.trim_end().rfind('}').context("no end of the VG in the metadata")?;
        let lv_id = {
            let h = hex(&Sha256::digest(uuid.as_bytes()));
            let a: String = h.chars().take(32).collect();
            format!(
                "{}-{}-{}-{}-{}-{}-{}",
                &a[0..6],
                &a[6..10],
                &a[10..14],
                &a[14..18],
                &a[18..22],
                &a[22..26],
                &a[26..32]
            )
        };
        let lv = format!(
            "\n\tlogical_volumes {{\n\t\troot {{\n\t\t\tid = \"{lv_id}\"\n\t\t\tstatus = [\"READ\", \"WRITE\", \"VISIBLE\"]\n\
             \t\t\tflags = []\n\t\t\tsegment_count = 1\n\t\t\tsegment1 {{\n\t\t\t\tstart_extent = 0\n\
             \t\t\t\textent_count = {pe_count}\n\t\t\t\ttype = \"striped\"\n\t\t\t\tstripe_count = 1\n\
             \t\t\t\tstripes = [\"pv0\", 0]\n\t\t\t}}\n\t\t}}\n\t}}\n"
        );
        let text = format!("{}{lv}{}", &text[..end], &text[end..]);
        let seq = text.find("seqno = 1").context("no seqno = 1 in the metadata")?;
        let text = format!("{}seqno = 2{}", &text[..seq], &text[seq + 9..]);
        std::fs::write(&meta, text)?;
        lvm(&["vgcfgrestore", "-f", &meta.display().to_string(), "vmvg"])?;
        std::fs::remove_file(&meta)?;
        let lv_size = pe_count * extent;
        let fs = disk.with_extension("lv");
        std::fs::File::create(&fs)?.set_len(lv_size)?;
        util::output(
            Command::new("mkfs.xfs").args(["-q", "-f", "-L", "vmroot", "-m", &format!("uuid={uuid}")]).arg(&fs),
        )?;
        let mnt = disk.with_extension("mnt");
        std::fs::create_dir_all(&mnt)?;
        util::output(Command::new("mount").args(["-o", "loop"]).arg(&fs).arg(&mnt))?;
        let copied = util::output(Command::new("sh").arg("-c").arg(format!(
            "tar -C '{}' -cf - . | tar -C '{}' -xf -",
            rootfs.display(),
            mnt.display()
        )));
        util::output(Command::new("umount").arg(&mnt))?;
        copied?;
        std::fs::remove_dir(&mnt)?;
        copy_into(&fs, disk, PART_START + pe_start)?;
        std::fs::remove_file(&fs)?;
        Ok(())
    })();
    let _ = Command::new("losetup").arg("-d").arg(&loopdev).status();
    r
}

/// Create a qcow2 overlay of the cached disk (`format`: raw or qcow2) for one run.
pub fn overlay(base: &Path, format: &str, out: &Path) -> Result<()> {
    util::output(
        Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", "-F", format, "-b"]).arg(base).arg(out),
    )?;
    Ok(())
}

/// An image by name: a row of [`IMAGES`] or, with `catalogue` or when no
/// row has the name, an entry of the cloud-image catalogue (ci/distros.toml)
/// as an image of the cloud kind. Catalogue names that are also rows here
/// (debian-11, -12, -13: the download vs the image built here) need
/// `catalogue` (`vm-test --catalogue`).
pub fn by_name(name: &str, catalogue: bool) -> Result<&'static Image> {
    if !catalogue {
        if let Some(i) = IMAGES.iter().find(|i| i.name == name) {
            return Ok(i);
        }
    }
    let entries = crate::catalogue::load(&crate::catalogue::path())?;
    let Some(e) = entries.iter().find(|e| e.name == name) else {
        bail!(
            "no image {name:?}; images built here: {}; catalogue (ci/distros.toml): {}",
            IMAGES.iter().map(|i| i.name).collect::<Vec<_>>().join(", "),
            entries.iter().map(|e| e.name.as_str()).collect::<Vec<_>>().join(", ")
        )
    };
    let leak = |s: &str| -> &'static str { Box::leak(s.to_string().into_boxed_str()) };
    let name = leak(&e.name);
    let init = match e.init {
        crate::catalogue::Init::Systemd => Init::Systemd,
        crate::catalogue::Init::Openrc => Init::Openrc,
        crate::catalogue::Init::Sysv => Init::Sysvinit,
    };
    let l = e.root_layout.to_ascii_lowercase();
    let layout = if l.contains("lvm") {
        Layout::CloudLvm
    } else if l.contains("mbr") || l.contains("dos") {
        Layout::MbrExt4
    } else {
        Layout::GptExt4
    };
    Ok(Box::leak(Box::new(Image {
        name,
        suite: "",
        init,
        layout,
        kind: Kind::Cloud { source: CloudSource::Catalogue, entry: name },
    })))
}
