//! Root-only tier: ExtendPartition and InitializeDisk on real loop devices,
//! through the real agent binary (`xcp-vm-agent exec`). Every test is
//! `#[ignore]` in the plain tier; run them as root with
//! `cargo test -p vm-tests --test disk -- --ignored --test-threads=1`
//! (`cargo xtask test` does; see `vm_tests::tier`). Every loop device, mount and volume
//! group is removed by Drop guards, also when a test fails.
#[path = "disk/util.rs"]
mod util;

use serde_json::json;
use std::path::Path;
use util::*;

const MIB: u64 = 1 << 20;

fn mkfs(fs: &str, dev: &str) {
    match fs {
        "xfs" => sh("mkfs.xfs", &["-q", "-f", dev]),
        _ => sh(&format!("mkfs.{fs}"), &["-q", "-F", dev]),
    };
}

/// Shared body: partition `label`, filesystem `fs`, grow the disk, extend,
/// check sizes, contents and that a rerun is `no_change`.
fn extend_case(fs: &str, label: &str, sector: u32, mounted: bool, how: &str) {
    require_root();
    let (size, part, grown) = if fs == "xfs" { (400, 320, 700) } else { (128, 64, 256) };
    let l = Loop::new(size, sector);
    l.partition(label, &format!("start=1MiB,size={part}MiB"));
    let p1 = l.part(1);
    mkfs(fs, &p1);
    let mp = l.mount(&p1, "mnt");
    let files = write_files(&mp);
    if !mounted {
        sh("umount", &[mp.to_str().unwrap()]);
    }
    l.grow(grown);
    let target = match how {
        "mount_point" => json!({"mount_point": mp}),
        "partition" => json!({"device": p1}),
        _ => json!({"device": l.dev, "partition": 1}),
    };
    let a = Agent::new();
    let dump_before = sh("sfdisk", &["--dump", &l.dev]);
    let mut o = a.exec("ExtendPartition", target.clone());
    // The agent renders the dump from its one `sfdisk --json`: it must be
    // what sfdisk itself prints.
    assert_eq!(o.result["details"]["table_before"].as_str(), Some(dump_before.as_str()), "{o}");
    if mounted && fs != "xfs" && !can_resize_ext_online() {
        // Online ext growth needs CAP_SYS_RESOURCE, which this container
        // lacks: the agent must fail with resize2fs's own message after
        // growing the partition, and a rerun once unmounted must finish.
        o.expect("failed").expect_message("Permission denied");
        assert!(Loop::size_of(&p1) >= (grown - 2) * MIB, "partition not grown before the failure");
        eprintln!("note: no CAP_SYS_RESOURCE here: online resize2fs refused; finishing offline");
        sh("umount", &[mp.to_str().unwrap()]);
        let t2 = if how == "mount_point" { json!({"device": p1}) } else { target.clone() };
        o = a.exec("ExtendPartition", t2);
        o.expect("succeeded");
        assert_eq!(o.detail_u64("partition_bytes_before"), o.detail_u64("partition_bytes_after"));
        let fa = o.detail_u64("filesystem_bytes_after");
        assert!(fa > o.detail_u64("filesystem_bytes_before") && fa + 2 * MIB >= Loop::size_of(&p1), "{o}");
        sh("mount", &[&p1, mp.to_str().unwrap()]);
        check_files(&files);
        return;
    }
    o.expect("succeeded");
    let pb = o.detail_u64("partition_bytes_before");
    let pa = o.detail_u64("partition_bytes_after");
    assert_eq!(pb, part * MIB, "{o}");
    assert!(pa >= (grown - 2) * MIB, "partition only {pa} bytes: {o}");
    assert_eq!(Loop::size_of(&p1), pa, "kernel does not see the new size");
    let fa = o.detail_u64("filesystem_bytes_after");
    assert!(fa > o.detail_u64("filesystem_bytes_before") && fa + 2 * MIB >= pa, "{o}");
    if !mounted {
        assert!(mounts_of(&l.dev).is_empty(), "a temporary mount was left behind");
        sh("mount", &[&p1, mp.to_str().unwrap()]);
    }
    check_files(&files);
    if fs != "xfs" && !mounted {
        sh("umount", &[mp.to_str().unwrap()]);
        sh("e2fsck", &["-f", "-n", &p1]);
    }
    a.exec("ExtendPartition", target).expect("no_change").expect_message("disk has not grown");
}

