//! The offline cloud image `debian-12-genericcloud` and the NoCloud seed.
//!
//! Owns what the matrix's cloud kind (`xtask/src/vm/cloud.rs`) needs from
//! outside the runner:
//! - [`build_genericcloud`]: a qcow2 that looks like a distribution's cloud
//!   image, made from Debian's archive: a GPT disk with a BIOS boot
//!   partition (14) and the ext4 root as partition 1 at the end (growable),
//!   GRUB in the image's own boot sector, `cloud-init`, Debian's cloud
//!   kernel. Booted by its own bootloader, never `-kernel`.
//! - [`nocloud_seed`]: the NoCloud seed, a vfat image labelled `cidata`
//!   with `meta-data` and `user-data` (mtools: no mount needed).
//! - [`user_data`]: the cloud-config text (files to write, commands to run,
//!   `{pkg}` and friends filled in).
//!
//! Booting, the server and the scenarios are the matrix's
//! (`cargo xtask vm-test --image debian-12-genericcloud`; `cargo xtask
//! vm-cloud` is an alias for it).
use crate::util::{self, step};
use anyhow::{ensure, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// What the offline genericcloud image is made of (part of its cache key).
const SUITE: &str = "bookworm";
const INCLUDE: &str = "systemd,systemd-sysv,udev,linux-image-cloud-amd64,initramfs-tools,grub-pc-bin,grub2-common,\
cloud-init,ifupdown,isc-dhcp-client,netbase,cloud-guest-utils,parted,gdisk,fdisk,e2fsprogs,xfsprogs,util-linux,\
procps,iproute2,lvm2,python3-requests";
/// Bump when the image recipe below changes (the layout, grub.cfg, fstab).
const RECIPE: &str = "genericcloud-v3 (C.UTF-8, no_timer_check): gpt p14 bios_grub 2048+6144, \
     p1 ext4 LABEL=cloudimg-rootfs to the end, 3 GiB";
const DISK_BYTES: u64 = 3 << 30;
/// The label of the root filesystem (Debian's and Ubuntu's cloud images use
/// this one too).
pub const ROOT_LABEL: &str = "cloudimg-rootfs";

fn cache_dir() -> PathBuf {
    util::root().join("target/cloudimg")
}

/// The cached `debian-12-genericcloud` qcow2, built when its recipe changed.
pub fn build_genericcloud() -> Result<PathBuf> {
    let dir = cache_dir();
    std::fs::create_dir_all(&dir)?;
    let img = dir.join("debian-12-genericcloud.qcow2");
    let stamp = dir.join("debian-12-genericcloud.recipe");
    let key = format!("{RECIPE}\n{SUITE}\n{INCLUDE}\n");
    if img.exists() && std::fs::read_to_string(&stamp).map(|s| s == key).unwrap_or(false) {
        step(&format!("cloud image: debian-12-genericcloud cached ({})", img.display()));
        return Ok(img);
    }
    let t = Instant::now();
    let tar = dir.join(format!("genericcloud-{SUITE}.tar"));
    util::debian_tarball(&tar, SUITE, INCLUDE, "cloud image")?;
    step("cloud image: GPT disk, ext4 root, GRUB, cloud-init (debian-12-genericcloud)");
    let work = dir.join("build");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let rootfs = work.join("rootfs");
    std::fs::create_dir_all(&rootfs)?;
    util::run(Command::new("tar").arg("-xf").arg(&tar).arg("-C").arg(&rootfs))?;
    configure_rootfs(&rootfs)?;

    let raw = work.join("disk.raw");
    std::fs::File::create(&raw)?.set_len(DISK_BYTES)?;
    let layout = "label: gpt\nfirst-lba: 2048\n\
                  disk14 : start=2048, size=6144, type=21686148-6453-6F6E-744E-656564454649\n\
                  disk1 : start=8192, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n";
    let mut sf = Command::new("sfdisk");
    sf.args(["--quiet", "--no-reread", "--no-tell-kernel"]).arg(&raw);
    pipe_in(&mut sf, layout)?;

    // The root filesystem's UUID is chosen here so grub.cfg and the kernel
    // command line can name it before the filesystem exists.
    let uuid = new_uuid();
    write_grub_cfg(&rootfs, &uuid)?;
    // GRUB's core image, made by the image's own grub-mkimage (so it
    // matches the modules in the image), with an embedded config that finds
    // the root by UUID; the modules go to /boot/grub/i386-pc as
    // grub-install puts them.
    let grub_mods = rootfs.join("boot/grub/i386-pc");
    std::fs::create_dir_all(&grub_mods)?;
    for e in std::fs::read_dir(rootfs.join("usr/lib/grub/i386-pc"))? {
        let e = e?;
        let n = e.file_name().to_string_lossy().into_owned();
        if n.ends_with(".mod") || n.ends_with(".lst") {
            std::fs::copy(e.path(), grub_mods.join(&n))?;
        }
    }
    std::fs::write(
        rootfs.join("tmp/early.cfg"),
        format!("search --no-floppy --fs-uuid --set=root {uuid}\nset prefix=($root)/boot/grub\n"),
    )?;
    util::run(Command::new("chroot").arg(&rootfs).args([
        "grub-mkimage",
        "-O",
        "i386-pc",
        "-o",
        "/tmp/core.img",
        "-c",
        "/tmp/early.cfg",
        "-p",
        "/boot/grub",
        "biosdisk",
        "part_gpt",
        "ext2",
        "search",
        "search_fs_uuid",
    ]))?;
    let core = std::fs::read(rootfs.join("tmp/core.img"))?;
    let boot_img = std::fs::read(rootfs.join("usr/lib/grub/i386-pc/boot.img"))?;
    std::fs::remove_file(rootfs.join("tmp/core.img"))?;
    std::fs::remove_file(rootfs.join("tmp/early.cfg"))?;
    {
        let lo = Loop::attach(&raw)?;
        let p1 = lo.partition(1)?;
        util::run(Command::new("mkfs.ext4").args(["-q", "-L", ROOT_LABEL, "-U", &uuid, "-d"]).arg(&rootfs).arg(&p1))?;
    }
    embed_grub(&raw, &boot_img, &core, BIOS_BOOT_START, BIOS_BOOT_SECTORS)?;
    eprintln!("    GRUB: boot sector + {} KiB core image in the BIOS boot partition", core.len() >> 10);
    std::fs::remove_dir_all(&rootfs)?;
    let tmp = dir.join("debian-12-genericcloud.qcow2.tmp");
    util::run(Command::new("qemu-img").args(["convert", "-q", "-O", "qcow2"]).arg(&raw).arg(&tmp))?;
    std::fs::rename(&tmp, &img)?;
    std::fs::write(&stamp, key)?;
    let _ = std::fs::remove_dir_all(&work);
    eprintln!(
        "    built {} ({} MiB) in {:.0} s",
        img.display(),
        std::fs::metadata(&img)?.len() >> 20,
        t.elapsed().as_secs_f64()
    );
    Ok(img)
}

/// What a distribution's cloud image has that a plain rootfs lacks: an
/// fstab naming the root by label, a serial console, cloud-init limited to
/// NoCloud (no waiting for metadata services that do not exist here).
fn configure_rootfs(rootfs: &Path) -> Result<()> {
    let etc = rootfs.join("etc");
    std::fs::write(etc.join("fstab"), format!("LABEL={ROOT_LABEL} / ext4 defaults 0 1\n"))?;
    std::fs::write(etc.join("hostname"), "debian\n")?;
    // An empty machine-id: systemd makes one at first boot, as on a real
    // cloud image, so every VM made from the image gets its own.
    std::fs::write(etc.join("machine-id"), "")?;
    let cfg = etc.join("cloud/cloud.cfg.d");
    std::fs::create_dir_all(&cfg)?;
    std::fs::write(cfg.join("90-datasource.cfg"), "datasource_list: [ NoCloud, None ]\n")?;
    // The image has no locales package: the built-in C.UTF-8, not en_US.
    std::fs::write(cfg.join("91-locale.cfg"), "locale: C.UTF-8\n")?;
    // The first NIC by DHCP, as cloud images do (QEMU's user network answers).
    std::fs::create_dir_all(etc.join("network/interfaces.d"))?;
    std::fs::write(
        etc.join("network/interfaces"),
        "auto lo\niface lo inet loopback\n\nsource /etc/network/interfaces.d/*\n",
    )?;
    Ok(())
}

/// Partition 14, the BIOS boot partition (sectors).
const BIOS_BOOT_START: u64 = 2048;
const BIOS_BOOT_SECTORS: u64 = 6144;

/// What grub-bios-setup does for a GPT disk with a BIOS boot partition,
/// done on the image file (on this host, without udev, grub-install cannot
/// map a loop device to a BIOS drive): the core image goes into the BIOS
/// boot partition with the blocklist in its first sector naming the rest;
/// the boot sector gets GRUB's code (the partition table and disk signature
/// stay), the core's first sector and the hard-disk drive-check workaround.
fn embed_grub(disk: &Path, boot_img: &[u8], core: &[u8], start: u64, max_sectors: u64) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    ensure!(boot_img.len() == 512, "boot.img is {} bytes, not 512", boot_img.len());
    let sectors = core.len().div_ceil(512) as u64;
    ensure!(
        sectors >= 2 && sectors <= max_sectors,
        "core.img has {sectors} sectors; the BIOS boot partition holds {max_sectors}"
    );
    let mut core = core.to_vec();
    core.resize(sectors as usize * 512, 0);
    // diskboot.img's blocklist: the last 12 bytes of the first sector.
    let bl = 512 - 12;
    core[bl..bl + 8].copy_from_slice(&(start + 1).to_le_bytes());
    core[bl + 8..bl + 10].copy_from_slice(&((sectors - 1) as u16).to_le_bytes());
    core[bl + 10..bl + 12].copy_from_slice(&0x820u16.to_le_bytes());
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(disk)?;
    let mut mbr = [0u8; 512];
    f.read_exact(&mut mbr)?;
    ensure!(mbr[510] == 0x55 && mbr[511] == 0xaa, "{}: no protective MBR", disk.display());
    let mut boot = boot_img.to_vec();
    // Keep the disk's own bytes from the NT signature on (0x1b8..0x200):
    // disk signature, partition table, boot signature.
    boot[0x1b8..].copy_from_slice(&mbr[0x1b8..]);
    boot[0x5c..0x64].copy_from_slice(&start.to_le_bytes()); // kernel sector
    boot[0x64] = 0xff; // boot drive: the one the BIOS says
    boot[0x66] = 0x90; // drive-check workaround for hard disks: jmp -> nop nop
    boot[0x67] = 0x90;
    f.seek(SeekFrom::Start(0))?;
    f.write_all(&boot)?;
    f.seek(SeekFrom::Start(start * 512))?;
    f.write_all(&core)?;
    f.sync_all()?;
    Ok(())
}

