//! APK v2 writer (Alpine packages) and the small tar/gzip writer it shares
//! with the release tarball. No maintained Rust crate writes apk, so this is
//! our own, checked by `apkcheck` (which is first proven on a package built by
//! Alpine's abuild).
//!
//! Layout written (unsigned, installs with `apk add --allow-untrusted`):
//! gzip member 1 = control tar (`.PKGINFO` first, then the scripts), its
//! end-of-archive blocks cut; gzip member 2 = data tar (pax, sorted, uid/gid 0
//! named root, every file and symlink with an `APK-TOOLS.checksum.SHA1`
//! record), ending with its end-of-archive blocks. `.PKGINFO` carries
//! `datahash`, the SHA-256 of the compressed data member. Everything is a
//! function of the inputs and `mtime`, so builds are reproducible.
use anyhow::{bail, Result};
use sha1::Digest as _;
use std::io::Write;

/// One entry of a package or tarball, path relative (no leading `/`).
#[derive(Clone, Debug)]
pub struct Entry {
    pub path: String,
    pub mode: u32,
    pub kind: Kind,
}

#[derive(Clone, Debug)]
pub enum Kind {
    File(Vec<u8>),
    Dir,
    #[allow(dead_code)] // supported by the writer and the checker; no package ships one yet
    Symlink(String),
}

impl Entry {
    pub fn file(path: &str, mode: u32, data: Vec<u8>) -> Entry {
        Entry { path: path.trim_start_matches('/').to_string(), mode, kind: Kind::File(data) }
    }
    pub fn dir(path: &str, mode: u32) -> Entry {
        Entry { path: path.trim_start_matches('/').trim_end_matches('/').to_string(), mode, kind: Kind::Dir }
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha1_hex(data: &[u8]) -> String {
    hex(&sha1::Sha1::digest(data))
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex(&sha2::Sha256::digest(data))
}

/// One gzip member, reproducible: no file name, mtime 0, OS byte "Unix".
pub fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    let mut enc = flate2::GzBuilder::new().mtime(0).operating_system(3).write(Vec::new(), flate2::Compression::best());
    enc.write_all(data)?;
    Ok(enc.finish()?)
}

fn octal(field: &mut [u8], value: u64) -> Result<()> {
    let digits = field.len() - 1;
    let s = format!("{value:0digits$o}");
    if s.len() > digits {
        bail!("tar: value {value} does not fit {digits} octal digits");
    }
    field[..digits].copy_from_slice(s.as_bytes());
    field[digits] = 0;
    Ok(())
}

/// A ustar header block.
pub fn header(name: &str, mode: u32, size: u64, mtime: u64, typeflag: u8, linkname: &str) -> Result<[u8; 512]> {
    let mut h = [0u8; 512];
    let (prefix, base) = split_name(name)?;
    h[..base.len()].copy_from_slice(base.as_bytes());
    octal(&mut h[100..108], u64::from(mode & 0o7777))?;
    octal(&mut h[108..116], 0)?;
    octal(&mut h[116..124], 0)?;
    octal(&mut h[124..136], size)?;
    octal(&mut h[136..148], mtime)?;
    h[156] = typeflag;
    if linkname.len() > 100 {
        bail!("tar: link target {linkname:?} longer than 100 bytes");
    }
    h[157..157 + linkname.len()].copy_from_slice(linkname.as_bytes());
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[265..269].copy_from_slice(b"root");
    h[297..301].copy_from_slice(b"root");
    h[345..345 + prefix.len()].copy_from_slice(prefix.as_bytes());
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    Ok(h)
}

fn split_name(name: &str) -> Result<(&str, &str)> {
    if name.len() <= 100 {
        return Ok(("", name));
    }
    for (i, c) in name.char_indices() {
        if c == '/' && i <= 155 && name.len() - i - 1 <= 100 {
            return Ok((&name[..i], &name[i + 1..]));
        }
    }
    bail!("tar: path {name:?} too long for ustar")
}

/// One pax record: "LEN key=value\n" where LEN counts the whole record.
pub fn pax_record(key: &str, value: &str) -> String {
    let body = format!(" {key}={value}\n");
    let mut len = body.len() + 1;
    while format!("{len}{body}").len() != len {
        len += 1;
    }
    format!("{len}{body}")
}

/// Builds a tar stream in memory.
pub struct TarWriter {
    pub buf: Vec<u8>,
    mtime: u64,
}

impl TarWriter {
    pub fn new(mtime: u64) -> TarWriter {
        TarWriter { buf: Vec::new(), mtime }
    }

    fn pad(&mut self) {
        let rem = self.buf.len() % 512;
        if rem != 0 {
            self.buf.resize(self.buf.len() + 512 - rem, 0);
        }
    }

