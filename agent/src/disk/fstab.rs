//! fstab: parse, find duplicates, add the agent's entry, write atomically.
//!
//! Every line not added by us is kept byte for byte (comments, blank lines,
//! odd spacing). Fields are compared unescaped (`\040` is a space). The
//! write goes to a temp file beside fstab, is fsynced, checked by the
//! caller's `verify` (InitializeDisk runs `findmnt --verify --tab-file`),
//! then renamed over fstab, and the directory is fsynced; mode and owner are
//! kept. A crash leaves the old file or the new one, never a torn one.
use anyhow::{bail, Context, Result};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Trailing comment on every line the agent adds.
pub const MARKER: &str = "# added by xcp-vm-agent InitializeDisk";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub spec: String,
    pub file: String,
    pub vfstype: String,
    pub mntops: String,
    pub freq: String,
    pub passno: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub raw: String,
    pub entry: Option<Entry>,
}

/// Escape a field for fstab: backslash, `#` (a word starting with it begins
/// the trailing comment for [`parse`]), and every character `parse` would
/// split a line at (space, tab, newline, and the rest of `char::is_whitespace`:
/// carriage return, vertical tab, form feed, Unicode spaces) as octal `\NNN`,
/// byte by byte, as libmount and glibc read it back.
pub fn escape(s: &str) -> String {
    let mut o = String::new();
    for c in s.chars() {
        if c == '\\' || c == '#' || c.is_whitespace() {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                o.push_str(&format!("\\{b:03o}"));
            }
        } else {
            o.push(c);
        }
    }
    o
}

/// Undo [`escape`] (any `\NNN` octal escape).
pub fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') as u32 * 64 + (b[i + 2] - b'0') as u32 * 8 + (b[i + 3] - b'0') as u32;
            // Up to \\777: the low byte, as util-linux's unmangle keeps it.
            out.push(v.to_le_bytes()[0]);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parse fstab text into lines, keeping each raw line (without its newline).
pub fn parse(text: &str) -> Vec<Line> {
    text.split_inclusive('\n')
        .map(|l| {
            let raw = l.strip_suffix('\n').unwrap_or(l).to_string();
            let body = raw.trim_start();
            let entry = if body.is_empty() || body.starts_with('#') {
                None
            } else {
                let f: Vec<&str> = body.split_whitespace().take_while(|w| !w.starts_with('#')).collect();
                if f.len() < 2 {
                    None
                } else {
                    let g = |i: usize, d: &str| f.get(i).map(|s| unescape(s)).unwrap_or_else(|| d.to_string());
                    Some(Entry {
                        spec: g(0, ""),
                        file: g(1, ""),
                        vfstype: g(2, "auto"),
                        mntops: g(3, "defaults"),
                        freq: g(4, "0"),
                        passno: g(5, "0"),
                    })
                }
            };
            Line { raw, entry }
        })
        .collect()
}

/// The line for an entry, every field escaped (freq and passno too: a
/// parsed entry carries them unescaped), with the agent's marker.
pub fn render(e: &Entry) -> String {
    format!(
        "{} {} {} {} {} {} {MARKER}",
        escape(&e.spec),
        escape(&e.file),
        escape(&e.vfstype),
        escape(&e.mntops),
        escape(&e.freq),
        escape(&e.passno)
    )
}

/// Every way fstab may name the device being added.
#[derive(Debug, Clone, Default)]
pub struct DeviceIds {
    pub uuid: Option<String>,
    pub label: Option<String>,
    pub partuuid: Option<String>,
    pub partlabel: Option<String>,
    /// Canonical node paths (the partition and, to be safe, its disk).
    pub paths: Vec<PathBuf>,
}

/// What the fstab already says about the device or mount point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Existing {
    /// Nothing: the entry can be added.
    None,
    /// Our own identical entry is already there (line index).
    Identical(usize),
    /// A conflicting entry: the reason names the line.
    Conflict(String),
}

fn norm_mp(s: &str) -> String {
    let t = s.trim_end_matches('/');
    if t.is_empty() {
        "/".into()
    } else {
        t.to_string()
    }
}

fn unquote(s: &str) -> &str {
    s.strip_prefix('"').and_then(|x| x.strip_suffix('"')).unwrap_or(s)
}