#[test]
#[ignore = "root tier: needs root and loop devices (cargo xtask test runs it with --ignored)"]
fn extend_ext4_gpt_mounted_by_mount_point() {
    extend_case("ext4", "gpt", 512, true, "mount_point");
}

#[test]
#[ignore = "root tier: needs root and loop devices (cargo xtask test runs it with --ignored)"]
fn extend_ext4_gpt_unmounted_4k_sectors_disk_and_number() {
    extend_case("ext4", "gpt", 4096, false, "disk");
}

#[test]
#[ignore = "root tier: needs root and loop devices (cargo xtask test runs it with --ignored)"]
fn extend_ext3_mbr_unmounted_by_partition() {
    extend_case("ext3", "dos", 512, false, "partition");
}

#[test]
#[ignore = "root tier: needs root and loop devices (cargo xtask test runs it with --ignored)"]
fn extend_ext2_mbr_mounted_4k_sectors() {
    extend_case("ext2", "dos", 4096, true, "mount_point");
}

#[test]
#[ignore = "root tier: needs root and loop devices (cargo xtask test runs it with --ignored)"]
fn extend_xfs_gpt_mounted() {
    extend_case("xfs", "gpt", 512, true, "mount_point");
}

#[test]
#[ignore = "root tier: needs root and loop devices (cargo xtask test runs it with --ignored)"]
fn extend_xfs_mbr_unmounted_4k_sectors_temp_mount() {
    extend_case("xfs", "dos", 4096, false, "partition");
}

#[test]
#[ignore = "root tier: needs root and loop devices (cargo xtask test runs it with --ignored)"]
fn extend_dry_run_plans_and_changes_nothing() {
    require_root();
    let l = Loop::new(128, 512);
    l.partition("gpt", "start=1MiB,size=64MiB");
    mkfs("ext4", &l.part(1));
    l.grow(256);
    let before = l.sha();
    let a = Agent::new();
    let o = a.exec_with("ExtendPartition", json!({"device": l.part(1)}), true, None);
    o.expect("succeeded");
    let plan = o.result["details"]["plan"].to_string();
    for step in ["growpart --update off", "partx --update --nr 1", "e2fsck -f -p", "resize2fs"] {
        assert!(plan.contains(step), "plan lacks {step}: {o}");
    }
    assert_eq!(l.sha(), before, "dry run changed the device");
    assert_eq!(Loop::size_of(&l.part(1)), 64 * MIB);
}

#[test]
#[ignore = "root tier: needs root and loop devices (cargo xtask test runs it with --ignored)"]
fn extend_refuses_partition_in_the_way() {
    require_root();
    let l = Loop::new(128, 512);
    l.partition("dos", "start=1MiB,size=64MiB\nstart=65MiB,size=16MiB,type=82");
    mkfs("ext4", &l.part(1));
    sh("mkswap", &[&l.part(2)]);
    l.grow(256);
    let before = l.sha();
    let o = Agent::new().exec("ExtendPartition", json!({"device": l.dev, "partition": 1}));
    o.expect("refused").expect_message(&format!("partition 2 ({})", l.part(2)));
    assert_eq!(l.sha(), before, "refusal changed the device");
}

