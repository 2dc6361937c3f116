//! APK v2 checker: validates what apk-tools 2 and 3 rely on, since there is
//! no apk-tools on the build machines.
//!
//! Checks: the file is 2 (unsigned) or 3 (signed) gzip members; the optional
//! signature tar holds only `.SIGN.*` entries; signature and control tars have
//! their end-of-archive blocks cut; the data tar is exactly one gzip member
//! and ends with its end-of-archive blocks; every tar header checksum is right;
//! `.PKGINFO` is the first control entry, names pkgname/pkgver/arch, has
//! `size` above 0 and a `datahash` equal to the SHA-256 of the compressed data
//! member; control entries are known names; every regular file and symlink
//! in the data tar carries a correct `APK-TOOLS.checksum.SHA1` pax record.
//!
//! `pkgtest` proves it on Alpine's own `rssh-2.3.4-r3.apk` (accepted) and on
//! broken copies of it (rejected) before trusting it on our package; the
//! helpers that make those copies live here too.
use crate::apk::{gzip, sha1_hex, sha256_hex};
use anyhow::{bail, ensure, Context, Result};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

/// One gzip member: its compressed bytes and what they decompress to.
pub struct Member {
    pub compressed: Vec<u8>,
    pub data: Vec<u8>,
}

/// Split a file into its gzip members.
pub fn members(bytes: &[u8]) -> Result<Vec<Member>> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        ensure!(rest.len() >= 18 && rest[0] == 0x1f && rest[1] == 0x8b, "gzip member {} has no gzip header", out.len());
        let mut dec = flate2::bufread::GzDecoder::new(rest);
        let mut data = Vec::new();
        dec.read_to_end(&mut data).with_context(|| format!("gzip member {} is corrupt", out.len()))?;
        let left = dec.into_inner();
        let used = rest.len() - left.len();
        out.push(Member { compressed: rest[..used].to_vec(), data });
        rest = left;
    }
    Ok(out)
}

/// A tar entry as read: header name, type, content, pax records before it.
#[derive(Clone)]
pub struct TarEntry {
    pub name: String,
    pub typeflag: u8,
    pub linkname: String,
    pub data: Vec<u8>,
    pub pax: BTreeMap<String, String>,
}

fn parse_octal(field: &[u8]) -> Result<u64> {
    let s: String = field.iter().take_while(|&&b| b != 0).map(|&b| b as char).collect();
    let s = s.trim();
    if s.is_empty() {
        return Ok(0);
    }
    u64::from_str_radix(s, 8).with_context(|| format!("bad octal field {s:?}"))
}

fn cstr(field: &[u8]) -> String {
    String::from_utf8_lossy(&field[..field.iter().position(|&b| b == 0).unwrap_or(field.len())]).into_owned()
}

fn parse_pax(data: &[u8]) -> Result<BTreeMap<String, String>> {
    let mut map = BTreeMap::new();
    let mut rest = data;
    while !rest.is_empty() {
        let sp = rest.iter().position(|&b| b == b' ').context("pax record without length")?;
        let len: usize = std::str::from_utf8(&rest[..sp])?.parse().context("bad pax record length")?;
        ensure!(len > sp + 1 && len <= rest.len() && rest[len - 1] == b'\n', "malformed pax record");
        let rec = std::str::from_utf8(&rest[sp + 1..len - 1])?;
        let (k, v) = rec.split_once('=').context("pax record without '='")?;
        map.insert(k.to_string(), v.to_string());
        rest = &rest[len..];
    }
    Ok(map)
}