/// Undo udev's `\xNN` escaping of a `/dev/disk/by-*` link name.
fn unescape_udev(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1] == b'x' {
            if let Some(v) = std::str::from_utf8(&b[i + 2..i + 4]).ok().and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `spec` (any spelling) names the device described by `ids`.
/// `resolve` turns a path spec into its canonical node (tests pass a fake).
pub fn spec_matches(spec: &str, ids: &DeviceIds, resolve: &dyn Fn(&str) -> Option<PathBuf>) -> bool {
    let eq_ci = |a: &Option<String>, b: &str| a.as_deref().map(|a| a.eq_ignore_ascii_case(unquote(b))).unwrap_or(false);
    let eq = |a: &Option<String>, b: &str| a.as_deref().map(|a| a == unquote(b)).unwrap_or(false);
    if let Some(v) = spec.strip_prefix("UUID=") {
        return eq_ci(&ids.uuid, v);
    }
    if let Some(v) = spec.strip_prefix("PARTUUID=") {
        return eq_ci(&ids.partuuid, v);
    }
    if let Some(v) = spec.strip_prefix("LABEL=") {
        return eq(&ids.label, v);
    }
    if let Some(v) = spec.strip_prefix("PARTLABEL=") {
        return eq(&ids.partlabel, v);
    }
    // udev's link names: the id is in the path even when the link does not
    // exist yet (a filesystem about to be made) or leads elsewhere.
    if let Some(rest) = spec.strip_prefix("/dev/disk/") {
        if let Some((kind, v)) = rest.split_once('/') {
            let v = unescape_udev(v);
            let hit = match kind {
                "by-uuid" => eq_ci(&ids.uuid, &v),
                "by-partuuid" => eq_ci(&ids.partuuid, &v),
                "by-label" => eq(&ids.label, &v),
                "by-partlabel" => eq(&ids.partlabel, &v),
                _ => false,
            };
            if hit {
                return true;
            }
        }
    }
    if spec.starts_with('/') {
        if ids.paths.iter().any(|p| p == Path::new(spec)) {
            return true;
        }
        if let Some(r) = resolve(spec) {
            return ids.paths.contains(&r);
        }
    }
    false
}

/// Look for an entry with the same mount point or the same device.
pub fn find_existing(
    lines: &[Line],
    new: &Entry,
    ids: &DeviceIds,
    resolve: &dyn Fn(&str) -> Option<PathBuf>,
) -> Existing {
    let mut identical = None;
    for (i, l) in lines.iter().enumerate() {
        let Some(e) = &l.entry else { continue };
        if e == new {
            identical = Some(i);
            continue;
        }
        if norm_mp(&e.file) == norm_mp(&new.file) && e.file != "none" {
            return Existing::Conflict(format!(
                "fstab line {} already mounts something at {}: {:?}",
                i + 1,
                new.file,
                l.raw
            ));
        }
        if spec_matches(&e.spec, ids, resolve) {
            return Existing::Conflict(format!("fstab line {} already names this device: {:?}", i + 1, l.raw));
        }
    }
    identical.map(Existing::Identical).unwrap_or(Existing::None)
}

/// `text` with `line` appended; a missing final newline is added first.
pub fn append(text: &str, line: &str) -> String {
    let mut s = text.to_string();
    if !s.is_empty() && !s.ends_with('\n') {
        s.push('\n');
    }
    s.push_str(line);
    s.push('\n');
    s
}

/// The temp file used beside `path`.
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "fstab".into());
    path.with_file_name(format!(".{name}.xcp-vm-agent.tmp"))
}