#[test]
#[ignore = "root tier: needs root and loop devices (cargo xtask test runs it with --ignored)"]
fn extend_refuses_luks_and_unknown_content() {
    require_root();
    let l = Loop::new(128, 512);
    l.partition("gpt", "start=1MiB,size=32MiB\nstart=40MiB,size=32MiB");
    bash(&format!(
        "printf 'LUKS\\xba\\xbe\\x00\\x01aes' | dd of={p} conv=notrunc status=none; \
         printf '12345678-1234-1234-1234-123456789012' | dd of={p} bs=1 seek=168 conv=notrunc status=none",
        p = l.part(1)
    ));
    l.grow(256);
    let before = l.sha();
    let a = Agent::new();
    a.exec("ExtendPartition", json!({"device": l.part(1)})).expect("refused").expect_message("LUKS");
    a.exec("ExtendPartition", json!({"device": l.part(2)})).expect("refused").expect_message("no filesystem");
    a.exec("ExtendPartition", json!({"mount_point": "/nonexistent-xcp"})).expect("refused");
    assert_eq!(l.sha(), before);
}

#[test]
#[ignore = "root tier: needs root and loop devices (cargo xtask test runs it with --ignored)"]
fn extend_lvm_pv_and_logical_volume() {
    require_root();
    let l = Loop::new(128, 512);
    l.partition("gpt", "start=1MiB,size=64MiB");
    let p1 = l.part(1);
    let vg = format!("xcptest{}", std::process::id());
    l.vgs.borrow_mut().push(vg.clone());
    sh("pvcreate", &["-q", &p1]);
    sh("vgcreate", &["-q", &vg, &p1]);
    // This kernel has no device-mapper, so no logical volume can exist
    // (lvcreate refuses even inactive ones): the PV growth is tested here,
    // the LV path only for its refusals.
    l.grow(256);
    let a = Agent::new();
    a.exec("ExtendPartition", json!({"device": p1, "logical_volume": "othervg/data"}))
        .expect("refused")
        .expect_message("not in the volume group");
    a.exec("ExtendPartition", json!({"device": p1, "logical_volume": format!("{vg}/nolv")}))
        .expect("refused")
        .expect_message("no logical volume");
    let o = a.exec("ExtendPartition", json!({"device": p1}));
    o.expect("succeeded");
    let steps = &o.result["details"]["steps"];
    let (before, after) = (steps[0]["before_bytes"].as_u64(), steps[0]["after_bytes"].as_u64());
    let (Some(before), Some(after)) = (before, after) else { panic!("the PV step has no byte counts: {o}") };
    assert!(after > before, "PV did not grow: {o}");
    let free = sh("vgs", &["--noheadings", "--units", "b", "--nosuffix", "-o", "vg_free", &vg]);
    assert!(free.trim().parse::<u64>().unwrap() > 180 * MIB, "vg_free is {free}");
    let o = a.exec_with("ExtendPartition", json!({"device": p1}), false, None);
    o.expect("no_change");
}

#[test]
#[ignore = "root tier: needs root and loop devices (cargo xtask test runs it with --ignored)"]
fn extend_mbr_grows_to_the_2_tib_limit() {
    require_root();
    // 2 TiB + 1 GiB sparse; only XFS metadata is written.
    let l = Loop::new(2 * 1024 * 1024 + 1024, 512);
    l.partition("dos", "start=1MiB,size=320MiB");
    let p1 = l.part(1);
    mkfs("xfs", &p1);
    let mp = l.mount(&p1, "mnt");
    let o = Agent::new().exec("ExtendPartition", json!({"mount_point": mp}));
    o.expect("succeeded").expect_message("2 TiB limit");
    let end = 2048 + Loop::size_of(&p1) / 512;
    assert!(end <= 1 << 32 && end > (1 << 32) - 2048 * 2, "partition ends at sector {end}: {o}");
    // The rerun must not claim the disk did not grow: it did, MBR is the cap.
    let o = Agent::new().exec("ExtendPartition", json!({"mount_point": mp}));
    o.expect("no_change").expect_message("2 TiB limit");
    assert!(!o.message().contains("disk has not grown"), "{o}");
}

// ---------------------------------------------------------------- InitializeDisk

fn init_params(l: &Loop, fs: &str, mp: &Path) -> serde_json::Value {
    json!({"device": l.dev, "filesystem": fs, "mount_point": mp, "label": "data"})
}