/// Parse a tar stream. Returns the entries and whether it ended with
/// end-of-archive (zero) blocks; fails on bad header checksums and on
/// anything after the end-of-archive blocks.
pub fn read_tar(buf: &[u8]) -> Result<(Vec<TarEntry>, bool)> {
    ensure!(buf.len().is_multiple_of(512), "tar stream is {} bytes, not a multiple of 512", buf.len());
    let mut entries = Vec::new();
    let mut pos = 0;
    let mut pending: BTreeMap<String, String> = BTreeMap::new();
    while pos < buf.len() {
        let h = &buf[pos..pos + 512];
        if h.iter().all(|&b| b == 0) {
            ensure!(pending.is_empty(), "pax header not followed by an entry");
            ensure!(buf[pos..].iter().all(|&b| b == 0), "data after the end-of-archive blocks");
            ensure!(buf.len() - pos >= 1024, "only one end-of-archive block");
            return Ok((entries, true));
        }
        let stored = parse_octal(&h[148..156])?;
        let sum: u64 =
            h.iter().enumerate().map(|(i, &b)| if (148..156).contains(&i) { 32 } else { u64::from(b) }).sum();
        ensure!(stored == sum, "tar header at offset {pos}: checksum {stored} but header sums to {sum}");
        let mut name = cstr(&h[..100]);
        let prefix = cstr(&h[345..500]);
        if &h[257..262] == b"ustar" && !prefix.is_empty() {
            name = format!("{prefix}/{name}");
        }
        let size = parse_octal(&h[124..136])? as usize;
        let typeflag = h[156];
        let body_start = pos + 512;
        let body_end = body_start + size;
        ensure!(body_end <= buf.len(), "entry {name:?} runs past the end of the stream");
        let data = buf[body_start..body_end].to_vec();
        let next = body_start + size.div_ceil(512) * 512;
        match typeflag {
            b'x' => {
                pending.extend(parse_pax(&data).with_context(|| format!("pax header {name:?}"))?);
            }
            b'g' => {}
            _ => {
                let mut e = TarEntry {
                    name: pending.get("path").cloned().unwrap_or(name),
                    typeflag,
                    linkname: cstr(&h[157..257]),
                    data,
                    pax: std::mem::take(&mut pending),
                };
                if let Some(l) = e.pax.get("linkpath") {
                    e.linkname = l.clone();
                }
                entries.push(e);
            }
        }
        pos = next;
    }
    ensure!(pending.is_empty(), "pax header not followed by an entry");
    Ok((entries, false))
}

/// Parsed `.PKGINFO`: key to every value (depend and friends repeat).
pub fn pkginfo(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        if let Some((k, v)) = line.split_once(" = ") {
            map.entry(k.trim().to_string()).or_default().push(v.trim().to_string());
        }
    }
    map
}

/// What the checker found, for the report.
pub struct Summary {
    pub signed: bool,
    pub name: String,
    pub version: String,
    pub files: usize,
    pub size: u64,
}

const CONTROL_NAMES: &[&str] = &[
    ".PKGINFO",
    ".pre-install",
    ".post-install",
    ".pre-upgrade",
    ".post-upgrade",
    ".pre-deinstall",
    ".post-deinstall",
    ".trigger",
];

pub fn check_file(path: &Path) -> Result<Summary> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    check_bytes(&bytes).with_context(|| format!("{} is not a valid APK v2 package", path.display()))
}

pub fn check_bytes(bytes: &[u8]) -> Result<Summary> {
    let ms = members(bytes)?;
    ensure!(ms.len() >= 2, "{} gzip member(s): need control and data", ms.len());
    let (first, _) = read_tar(&ms[0].data).context("first gzip member")?;
    let signed = first.first().is_some_and(|e| e.name.starts_with(".SIGN."));
    let expected = if signed { 3 } else { 2 };
    ensure!(
        ms.len() == expected,
        "{} gzip members where {} expected ({}): the data tar must be exactly one gzip member",
        ms.len(),
        expected,
        if signed { "signature, control, data" } else { "control, data" }
    );
    if signed {
        let (sig, end) = read_tar(&ms[0].data)?;
        ensure!(!end, "signature tar keeps its end-of-archive blocks (they must be cut)");
        ensure!(sig.iter().all(|e| e.name.starts_with(".SIGN.")), "signature tar holds non-.SIGN entries");
    }
    let control = &ms[expected - 2];
    let data = &ms[expected - 1];

    let (centries, cend) = read_tar(&control.data).context("control tar")?;
    ensure!(!cend, "control tar keeps its end-of-archive blocks (they must be cut, or apk stops before the data)");
    ensure!(
        centries.first().is_some_and(|e| e.name == ".PKGINFO"),
        ".PKGINFO is not the first entry of the control tar (found {:?})",
        centries.first().map(|e| e.name.as_str())
    );
    for e in &centries {
        ensure!(CONTROL_NAMES.contains(&e.name.as_str()), "unexpected control entry {:?}", e.name);
        ensure!(e.typeflag == b'0' || e.typeflag == 0, "control entry {:?} is not a regular file", e.name);
    }
    let info_text = String::from_utf8(centries[0].data.clone()).context(".PKGINFO is not UTF-8")?;
    let info = pkginfo(&info_text);
    let one = |k: &str| -> Result<String> {
        match info.get(k).map(Vec::as_slice) {
            Some([v]) => Ok(v.clone()),
            Some(_) => bail!(".PKGINFO has {k} more than once"),
            None => bail!(".PKGINFO has no {k}"),
        }
    };
    let name = one("pkgname")?;
    let version = one("pkgver")?;
    one("arch")?;
    let size: u64 = one("size")?.parse().context(".PKGINFO size is not a number")?;
    ensure!(size > 0, ".PKGINFO size is 0 (apk refuses it)");
    let datahash = one("datahash")?;
    let actual = sha256_hex(&data.compressed);
    ensure!(datahash == actual, ".PKGINFO datahash {datahash} but the data member's SHA-256 is {actual}");

    let (dentries, dend) = read_tar(&data.data).context("data tar")?;
    ensure!(dend, "data tar does not end with end-of-archive blocks");
    let mut files = 0;
    for e in &dentries {
        let content: Option<&[u8]> = match e.typeflag {
            b'0' | 0 | b'7' => Some(&e.data),
            b'2' => Some(e.linkname.as_bytes()),
            b'5' | b'1' => None,
            t => bail!("data entry {:?} has unsupported type {:?}", e.name, t as char),
        };
        if let Some(content) = content {
            files += 1;
            let want = sha1_hex(content);
            match e.pax.get("APK-TOOLS.checksum.SHA1") {
                None => bail!("data entry {:?} has no APK-TOOLS.checksum.SHA1 pax record", e.name),
                Some(got) if *got != want => {
                    bail!("data entry {:?}: APK-TOOLS.checksum.SHA1 {got} but content SHA-1 is {want}", e.name)
                }
                Some(_) => {}
            }
        }
    }
    Ok(Summary { signed, name, version, files, size })
}