    /// Add an entry. `apk` adds the pax header apk wants (checksum on files
    /// and symlinks); otherwise plain ustar.
    pub fn add(&mut self, e: &Entry, apk: bool) -> Result<()> {
        let (typeflag, size, link, data): (u8, u64, &str, &[u8]) = match &e.kind {
            Kind::File(d) => (b'0', d.len() as u64, "", d),
            Kind::Dir => (b'5', 0, "", &[]),
            Kind::Symlink(t) => (b'2', 0, t.as_str(), &[]),
        };
        let name = match e.kind {
            Kind::Dir => format!("{}/", e.path),
            _ => e.path.clone(),
        };
        if apk {
            let sum = match &e.kind {
                Kind::File(d) => Some(sha1_hex(d)),
                Kind::Symlink(t) => Some(sha1_hex(t.as_bytes())),
                Kind::Dir => None,
            };
            if let Some(sum) = sum {
                let rec = pax_record("APK-TOOLS.checksum.SHA1", &sum);
                let pname = format!("PaxHeaders/{}", e.path.rsplit('/').next().unwrap_or(&e.path));
                let h = header(&pname, 0o644, rec.len() as u64, self.mtime, b'x', "")?;
                self.buf.extend_from_slice(&h);
                self.buf.extend_from_slice(rec.as_bytes());
                self.pad();
            }
        }
        let h = header(&name, e.mode, size, self.mtime, typeflag, link)?;
        self.buf.extend_from_slice(&h);
        self.buf.extend_from_slice(data);
        self.pad();
        Ok(())
    }

    /// The stream; with `end_blocks` the two zero blocks that end an archive.
    pub fn finish(mut self, end_blocks: bool) -> Vec<u8> {
        if end_blocks {
            self.buf.resize(self.buf.len() + 1024, 0);
        }
        self.buf
    }
}

/// What goes into `.PKGINFO` besides what the writer computes.
pub struct Meta<'a> {
    pub name: &'a str,
    /// Full apk version, `2.0.0-r0`.
    pub version: &'a str,
    pub description: &'a str,
    pub url: &'a str,
    pub license: &'a str,
    pub packager: &'a str,
    pub arch: &'a str,
    pub depends: &'a [&'a str],
    pub builddate: u64,
}

/// Build an unsigned .apk. `scripts` are (".post-install", content) pairs;
/// `files` need not be sorted.
pub fn build(meta: &Meta, scripts: &[(&str, Vec<u8>)], files: &[Entry]) -> Result<Vec<u8>> {
    let mut files = files.to_vec();
    // Every parent directory gets its own entry (0755 unless given).
    let mut have: std::collections::BTreeSet<String> = files.iter().map(|e| e.path.clone()).collect();
    for e in files.clone() {
        let mut p = e.path.as_str();
        while let Some((parent, _)) = p.rsplit_once('/') {
            if have.insert(parent.to_string()) {
                files.push(Entry::dir(parent, 0o755));
            }
            p = parent;
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    let mut data = TarWriter::new(meta.builddate);
    let mut size: u64 = 0;
    for e in &files {
        data.add(e, true)?;
        if let Kind::File(d) = &e.kind {
            size += (d.len() as u64).div_ceil(4096) * 4096;
        }
    }
    let size = size.max(4096);
    let data_gz = gzip(&data.finish(true))?;

    let mut info = String::new();
    info.push_str("# Generated by cargo xtask dist (xcp-vm-agent)\n");
    for (k, v) in [
        ("pkgname", meta.name),
        ("pkgver", meta.version),
        ("pkgdesc", meta.description),
        ("url", meta.url),
        ("builddate", &meta.builddate.to_string()),
        ("packager", meta.packager),
        ("size", &size.to_string()),
        ("arch", meta.arch),
        ("origin", meta.name),
        ("license", meta.license),
    ] {
        info.push_str(&format!("{k} = {v}\n"));
    }
    for d in meta.depends {
        info.push_str(&format!("depend = {d}\n"));
    }
    info.push_str(&format!("datahash = {}\n", sha256_hex(&data_gz)));

    let mut control = TarWriter::new(meta.builddate);
    control.add(&Entry::file(".PKGINFO", 0o644, info.into_bytes()), false)?;
    for (name, body) in scripts {
        control.add(&Entry::file(name, 0o755, body.clone()), false)?;
    }
    let mut out = gzip(&control.finish(false))?;
    out.extend_from_slice(&data_gz);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_record_length_counts_itself() {
        let r = pax_record("APK-TOOLS.checksum.SHA1", &"a".repeat(40));
        let (len, _) = r.split_once(' ').unwrap();
        assert_eq!(len.parse::<usize>().unwrap(), r.len());
        let short = pax_record("k", "v");
        assert_eq!(short, "6 k=v\n");
    }

    #[test]
    fn header_checksum_and_fields() {
        let h = header("usr/bin/x", 0o755, 10, 1, b'0', "").unwrap();
        let stored = u32::from_str_radix(std::str::from_utf8(&h[148..154]).unwrap(), 8).unwrap();
        let mut copy = h;
        copy[148..156].copy_from_slice(b"        ");
        assert_eq!(stored, copy.iter().map(|&b| u32::from(b)).sum::<u32>());
        assert_eq!(&h[257..262], b"ustar");
    }
}