fn check_initialized(l: &Loop, a: &Agent, fs: &str, mp: &Path) {
    let p1 = l.part(1);
    let probe = sh("blkid", &["-p", "-o", "export", &p1]);
    assert!(probe.contains(&format!("TYPE={fs}")), "{probe}");
    assert!(mounts_of(&l.dev).iter().any(|m| Path::new(m) == mp), "not mounted at {}", mp.display());
    a.check_fstab();
    let t = a.fstab_text();
    let ours: Vec<&str> = t.lines().filter(|x| x.contains("xcp-vm-agent")).collect();
    assert_eq!(ours.len(), 1, "{t}");
    assert!(
        ours[0].starts_with("UUID=") && ours[0].contains("nofail") && !ours[0].contains("x-systemd.device-timeout="),
        "{}",
        ours[0]
    );
    let dump = sh("sfdisk", &["--dump", &l.dev]);
    assert!(dump.contains("label: gpt") && dump.contains("name=\"xcp-vm-agent\""), "{dump}");
}

fn init_case(fs: &str, sector: u32, mp_name: &str) {
    require_root();
    let l = Loop::new(400, sector);
    let a = Agent::new();
    let mp = l.dir.path().join(mp_name);
    let o = a.exec("InitializeDisk", init_params(&l, fs, &mp));
    o.expect("succeeded");
    check_initialized(&l, &a, fs, &mp);
    let p1 = l.part(1);
    assert_eq!(o.result["details"]["partition"].as_str(), Some(p1.as_str()), "{o}");
    let size = Loop::size_of(&p1);
    assert_eq!(size % MIB, 0);
    assert!(size > 390 * MIB);
    let again = a.exec("InitializeDisk", init_params(&l, fs, &mp));
    again.expect("no_change");
    let before = a.fstab_text();
    a.exec("InitializeDisk", init_params(&l, if fs == "xfs" { "ext4" } else { "xfs" }, &mp)).expect("refused");
    assert_eq!(a.fstab_text(), before);
}

#[test]
#[ignore = "root tier: needs root and loop devices (cargo xtask test runs it with --ignored)"]
fn initialize_ext4_512() {
    init_case("ext4", 512, "data");
}

#[test]
#[ignore = "root tier: needs root and loop devices (cargo xtask test runs it with --ignored)"]
fn initialize_xfs_4k_sectors_space_in_mount_point() {
    init_case("xfs", 4096, "my data");
}

/// After mkfs, with the disk lock released, the agent asks udev to probe the
/// new partition again: udev of systemd < 250 drops the events of a locked
/// disk, so on debian-11 (systemd 247) the `/dev/disk/by-uuid` link of the
/// new filesystem never appeared and the `UUID=` mount unit failed after
/// 90 s (VM matrix, initialize-ext4 and initialize-xfs). This host has no
/// udev: a stand-in `udevadm` first on PATH records its arguments and
/// whether it could take the disk's lock as udev does (shared, non-blocking).
#[test]
#[ignore = "root tier: needs root and loop devices (cargo xtask test runs it with --ignored)"]
fn initialize_asks_udev_to_probe_again_after_unlocking() {
    require_root();
    let l = Loop::new(300, 512);
    let a = Agent::new();
    let mp = l.dir.path().join("data");
    let bin = l.dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let log = l.dir.path().join("udevadm.log");
    let fake = bin.join("udevadm");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\nif flock -n -s {} true; then s=unlocked; else s=locked; fi\necho \"$* $s\" >> {}\n",
            l.dev,
            log.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let o = a.exec_full("InitializeDisk", init_params(&l, "ext4", &mp), false, None, Some(&bin));
    o.expect("succeeded");
    let calls = std::fs::read_to_string(&log).unwrap_or_default();
    let want = format!("trigger --action=change {} unlocked", l.part(1));
    assert!(calls.lines().any(|c| c == want), "udevadm calls {calls:?}, none is {want:?}: {o}");
}