/// Broken copies of a valid package, each with the one defect named: the
/// checker must reject every one.
pub fn broken_copies(bytes: &[u8]) -> Result<Vec<(&'static str, Vec<u8>)>> {
    let ms = members(bytes)?;
    let n = ms.len();
    let (centries, _) = read_tar(&ms[n - 2].data)?;
    let prefix: Vec<u8> = ms[..n - 2].iter().flat_map(|m| m.compressed.clone()).collect();
    let info = String::from_utf8(centries[0].data.clone())?;
    let datahash = |d: &[u8]| sha256_hex(d);

    // Rebuild the control tar from its entries with a new .PKGINFO text
    // (order kept, or .PKGINFO moved to the end).
    let control_with = |text: &str, pkginfo_last: bool| -> Result<Vec<u8>> {
        let mut w = crate::apk::TarWriter::new(0);
        let mut list: Vec<crate::apk::Entry> = centries
            .iter()
            .map(|e| {
                let data = if e.name == ".PKGINFO" { text.as_bytes().to_vec() } else { e.data.clone() };
                crate::apk::Entry::file(&e.name, 0o755, data)
            })
            .collect();
        if pkginfo_last {
            list.rotate_left(1);
        }
        for e in &list {
            w.add(e, false)?;
        }
        gzip(&w.finish(false))
    };
    let set_key = |text: &str, key: &str, value: &str| -> String {
        text.lines()
            .map(|l| if l.starts_with(&format!("{key} = ")) { format!("{key} = {value}") } else { l.to_string() })
            .collect::<Vec<_>>()
            .join("\n")
            + "\n"
    };
    let assemble = |control: Vec<u8>, data: &[u8]| -> Vec<u8> {
        let mut v = prefix.clone();
        v.extend(control);
        v.extend_from_slice(data);
        v
    };
    let data = &ms[n - 1];
    let mut out = Vec::new();

    // 1. datahash that does not match the data member.
    let wrong = set_key(&info, "datahash", &"0".repeat(64));
    out.push(("bad datahash", assemble(control_with(&wrong, false)?, &data.compressed)));

    // 2. a checksum record renamed away (datahash updated so only that is wrong).
    let needle = b"APK-TOOLS.checksum.SHA1";
    let mut d = data.data.clone();
    let at = d.windows(needle.len()).position(|w| w == needle).context("no checksum record to remove")?;
    d[at + needle.len() - 4..at + needle.len()].copy_from_slice(b"XXXX");
    let dgz = gzip(&d)?;
    let fixed = set_key(&info, "datahash", &datahash(&dgz));
    out.push(("missing checksum record", assemble(control_with(&fixed, false)?, &dgz)));

    // 3. .PKGINFO not the first control entry.
    out.push((".PKGINFO not first", assemble(control_with(&info, true)?, &data.compressed)));

    // 4. size 0.
    out.push(("size 0", assemble(control_with(&set_key(&info, "size", "0"), false)?, &data.compressed)));

    // 5. data split into two gzip members (datahash over the first part).
    let half = (data.data.len() / 1024) * 512;
    let (a, b) = (gzip(&data.data[..half])?, gzip(&data.data[half..])?);
    let fixed = set_key(&info, "datahash", &datahash(&a));
    let mut v = assemble(control_with(&fixed, false)?, &a);
    v.extend(b);
    out.push(("multi-member data", v));
    Ok(out)
}