/// Write `text` over `path` atomically; `verify` checks the temp file before
/// it replaces the old one (an error leaves the old file untouched).
pub fn write_atomic(path: &Path, text: &str, verify: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    // An fstab that is a symbolic link (some appliances keep /etc on another
    // volume): replace the file it points to, and keep the link.
    let resolved;
    let path = if fs::symlink_metadata(path).map(|m| m.file_type().is_symlink()).unwrap_or(false) {
        resolved = fs::canonicalize(path).with_context(|| format!("cannot resolve the link {}", path.display()))?;
        resolved.as_path()
    } else {
        path
    };
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = temp_path(path);
    let old = fs::metadata(path).ok();
    let r = (|| -> Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(text.as_bytes()).with_context(|| format!("cannot write {}", tmp.display()))?;
        if let Some(m) = &old {
            f.set_permissions(fs::Permissions::from_mode(m.mode() & 0o7777))?;
            std::os::unix::fs::fchown(&f, Some(m.uid()), Some(m.gid()))
                .with_context(|| format!("cannot set the owner of {}", tmp.display()))?;
        } else {
            // A new fstab is world-readable whatever the process umask.
            f.set_permissions(fs::Permissions::from_mode(0o644))?;
        }
        f.sync_all().with_context(|| format!("cannot fsync {}", tmp.display()))?;
        drop(f);
        crate::failpoint::hit("initialize.after_fstab_temp");
        verify(&tmp)?;
        Ok(())
    })();
    if let Err(e) = r {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, path).with_context(|| format!("cannot rename {} over {}", tmp.display(), path.display()))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot fsync directory {}", dir.display()))?;
    Ok(())
}