#[test]
#[ignore = "root tier: needs root and loop devices (cargo xtask test runs it with --ignored)"]
fn initialize_dry_run_plans_and_changes_nothing() {
    require_root();
    let l = Loop::new(400, 512);
    let a = Agent::new();
    let mp = l.dir.path().join("data");
    let before = l.sha();
    let o = a.exec_with("InitializeDisk", init_params(&l, "ext4", &mp), true, None);
    o.expect("succeeded");
    let plan = o.result["details"]["plan"].to_string();
    for s in ["sgdisk --clear", "mkfs.ext4", "write ", "mount --fstab"] {
        assert!(plan.contains(s), "plan lacks {s}: {o}");
    }
    assert_eq!(l.sha(), before);
    assert_eq!(a.fstab_text(), FSTAB_HEAD);
    assert!(!mp.exists());
}

/// Each refusal names its reason and leaves the device bytes and fstab alone.
fn refused_unchanged(l: &Loop, a: &Agent, params: serde_json::Value, reason: &str) {
    let before = l.sha();
    let fstab = a.fstab_text();
    a.exec("InitializeDisk", params).expect("refused").expect_message(reason);
    assert_eq!(l.sha(), before, "refusal ({reason}) changed the device");
    assert_eq!(a.fstab_text(), fstab);
}

#[test]
#[ignore = "root tier: needs root and loop devices (cargo xtask test runs it with --ignored)"]
fn initialize_refusals_leave_the_device_unchanged() {
    require_root();
    let a = Agent::new();
    // existing filesystem on the whole disk
    let l = Loop::new(64, 512);
    mkfs("ext4", &l.dev);
    let mp = l.dir.path().join("data");
    refused_unchanged(&l, &a, init_params(&l, "ext4", &mp), "ext4");
    // leftover signature where the new partition will start
    let l = Loop::new(64, 512);
    bash(&format!(
        "truncate -s 32M {d}/old.img && mkfs.ext4 -q -F {d}/old.img && dd if={d}/old.img of={dev} bs=1M seek=1 conv=notrunc status=none",
        d = l.dir.path().display(),
        dev = l.dev
    ));
    refused_unchanged(&l, &a, init_params(&l, "ext4", &mp), "1 MiB");
    // an LVM PV
    let l = Loop::new(64, 512);
    sh("pvcreate", &["-q", &l.dev]);
    refused_unchanged(&l, &a, init_params(&l, "ext4", &mp), "LVM2_member");
    sh("pvremove", &["-q", &l.dev]);
    // a partition table, a partition as device, a mounted partition
    let l = Loop::new(64, 512);
    l.partition("gpt", "start=1MiB,size=32MiB");
    mkfs("ext4", &l.part(1));
    refused_unchanged(&l, &a, init_params(&l, "ext4", &mp), "partition table");
    refused_unchanged(&l, &a, json!({"device": l.part(1), "mount_point": mp}), "is partition 1");
    let m = l.mount(&l.part(1), "busy");
    refused_unchanged(&l, &a, json!({"device": l.dev, "mount_point": mp, "force": true}), "is mounted at");
    sh("umount", &[m.to_str().unwrap()]);
    // swap
    let l = Loop::new(64, 512);
    sh("mkswap", &[&l.dev]);
    sh("swapon", &[&l.dev]);
    let sw = refused_unchanged_swap(&l, &a, &mp);
    sh("swapoff", &[&l.dev]);
    sw.unwrap();
    // mount point problems (on an empty disk)
    let l = Loop::new(64, 512);
    refused_unchanged(&l, &a, json!({"device": l.dev, "mount_point": "/etc"}), "system directory");
    refused_unchanged(&l, &a, json!({"device": l.dev, "mount_point": "relative"}), "absolute");
    refused_unchanged(&l, &a, json!({"device": l.dev, "mount_point": format!("{}/", mp.display())}), "normalised");
    let full = l.dir.path().join("full");
    std::fs::create_dir_all(&full).unwrap();
    std::fs::write(full.join("x"), "x").unwrap();
    refused_unchanged(&l, &a, init_params(&l, "ext4", &full), "not an empty directory");
    // a duplicate fstab entry for the mount point
    let dup = l.dir.path().join("dup");
    std::fs::write(&a.fstab, format!("{FSTAB_HEAD}LABEL=other {} ext4 defaults 0 0\n", dup.display())).unwrap();
    refused_unchanged(&l, &a, init_params(&l, "ext4", &dup), "already mounts something");
    // read-only
    let l = Loop::new(64, 512);
    sh("blockdev", &["--setro", &l.dev]);
    refused_unchanged(&l, &a, init_params(&l, "ext4", &mp), "read-only");
}