fn newest(dir: &Path, prefix: &str) -> Result<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.starts_with(prefix))
        .collect();
    v.sort();
    v.pop().with_context(|| format!("no {prefix}* in {}", dir.display()))
}

/// grub.cfg as a cloud image has it: the root found by UUID, a serial
/// console, the newest kernel.
fn write_grub_cfg(rootfs: &Path, uuid: &str) -> Result<()> {
    let boot = rootfs.join("boot");
    let (kernel, initrd) = (newest(&boot, "vmlinuz-")?, newest(&boot, "initrd.img-")?);
    let cfg = format!(
        "set timeout=1\nserial --unit=0 --speed=115200\nterminal_input serial console\nterminal_output serial console\n\
         search --no-floppy --fs-uuid --set=root {uuid}\n\
         menuentry 'Debian GNU/Linux (genericcloud)' {{\n\
         \tlinux /boot/{kernel} root=UUID={uuid} ro console=tty0 console=ttyS0,115200 net.ifnames=0 panic=-1 no_timer_check\n\
         \tinitrd /boot/{initrd}\n}}\n"
    );
    std::fs::create_dir_all(boot.join("grub"))?;
    std::fs::write(boot.join("grub/grub.cfg"), cfg)?;
    Ok(())
}

fn new_uuid() -> String {
    let mut b = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// A loop device over an image file, partitions scanned; detached on drop.
pub struct Loop {
    pub dev: PathBuf,
}

impl Loop {
    pub fn attach(file: &Path) -> Result<Loop> {
        let out = util::output(Command::new("losetup").args(["--find", "--show", "--partscan"]).arg(file))?;
        Ok(Loop { dev: PathBuf::from(out.trim()) })
    }

    /// The node of partition `n`, waited for. This machine's kernel parses
    /// no partition tables, so partx tells it (a no-op where it did); no
    /// udev: devtmpfs makes the node a moment later.
    pub fn partition(&self, n: u32) -> Result<PathBuf> {
        let p = PathBuf::from(format!("{}p{n}", self.dev.display()));
        if !p.exists() {
            let _ = Command::new("partx").args(["--add", "--nr", &n.to_string()]).arg(&self.dev).output();
        }
        let t = Instant::now();
        while !p.exists() {
            ensure!(t.elapsed() < Duration::from_secs(20), "{} did not appear", p.display());
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(p)
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

fn pipe_in(cmd: &mut Command, input: &str) -> Result<()> {
    use std::io::Write;
    let line = format!("{cmd:?}");
    let mut child = cmd.stdin(std::process::Stdio::piped()).spawn().with_context(|| format!("cannot start {line}"))?;
    child.stdin.take().unwrap().write_all(input.as_bytes())?;
    let st = child.wait()?;
    ensure!(st.success(), "{line} failed with {st}");
    Ok(())
}

/// A vfat image of `mib` MiB labelled `label` holding `files` (name, bytes)
/// at its top level; made with mkfs.vfat and mcopy, nothing mounted.
fn vfat(path: &Path, label: &str, mib: u64, files: &[(String, Vec<u8>)]) -> Result<()> {
    let _ = std::fs::remove_file(path);
    util::output(Command::new("mkfs.vfat").args(["-n", label, "-C"]).arg(path).arg((mib * 1024).to_string()))?;
    let stage = path.with_extension("files");
    let _ = std::fs::remove_dir_all(&stage);
    std::fs::create_dir_all(&stage)?;
    for (name, bytes) in files {
        let f = stage.join(name);
        std::fs::write(&f, bytes)?;
        util::output(Command::new("mcopy").arg("-i").arg(path).arg(&f).arg(format!("::{name}")))?;
    }
    std::fs::remove_dir_all(&stage)?;
    Ok(())
}

/// The NoCloud seed (`cidata`).
pub fn nocloud_seed(path: &Path, instance_id: &str, hostname: &str, user_data: &str) -> Result<()> {
    let meta = format!("instance-id: {instance_id}\nlocal-hostname: {hostname}\n");
    vfat(
        path,
        "cidata",
        2,
        &[("meta-data".into(), meta.into_bytes()), ("user-data".into(), user_data.as_bytes().to_vec())],
    )
}

/// A file cloud-init writes before anything runs.
pub struct SeedFile<'a> {
    pub path: &'a str,
    pub mode: &'a str,
    pub content: &'a str,
}

/// The cloud-config: write `files`, add `hosts` lines to /etc/hosts, then
/// run `cmds` in order (empty ones left out), with `{pkg}` replaced by
/// `pkg_dir/pkg_file` and `{tools}`/`{keys}` by `pkg_dir`.
pub fn user_data(files: &[SeedFile], hosts: &str, cmds: &[String], pkg_dir: &str, pkg_file: &str) -> String {
    let mut s = String::from("#cloud-config\n# xcp-vm-agent VM matrix: provisioning from the FILES disk, no network\n");
    s.push_str("manage_etc_hosts: false\nwrite_files:\n");
    for f in files {
        // `|` ends the text with one newline, `|-` with none: the file as given.
        let chomp = if f.content.ends_with('\n') { "|" } else { "|-" };
        s.push_str(&format!("  - path: {}\n    permissions: '{}'\n    content: {chomp}\n", f.path, f.mode));
        for l in f.content.lines() {
            s.push_str(&format!("      {l}\n"));
        }
    }
    s.push_str("runcmd:\n");
    let hosts = format!("printf '%s\\n' {} >> /etc/hosts", shell_quote(hosts.trim_end()));
    for cmd in std::iter::once(&hosts).chain(cmds) {
        let cmd = cmd
            .replace("{pkg}", &format!("{pkg_dir}/{pkg_file}"))
            .replace("{tools}", pkg_dir)
            .replace("{keys}", pkg_dir);
        if !cmd.trim().is_empty() {
            s.push_str(&format!("  - [ sh, -c, {} ]\n", yaml_quote(&cmd)));
        }
    }
    s
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn yaml_quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

const HELP: &str = "\
cargo xtask vm-cloud [vm-test options]

The cloud path of the VM matrix on the offline image debian-12-genericcloud:
an alias for `cargo xtask vm-test --image debian-12-genericcloud [options]`
(see `cargo xtask vm-test --help`). The image (a qcow2 with GPT, GRUB,
cloud-init and Debian's cloud kernel, built from Debian's archive and cached
in target/cloudimg/) boots by its own bootloader with a NoCloud seed;
cloud-init sets up the test shell, writes the agent's config and
certificates and installs the .deb from the FILES disk with the catalogue's
debian-12 `install` command; then every scenario of the matrix runs.
";

/// `cargo xtask vm-cloud`: the arguments of `vm-test --image
/// debian-12-genericcloud` (main.rs runs it); None after `--help`.
pub fn vm_args(args: &[String]) -> Option<Vec<String>> {
    if args.iter().any(|a| a == "-h" || a == "--help") {
        print!("{HELP}");
        return None;
    }
    let mut v = vec!["--image".to_string(), "debian-12-genericcloud".to_string()];
    v.extend(args.iter().cloned());
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_is_a_cloud_config_with_the_install_command_filled_in() {
        let files = [SeedFile { path: "/etc/xcp-vm-agent/config.json", mode: "0600", content: "{\n  \"a\": 1\n}\n" }];
        let cmds = ["mount LABEL=FILES /mnt/files".to_string(), String::new(), "apt-get install -y {pkg}".into()];
        let u = user_data(&files, "10.0.2.100 mgmt.test\n", &cmds, "/mnt/files", "x.deb");
        assert!(u.starts_with("#cloud-config\n"), "{u}");
        assert!(u.contains("    content: |\n      {\n        \"a\": 1\n      }\n"), "{u}");
        // A file without a final newline is written without one (a config
        // compared byte for byte with the FILES disk's copy was one longer).
        let bare = [SeedFile { path: "/x", mode: "0644", content: "{}" }];
        let u2 = user_data(&bare, "", &[], "/mnt/files", "x.deb");
        assert!(u2.contains("    content: |-\n      {}\n"), "{u2}");
        assert!(u.contains("permissions: '0600'"));
        assert!(u.contains("\"apt-get install -y /mnt/files/x.deb\""), "{u}");
        assert!(u.contains("printf '%s\\\\n' '10.0.2.100 mgmt.test' >> /etc/hosts"), "{u}");
        assert!(!u.contains("{pkg}"));
        // In order, the empty one left out.
        let (h, m, i) = (u.find("/etc/hosts").unwrap(), u.find("LABEL=FILES").unwrap(), u.find("apt-get").unwrap());
        assert!(h < m && m < i, "{u}");
        assert_eq!(u.matches("  - [ sh, -c,").count(), 3, "{u}");
    }
}