/// An RSA public key apk-tools would find in /etc/apk/keys under `name`.
pub struct ApkKey {
    pub name: String,
    pub key: rsa::RsaPublicKey,
}

impl ApkKey {
    /// Read a PEM public key (`-----BEGIN PUBLIC KEY-----`); its name is the
    /// file name, as in /etc/apk/keys.
    pub fn from_file(path: &Path) -> Result<ApkKey> {
        use rsa::pkcs8::DecodePublicKey as _;
        let pem = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let key = rsa::RsaPublicKey::from_public_key_pem(&pem)
            .with_context(|| format!("{} is not an RSA public key in PEM", path.display()))?;
        Ok(ApkKey { name: path.file_name().unwrap().to_string_lossy().into_owned(), key })
    }
}

/// Verify an apk-tools v2 signature, the same for a package and an index:
/// the first gzip member is a tar whose first entry is
/// `.SIGN.RSA.<key name>` (PKCS#1 v1.5 over SHA-1) or `.SIGN.RSA256.<key
/// name>` (over SHA-256), and it signs the compressed bytes of the next gzip
/// member (the control tar, or the index tar). Returns the key name used.
pub fn verify_signature(bytes: &[u8], keys: &[ApkKey]) -> Result<String> {
    use sha1::Digest as _;
    let ms = members(bytes)?;
    ensure!(ms.len() >= 2, "{} gzip member(s): nothing is signed", ms.len());
    let (sig, _) = read_tar(&ms[0].data).context("signature tar")?;
    let first = sig.first().context("empty first tar: not signed")?;
    let (scheme, name) = if let Some(n) = first.name.strip_prefix(".SIGN.RSA256.") {
        ("sha256", n)
    } else if let Some(n) = first.name.strip_prefix(".SIGN.RSA.") {
        ("sha1", n)
    } else {
        bail!("first entry is {:?}, not a .SIGN.RSA signature: not signed", first.name);
    };
    let key = keys
        .iter()
        .find(|k| k.name == name)
        .with_context(|| format!("signed with {name:?}, which is not among the trusted keys"))?;
    let signed = &ms[1].compressed;
    let ok = if scheme == "sha1" {
        key.key.verify(rsa::Pkcs1v15Sign::new::<sha1::Sha1>(), &sha1::Sha1::digest(signed), &first.data)
    } else {
        key.key.verify(rsa::Pkcs1v15Sign::new::<sha2::Sha256>(), &sha2::Sha256::digest(signed), &first.data)
    };
    ok.map_err(|e| anyhow::anyhow!("the {scheme} RSA signature by {name} does not match the signed member: {e}"))?;
    Ok(name.to_string())
}

/// One APKINDEX record: field letter to value.
pub type IndexRecord = BTreeMap<char, String>;