fn refused_unchanged_swap(l: &Loop, a: &Agent, mp: &Path) -> Result<(), String> {
    let o = a.exec("InitializeDisk", init_params(l, "ext4", mp));
    if o.status() == "refused" && o.message().contains("swap") {
        Ok(())
    } else {
        Err(format!("swap not refused: {o}"))
    }
}

#[test]
#[ignore = "root tier: needs root and loop devices (cargo xtask test runs it with --ignored)"]
fn initialize_force_overwrites_a_signature() {
    require_root();
    let l = Loop::new(400, 512);
    mkfs("xfs", &l.dev);
    let a = Agent::new();
    let mp = l.dir.path().join("data");
    let mut p = init_params(&l, "ext4", &mp);
    p["force"] = json!(true);
    a.exec("InitializeDisk", p).expect("succeeded");
    check_initialized(&l, &a, "ext4", &mp);
}

// ---------------------------------------------------------------- fault injection

#[test]
#[ignore = "root tier: needs root and loop devices (cargo xtask test runs it with --ignored)"]
fn failpoints_initialize_every_step_converges() {
    require_root();
    for fp in
        ["initialize.after_partition", "initialize.after_mkfs", "initialize.after_fstab_temp", "initialize.after_fstab"]
    {
        let l = Loop::new(400, 512);
        let a = Agent::new();
        let mp = l.dir.path().join("data");
        let o = a.exec_with("InitializeDisk", init_params(&l, "ext4", &mp), false, Some(fp));
        assert_eq!(o.signal, Some(6), "{fp} did not kill the agent: {o}");
        a.check_fstab();
        let o = a.exec("InitializeDisk", init_params(&l, "ext4", &mp));
        assert!(o.status() == "succeeded", "rerun after {fp}: {o}");
        check_initialized(&l, &a, "ext4", &mp);
        a.exec("InitializeDisk", init_params(&l, "ext4", &mp)).expect("no_change");
    }
}

fn failpoint_extend(fs: &str, fp: &str, mounted: bool) {
    let (size, part, grown) = if fs == "xfs" { (400, 320, 700) } else { (128, 64, 256) };
    let l = Loop::new(size, 512);
    l.partition("gpt", &format!("start=1MiB,size={part}MiB"));
    let p1 = l.part(1);
    mkfs(fs, &p1);
    let mp = l.mount(&p1, "mnt");
    let files = write_files(&mp);
    if !mounted {
        sh("umount", &[mp.to_str().unwrap()]);
    }
    l.grow(grown);
    let a = Agent::new();
    // Disk + number: a kernel without table parsers (this one) may drop the
    // partition node when killed mid-way; the agent re-adds it from the table.
    let target = json!({"device": l.dev, "partition": 1});
    let o = a.exec_with("ExtendPartition", target.clone(), false, Some(fp));
    assert_eq!(o.signal, Some(6), "{fp} did not kill the agent: {o}");
    let o = a.exec("ExtendPartition", target.clone());
    assert!(o.status() == "succeeded" || o.status() == "no_change", "rerun after {fp}: {o}");
    assert!(Loop::size_of(&p1) >= (grown - 2) * MIB, "after {fp}: partition not grown");
    if !mounted {
        assert!(mounts_of(&l.dev).is_empty(), "after {fp}: temporary mount left behind");
        sh("mount", &[&p1, mp.to_str().unwrap()]);
    }
    let used = sh("df", &["-B1", "--output=size", mp.to_str().unwrap()]);
    let fs_size: u64 = used.lines().nth(1).unwrap().trim().parse().unwrap();
    assert!(fs_size > grown * MIB * 8 / 10, "after {fp}: filesystem is {fs_size} bytes");
    check_files(&files);
    a.exec("ExtendPartition", target).expect("no_change");
}