/// Read fstab; a missing file is an empty one.
pub fn read(path: &Path) -> Result<String> {
    match fs::read(path) {
        Ok(b) => match String::from_utf8(b) {
            Ok(s) => Ok(s),
            Err(_) => bail!("{} is not valid UTF-8; not editing it", path.display()),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FSTAB: &str = "# /etc/fstab: static file system information.\n\
UUID=1111-aaaa /               ext4    errors=remount-ro 0       1\n\
\n\
  # indented comment\n\
/dev/xvda5 none swap sw 0 0\n\
LABEL=backup /mnt/back\\040up xfs defaults,nofail 0 0\n\
PARTUUID=ABCD-01 /srv/old ext4 defaults\n\
proc /proc proc defaults 0 0";

    fn ours() -> Entry {
        Entry {
            spec: "UUID=2222-bbbb".into(),
            file: "/data".into(),
            vfstype: "ext4".into(),
            mntops: "defaults,nofail,x-systemd.device-timeout=30s".into(),
            freq: "0".into(),
            passno: "2".into(),
        }
    }

    fn ids() -> DeviceIds {
        DeviceIds {
            uuid: Some("2222-BBBB".into()),
            label: Some("data".into()),
            partuuid: Some("eeee-ffff".into()),
            partlabel: Some("xcp-vm-agent".into()),
            paths: vec!["/dev/xvdb1".into(), "/dev/xvdb".into()],
        }
    }

    fn no_resolve(_: &str) -> Option<PathBuf> {
        None
    }

    #[test]
    fn parse_keeps_raw_lines_and_unescapes() {
        let l = parse(FSTAB);
        assert_eq!(l.len(), 8);
        assert_eq!(l.iter().map(|x| x.raw.as_str()).collect::<Vec<_>>().join("\n"), FSTAB);
        assert!(l[0].entry.is_none() && l[2].entry.is_none() && l[3].entry.is_none());
        assert_eq!(l[5].entry.as_ref().unwrap().file, "/mnt/back up");
        assert_eq!(l[6].entry.as_ref().unwrap().passno, "0");
    }

    #[test]
    fn append_keeps_every_other_byte() {
        let out = append(FSTAB, &render(&ours()));
        assert!(out.starts_with(FSTAB));
        assert_eq!(&out[FSTAB.len()..FSTAB.len() + 1], "\n");
        assert!(out.ends_with(&format!("30s 0 2 {MARKER}\n")));
        assert_eq!(append("", "x"), "x\n");
        assert_eq!(append("a\n", "x"), "a\nx\n");
    }

    #[test]
    fn an_entry_with_a_backslash_in_freq_round_trips() {
        // Found by the fstab fuzz target in a CI run (crash-53566b9b): freq
        // and passno were rendered unescaped, so a parsed freq holding
        // `\066` (backslash, then octal digits) came back as `66`.
        let e = Entry {
            spec: "/dev/x".into(),
            file: "/x".into(),
            vfstype: "ext4".into(),
            mntops: "defaults".into(),
            freq: "\\0666".into(),
            passno: "\\1".into(),
        };
        let again = parse(&render(&e));
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].entry.as_ref(), Some(&e));
    }

    #[test]
    fn a_field_with_a_carriage_return_or_unicode_space_round_trips() {
        // Found by the fstab fuzz target in a second clean-clone CI run: a
        // spec holding `\r` was rendered raw, and parse (which splits at any
        // whitespace) read it back as two fields.
        // And (third run) a field starting with `#` was read back as the
        // start of the trailing comment.
        for spec in ["/dev/a\r3", "/dev/b\u{b}\u{c}x", "/mnt/with\u{a0}nbsp", "/x\u{2003}y", "#\\2", "a#b"] {
            let e = Entry {
                spec: spec.into(),
                file: "/x".into(),
                vfstype: "ext4".into(),
                mntops: "defaults".into(),
                freq: "0".into(),
                passno: "2".into(),
            };
            let again = parse(&render(&e));
            assert_eq!(again.len(), 1, "{spec:?}");
            assert_eq!(again[0].entry.as_ref(), Some(&e), "{spec:?}");
            assert_eq!(unescape(&escape(spec)), spec);
        }
        assert_eq!(escape("a b\tc\\"), "a\\040b\\011c\\134", "the common escapes keep their form");
    }

    #[test]
    fn escape_roundtrips_spaces_and_backslashes() {
        let s = "/mnt/my data\\x\ty";
        assert_eq!(escape(s), "/mnt/my\\040data\\134x\\011y");
        assert_eq!(unescape(&escape(s)), s);
        let mut e = ours();
        e.file = "/mnt/a b".into();
        let l = parse(&render(&e));
        assert_eq!(l[0].entry.as_ref().unwrap(), &e);
    }

    #[test]
    fn duplicate_mount_point_is_a_conflict() {
        let mut e = ours();
        e.file = "/mnt/back up/".into();
        match find_existing(&parse(FSTAB), &e, &ids(), &no_resolve) {
            Existing::Conflict(r) => assert!(r.contains("line 6"), "{r}"),
            x => panic!("{x:?}"),
        }
    }

    #[test]
    fn duplicate_device_in_every_spelling() {
        for spec in [
            "UUID=2222-bbbb",
            "UUID=\"2222-BBBB\"",
            "LABEL=data",
            "PARTUUID=EEEE-FFFF",
            "PARTLABEL=xcp-vm-agent",
            "/dev/xvdb1",
            "/dev/disk/by-uuid/2222-bbbb",
        ] {
            let text = format!("{FSTAB}\n{spec} /elsewhere ext4 defaults 0 0\n");
            let resolve = |s: &str| (s == "/dev/disk/by-uuid/2222-bbbb").then(|| PathBuf::from("/dev/xvdb1"));
            match find_existing(&parse(&text), &ours(), &ids(), &resolve) {
                Existing::Conflict(r) => assert!(r.contains("line 9"), "{spec}: {r}"),
                x => panic!("{spec}: {x:?}"),
            }
        }
    }

    #[test]
    fn duplicate_device_by_udev_link_name_without_the_link() {
        // The /dev/disk/by-* links of a filesystem InitializeDisk has not
        // made yet do not exist (or point at another disk with the same
        // label): the name in the link path still names this device.
        for spec in [
            "/dev/disk/by-uuid/2222-bbbb",
            "/dev/disk/by-label/data",
            "/dev/disk/by-partuuid/EEEE-FFFF",
            "/dev/disk/by-partlabel/xcp-vm-agent",
        ] {
            let text = format!("{FSTAB}\n{spec} /elsewhere ext4 defaults 0 0\n");
            match find_existing(&parse(&text), &ours(), &ids(), &no_resolve) {
                Existing::Conflict(r) => assert!(r.contains("line 9"), "{spec}: {r}"),
                x => panic!("{spec}: {x:?}"),
            }
        }
        let mut i = ids();
        i.label = Some("my data".into());
        let text = format!("{FSTAB}\n/dev/disk/by-label/my\\x20data /elsewhere ext4 defaults 0 0\n");
        assert!(matches!(find_existing(&parse(&text), &ours(), &i, &no_resolve), Existing::Conflict(_)));
        let text = format!("{FSTAB}\n/dev/disk/by-label/other /elsewhere ext4 defaults 0 0\n");
        assert_eq!(find_existing(&parse(&text), &ours(), &ids(), &no_resolve), Existing::None);
        assert_eq!(unescape_udev("a\\x20b\\xé\\x"), "a b\\xé\\x");
    }

    #[test]
    fn our_identical_entry_is_found_and_others_are_fine() {
        assert_eq!(find_existing(&parse(FSTAB), &ours(), &ids(), &no_resolve), Existing::None);
        let text = append(FSTAB, &render(&ours()));
        assert_eq!(find_existing(&parse(&text), &ours(), &ids(), &no_resolve), Existing::Identical(8));
        let mut other = ours();
        other.mntops = "defaults".into();
        let text = append(FSTAB, &render(&other));
        assert!(matches!(find_existing(&parse(&text), &ours(), &ids(), &no_resolve), Existing::Conflict(_)));
    }

    #[test]
    fn atomic_write_keeps_mode_and_refuses_on_failed_verify() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("fstab");
        fs::write(&p, FSTAB).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        let e = write_atomic(&p, "garbage\n", |_| bail!("bad")).unwrap_err();
        assert_eq!(e.to_string(), "bad");
        assert_eq!(fs::read_to_string(&p).unwrap(), FSTAB);
        assert!(!temp_path(&p).exists());
        let new = append(FSTAB, &render(&ours()));
        write_atomic(&p, &new, |t| {
            assert_eq!(fs::read_to_string(t).unwrap(), new);
            Ok(())
        })
        .unwrap();
        assert_eq!(fs::read_to_string(&p).unwrap(), new);
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        assert!(!temp_path(&p).exists());
    }

    #[test]
    fn missing_fstab_reads_empty() {
        assert_eq!(read(Path::new("/nonexistent/fstab")).unwrap(), "");
    }

    #[test]
    fn write_atomic_follows_a_symlinked_fstab_and_keeps_the_link() {
        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("real-fstab");
        let link = d.path().join("fstab");
        fs::write(&real, "# old\n").unwrap();
        std::os::unix::fs::symlink(&real, &link).unwrap();
        write_atomic(&link, "# new\n", |_| Ok(())).unwrap();
        assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the link was replaced by a file");
        assert_eq!(fs::read_to_string(&real).unwrap(), "# new\n");
        let fresh = d.path().join("new-fstab");
        write_atomic(&fresh, "# x\n", |_| Ok(())).unwrap();
        assert_eq!(fs::metadata(&fresh).unwrap().mode() & 0o777, 0o644);
    }

    #[test]
    fn unescape_reads_octal_and_leaves_the_rest() {
        assert_eq!(unescape("\\101\\012\\134x"), "A\n\\x");
        assert_eq!(unescape("\\177\\000"), "\u{7f}\0");
        // Not an escape: short at the end, or not octal digits.
        assert_eq!(unescape("a\\04"), "a\\04");
        assert_eq!(unescape("a\\089\\8"), "a\\089\\8");
        assert_eq!(unescape("\\040"), " ");
        assert_eq!(unescape_udev("a\\x4"), "a\\x4");
        assert_eq!(unescape_udev("\\x41"), "A");
    }

    #[test]
    fn parse_fills_missing_fields_with_their_defaults() {
        let l = parse("/dev/sdb1 /mnt\nlonely\n\t# comment\n/dev/sdc1 /x xfs ro # trailing\n");
        assert_eq!(l.len(), 4);
        let want = Entry {
            spec: "/dev/sdb1".into(),
            file: "/mnt".into(),
            vfstype: "auto".into(),
            mntops: "defaults".into(),
            freq: "0".into(),
            passno: "0".into(),
        };
        assert_eq!(l[0].entry.as_ref(), Some(&want));
        assert_eq!(l[1].entry, None, "one field is no entry");
        assert_eq!(l[2].entry, None);
        let e = l[3].entry.as_ref().unwrap();
        assert_eq!((e.vfstype.as_str(), e.mntops.as_str(), e.freq.as_str()), ("xfs", "ro", "0"));
    }

    #[test]
    fn labels_are_case_sensitive_uuids_are_not() {
        let i = ids();
        let m = |s: &str| spec_matches(s, &i, &no_resolve);
        assert!(m("UUID=2222-bbbb") && m("PARTUUID=EEEE-ffff") && m("/dev/disk/by-partuuid/eeee-FFFF"));
        assert!(m("LABEL=\"data\"") && m("PARTLABEL=\"xcp-vm-agent\""));
        for other in [
            "UUID=3333-bbbb",
            "PARTUUID=eeee-0000",
            "LABEL=DATA",
            "PARTLABEL=XCP-VM-AGENT",
            "/dev/disk/by-label/DATA",
            "/dev/disk/by-partlabel/XCP-VM-AGENT",
            "/dev/disk/by-uuid/3333",
            "/dev/disk/by-id/2222-bbbb",
            "/dev/disk/by-uuid",
            "/dev/xvdc1",
            "xvdb1",
            "tmpfs",
        ] {
            assert!(!m(other), "{other} must not name the device");
        }
        // Without the ids, nothing matches by name.
        let none = DeviceIds { paths: i.paths.clone(), ..Default::default() };
        for s in
            ["UUID=2222-bbbb", "LABEL=data", "PARTUUID=eeee-ffff", "PARTLABEL=xcp-vm-agent", "/dev/disk/by-label/data"]
        {
            assert!(!spec_matches(s, &none, &no_resolve), "{s}");
        }
        // A path spec: by its own name, or by what it resolves to.
        let to_b1 = |s: &str| (s == "/dev/mapper/x").then(|| PathBuf::from("/dev/xvdb1"));
        let to_c1 = |_: &str| Some(PathBuf::from("/dev/xvdc1"));
        assert!(spec_matches("/dev/xvdb", &i, &no_resolve));
        assert!(spec_matches("/dev/mapper/x", &i, &to_b1));
        assert!(!spec_matches("/dev/mapper/y", &i, &to_b1));
        assert!(!spec_matches("/dev/mapper/x", &i, &to_c1));
        assert!(!spec_matches("xvdb1", &i, &|_: &str| Some(PathBuf::from("/dev/xvdb1"))), "not a path");
    }

    #[test]
    fn swap_entries_do_not_clash_by_mount_point() {
        let mut swap = ours();
        swap.spec = "/dev/xvdc2".into();
        swap.file = "none".into();
        swap.vfstype = "swap".into();
        assert_eq!(find_existing(&parse(FSTAB), &swap, &ids(), &no_resolve), Existing::None);
        let mut root = ours();
        root.file = "//".into();
        match find_existing(&parse(FSTAB), &root, &ids(), &no_resolve) {
            Existing::Conflict(r) => assert!(r.starts_with("fstab line 2 already mounts something at //"), "{r}"),
            x => panic!("{x:?}"),
        }
    }

    #[test]
    fn temp_file_is_hidden_beside_fstab() {
        assert_eq!(temp_path(Path::new("/etc/fstab")), Path::new("/etc/.fstab.xcp-vm-agent.tmp"));
        assert_eq!(temp_path(Path::new("/")), Path::new("/.fstab.xcp-vm-agent.tmp"));
    }

    #[test]
    fn read_gives_the_text_and_refuses_non_utf8() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("fstab");
        fs::write(&p, FSTAB).unwrap();
        assert_eq!(read(&p).unwrap(), FSTAB);
        fs::write(&p, b"/dev/x /\xff ext4\n").unwrap();
        assert!(read(&p).unwrap_err().to_string().contains("not valid UTF-8"));
        assert!(read(d.path()).unwrap_err().to_string().contains("cannot read"), "a directory");
    }

    #[test]
    fn write_atomic_keeps_mode_bits_and_owner() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("fstab");
        fs::write(&p, "# old\n").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
        // Running as root the owner can be set to anyone; as another user
        // only to oneself.
        let (uid, gid) = if fs::metadata("/proc/self").unwrap().uid() == 0 {
            (4321, 4322)
        } else {
            let m = fs::metadata(&p).unwrap();
            (m.uid(), m.gid())
        };
        std::os::unix::fs::chown(&p, Some(uid), Some(gid)).unwrap();
        write_atomic(&p, "# new\n", |_| Ok(())).unwrap();
        let m = fs::metadata(&p).unwrap();
        assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o640, uid, gid));
    }
}