/// Check a repository index `APKINDEX.tar.gz`: signed (verified against
/// `keys`), the signed member a tar holding `APKINDEX` (and optionally
/// `DESCRIPTION`) with its end-of-archive blocks, every record with
/// C (Q1 + base64 SHA-1), P, V, A, S, I. Returns the records.
pub fn check_index(bytes: &[u8], keys: &[ApkKey]) -> Result<Vec<IndexRecord>> {
    let ms = members(bytes)?;
    ensure!(ms.len() == 2, "{} gzip members: an index is signature + index tar", ms.len());
    verify_signature(bytes, keys).context("index signature")?;
    let (sig, send) = read_tar(&ms[0].data)?;
    ensure!(!send, "signature tar keeps its end-of-archive blocks");
    ensure!(sig.iter().all(|e| e.name.starts_with(".SIGN.")), "signature tar holds non-.SIGN entries");
    let (entries, end) = read_tar(&ms[1].data).context("index tar")?;
    ensure!(end, "index tar does not end with end-of-archive blocks");
    for e in &entries {
        ensure!(e.name == "APKINDEX" || e.name == "DESCRIPTION", "unexpected index entry {:?}", e.name);
    }
    let text = entries.iter().find(|e| e.name == "APKINDEX").context("no APKINDEX in the index tar")?;
    let text = String::from_utf8(text.data.clone()).context("APKINDEX is not UTF-8")?;
    let mut out = Vec::new();
    for block in text.split("\n\n").filter(|b| !b.trim().is_empty()) {
        let mut rec = IndexRecord::new();
        for line in block.lines() {
            let mut ch = line.chars();
            let (k, colon) = (ch.next(), ch.next());
            ensure!(k.is_some() && colon == Some(':'), "APKINDEX line {line:?} is not 'X:value'");
            ensure!(rec.insert(k.unwrap(), ch.as_str().to_string()).is_none(), "APKINDEX record repeats {line:?}");
        }
        for k in ['C', 'P', 'V', 'A', 'S', 'I'] {
            ensure!(rec.contains_key(&k), "APKINDEX record without {k}: {block:?}");
        }
        ensure!(rec[&'C'].starts_with("Q1") && rec[&'C'].len() == 30, "C:{} is not Q1 + base64 SHA-1", rec[&'C']);
        out.push(rec);
    }
    ensure!(!out.is_empty(), "APKINDEX lists no package");
    Ok(out)
}

/// Does an index record describe this package file (checksum of its
/// control member, size, name, version)?
pub fn record_matches(rec: &IndexRecord, pkg: &[u8]) -> Result<()> {
    use sha1::Digest as _;
    let ms = members(pkg)?;
    let control = &ms[ms.len() - 2];
    let want = format!("Q1{}", crate::util::base64(&sha1::Sha1::digest(&control.compressed)));
    ensure!(rec[&'C'] == want, "index C:{} but the package's control member gives {want}", rec[&'C']);
    ensure!(rec[&'S'] == pkg.len().to_string(), "index S:{} but the package is {} bytes", rec[&'S'], pkg.len());
    let (c, _) = read_tar(&control.data)?;
    let info = pkginfo(&String::from_utf8_lossy(&c[0].data));
    for (k, key) in [('P', "pkgname"), ('V', "pkgver")] {
        let v = info.get(key).and_then(|v| v.first()).cloned().unwrap_or_default();
        ensure!(rec[&k] == v, "index {k}:{} but .PKGINFO {key} = {v}", rec[&k]);
    }
    Ok(())
}

/// A copy whose signed member still parses but says something else: one
/// byte of `.PKGINFO`'s (or `APKINDEX`'s) text changed, recompressed. The
/// structure stays valid; only the signature can tell.
pub fn tampered_copy(bytes: &[u8]) -> Result<Vec<u8>> {
    let ms = members(bytes)?;
    ensure!(ms.len() >= 2, "nothing to tamper with");
    let mut d = ms[1].data.clone();
    // The first letter of the first entry's content (after its 512-byte
    // header), e.g. of "pkgname" or "C:": flip its case.
    ensure!(d.len() > 512, "unexpected signed member layout");
    let at = 512 + d[512..].iter().position(u8::is_ascii_alphabetic).context("no letter to change")?;
    d[at] ^= 0x20;
    let mut v = ms[0].compressed.clone();
    v.extend(gzip(&d)?);
    for m in &ms[2..] {
        v.extend_from_slice(&m.compressed);
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    // What apk.rs writes passes this checker (here, so apk does not import
    // its checker).
    #[test]
    fn apk_build_is_deterministic_and_checks() {
        let files = vec![
            crate::apk::Entry::dir("usr/bin", 0o755),
            crate::apk::Entry::file("usr/bin/x", 0o755, b"hello".to_vec()),
        ];
        let meta = crate::apk::Meta {
            name: "x",
            version: "1.0.0-r0",
            description: "d",
            url: "https://example.invalid",
            license: "MIT",
            packager: "p",
            arch: "x86_64",
            depends: &["busybox"],
            builddate: 1_700_000_000,
        };
        let a = crate::apk::build(&meta, &[(".post-install", b"#!/bin/sh\n".to_vec())], &files).unwrap();
        let b = crate::apk::build(&meta, &[(".post-install", b"#!/bin/sh\n".to_vec())], &files).unwrap();
        assert_eq!(a, b);
        check_bytes(&a).unwrap();
    }
}