#[test]
#[ignore = "root tier: needs root and loop devices (cargo xtask test runs it with --ignored)"]
fn failpoints_extend_every_step_converges() {
    require_root();
    for fp in [
        "extend.after_lock",
        "extend.after_growpart",
        "extend.after_partx",
        "extend.after_e2fsck",
        "extend.after_resize2fs",
    ] {
        failpoint_extend("ext4", fp, false);
    }
    if can_resize_ext_online() {
        failpoint_extend("ext4", "extend.after_resize2fs", true);
    } else {
        // Not a CI failure: no container here has CAP_SYS_RESOURCE, and the
        // booted-VM tier grows a mounted ext4 online (docs/testing.md).
        eprintln!("note: no CAP_SYS_RESOURCE: the mounted ext4 after_resize2fs failpoint case is not exercised here");
    }
    for fp in ["extend.after_temp_mount", "extend.after_xfs_growfs"] {
        failpoint_extend("xfs", fp, false);
    }
}

#[test]
#[ignore = "root tier: needs root and loop devices (cargo xtask test runs it with --ignored)"]
fn initialize_probes_the_disk_under_its_lock() {
    require_root();
    // Another tool holds the disk's lock (the flock convention) and formats
    // it meanwhile. The agent must wait for the lock before it looks at the
    // disk, and then refuse: not act on what it saw before the lock.
    // The other tool formats only once the agent is waiting for the lock
    // (it has the disk's node open and is still running), so an agent that
    // looked before locking would have seen an empty disk.
    let l = Loop::new(64, 512);
    let mp = l.dir.path().join("data");
    let go = l.dir.path().join("go");
    let mut holder = std::process::Command::new("flock")
        .args([
            &l.dev,
            "sh",
            "-c",
            &format!("while [ ! -e '{}' ]; do sleep 0.05; done; mkfs.ext4 -q -F {}", go.display(), l.dev),
        ])
        .spawn()
        .unwrap();
    wait_for("the other tool's lock", || {
        !std::process::Command::new("flock").args(["-n", &l.dev, "true"]).status().unwrap().success()
    });
    let a = Agent::new();
    let params = init_params(&l, "ext4", &mp);
    let o = std::thread::scope(|sc| {
        let t = sc.spawn(|| a.exec("InitializeDisk", params));
        wait_for("the agent to wait for the disk's lock", || t.is_finished() || agent_has_open(&l.dev));
        assert!(!t.is_finished(), "the agent did not wait for the lock: {:?}", t.join().unwrap());
        std::fs::write(&go, "").unwrap();
        t.join().unwrap()
    });
    assert!(holder.wait().unwrap().success());
    o.expect("refused").expect_message("ext4");
    let probe = sh("blkid", &["-p", "-o", "export", &l.dev]);
    assert!(probe.contains("TYPE=ext4"), "the other tool's filesystem was destroyed: {probe}");
    assert_eq!(a.fstab_text(), FSTAB_HEAD);
}

#[test]
#[ignore = "root tier: needs root and loop devices (cargo xtask test runs it with --ignored)"]
fn initialize_refuses_a_stale_fstab_line_for_the_partition_it_would_create() {
    require_root();
    // fstab still names partition 1 of this disk by path (left from the
    // disk that was there before). The partition does not exist yet, but
    // the one InitializeDisk creates gets that name: two entries, one disk.
    let l = Loop::new(64, 512);
    assert!(l.part_opt(1).is_none());
    let a = Agent::new();
    let old = l.dir.path().join("old");
    std::fs::write(&a.fstab, format!("{FSTAB_HEAD}{}p1 {} ext4 defaults 0 2\n", l.dev, old.display())).unwrap();
    let mp = l.dir.path().join("data");
    refused_unchanged(&l, &a, init_params(&l, "ext4", &mp), "already names this device");
}
