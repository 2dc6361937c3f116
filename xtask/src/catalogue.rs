//! The cloud-image catalogue, `ci/distros.toml`: distribution images the VM
//! matrix runs where they can be downloaded (a CI runner, a developer with
//! internet). This module owns the catalogue's types, its problems as data
//! ([`problems`], given the scenario names), the GitHub matrix it generates
//! (`--list --json`), and fetching an image: download, verify against the
//! distribution's own checksum file, cache under `target/vm-images/`. The
//! checks that need the VM matrix's scenarios (and `cargo xtask catalogue`)
//! are `vm/catalogue_check.rs`'s: the matrix uses the catalogue, never the
//! other way.
//!
//! Adding a distribution is adding an `[[image]]` entry; nothing here is
//! per-distribution code. Checksum files come in the formats the
//! distributions publish, told apart by the file's name (see
//! [`ChecksumFormat::of_url`]).
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use sha2::Digest;
use std::path::{Path, PathBuf};

/// The whole file: `[[image]]` entries.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalogue {
    pub image: Vec<Entry>,
}

/// One downloadable image.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub name: String,
    pub url: String,
    pub sha256: Option<String>,
    pub sha512: Option<String>,
    pub checksum_url: Option<String>,
    pub package: Package,
    pub init: Init,
    pub root_layout: String,
    pub user: String,
    pub install: String,
    #[serde(default)]
    pub skip: Vec<Skip>,
    #[serde(default)]
    pub notes: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Package {
    Deb,
    Rpm,
    Apk,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Init {
    Systemd,
    Openrc,
    Sysv,
}

/// A scenario that cannot run on an image: a red cell with this reason.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Skip {
    pub scenario: String,
    pub reason: String,
}

/// Digest algorithms the catalogue knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algo {
    Sha256,
    Sha512,
}

impl Algo {
    fn hex_len(self) -> usize {
        match self {
            Algo::Sha256 => 64,
            Algo::Sha512 => 128,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Algo::Sha256 => "SHA256",
            Algo::Sha512 => "SHA512",
        }
    }
}

/// How a distribution writes its checksum file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChecksumFormat {
    /// `SHA256SUMS` / `SHA512SUMS` (Ubuntu, Debian): GNU `hex  file` lines.
    GnuSums(Algo),
    /// `CHECKSUM` (Rocky, AlmaLinux) and Fedora's `...-CHECKSUM`: BSD
    /// `SHA256 (file) = hex` lines, possibly inside a clearsigned block;
    /// GNU lines are accepted too (AlmaLinux has used both).
    Bsd,
    /// `FILE.sha256` / `FILE.sha512` (openSUSE, Alpine): one GNU line or the
    /// bare digest.
    Single(Algo),
}

impl ChecksumFormat {
    /// The format, told by the checksum file's name.
    pub fn of_url(url: &str) -> Result<ChecksumFormat> {
        let file = url.rsplit('/').next().unwrap_or(url);
        Ok(match file {
            "SHA256SUMS" => ChecksumFormat::GnuSums(Algo::Sha256),
            "SHA512SUMS" => ChecksumFormat::GnuSums(Algo::Sha512),
            f if f == "CHECKSUM" || f.ends_with("-CHECKSUM") => ChecksumFormat::Bsd,
            f if f.ends_with(".sha256") => ChecksumFormat::Single(Algo::Sha256),
            f if f.ends_with(".sha512") => ChecksumFormat::Single(Algo::Sha512),
            f => bail!(
                "checksum file {f:?}: unknown format (expected SHA256SUMS, SHA512SUMS, CHECKSUM, *-CHECKSUM, *.sha256 or *.sha512)"
            ),
        })
    }
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The expected digest of `file` in a checksum file's `text`.
pub fn expected_digest(format: ChecksumFormat, text: &str, file: &str) -> Result<(Algo, String)> {
    let gnu = |algo: Algo, line: &str| -> Option<String> {
        let (hex, name) = line.split_once(char::is_whitespace)?;
        let name = name.trim_start().trim_start_matches('*');
        (is_hex(hex, algo.hex_len()) && name == file).then(|| hex.to_ascii_lowercase())
    };
    let found = match format {
        ChecksumFormat::GnuSums(algo) => text.lines().find_map(|l| gnu(algo, l.trim())).map(|h| (algo, h)),
        ChecksumFormat::Single(algo) => {
            let t = text.trim();
            if is_hex(t, algo.hex_len()) {
                Some((algo, t.to_ascii_lowercase()))
            } else {
                text.lines().find_map(|l| gnu(algo, l.trim())).map(|h| (algo, h))
            }
        }
        ChecksumFormat::Bsd => text.lines().find_map(|l| {
            let l = l.trim();
            for algo in [Algo::Sha256, Algo::Sha512] {
                if let Some(rest) = l.strip_prefix(algo.name()) {
                    let rest = rest.trim_start();
                    let (name, hex) = rest.strip_prefix('(')?.split_once(") = ")?;
                    if name == file && is_hex(hex.trim(), algo.hex_len()) {
                        return Some((algo, hex.trim().to_ascii_lowercase()));
                    }
                }
                if let Some(h) = gnu(algo, l) {
                    return Some((algo, h));
                }
            }
            None
        }),
    };
    found.with_context(|| format!("the checksum file has no digest for {file:?}"))
}

/// The catalogue file of this workspace.
pub fn path() -> PathBuf {
    crate::util::root().join("ci/distros.toml")
}

pub fn load(path: &Path) -> Result<Vec<Entry>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse(&text).with_context(|| format!("{} is not a valid catalogue", path.display()))
}

pub fn parse(text: &str) -> Result<Vec<Entry>> {
    Ok(toml::from_str::<Catalogue>(text)?.image)
}

/// Every problem of the catalogue, each naming its entry; empty when valid.
pub fn problems(entries: &[Entry], scenarios: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    let mut names = std::collections::HashSet::new();
    for e in entries {
        let mut bad = |m: String| out.push(format!("{}: {m}", e.name));
        let name_ok = !e.name.is_empty()
            && e.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && e.name.contains('-')
            && e.name.bytes().next().is_some_and(|b| b.is_ascii_lowercase());
        if !name_ok {
            bad("name must be distribution-version in lower case (e.g. ubuntu-24.04)".into());
        }
        if !names.insert(e.name.clone()) {
            bad("name appears more than once".into());
        }
        for (what, u) in [("url", Some(&e.url)), ("checksum_url", e.checksum_url.as_ref())] {
            if let Some(u) = u {
                if !u.starts_with("https://") || u.len() <= "https://".len() || u.contains(char::is_whitespace) {
                    bad(format!("{what} {u:?} is not an https URL"));
                }
            }
        }
        let file = e.url.rsplit('/').next().unwrap_or("");
        if !(file.ends_with(".qcow2") || file.ends_with(".img") || file.ends_with(".raw")) {
            bad(format!("url must name a .qcow2, .img or .raw image, not {file:?}"));
        }
        let forms = [e.sha256.is_some(), e.sha512.is_some(), e.checksum_url.is_some()].iter().filter(|x| **x).count();
        if forms != 1 {
            bad("give exactly one of sha256, sha512, checksum_url".into());
        }
        if let Some(h) = &e.sha256 {
            if !is_hex(h, 64) {
                bad("sha256 must be 64 hex digits".into());
            }
        }
        if let Some(h) = &e.sha512 {
            if !is_hex(h, 128) {
                bad("sha512 must be 128 hex digits".into());
            }
        }
        if let Some(u) = &e.checksum_url {
            if let Err(err) = ChecksumFormat::of_url(u) {
                bad(format!("{err}"));
            }
        }
        if !e.install.contains("{pkg}") {
            bad("install must install our package: it has no {pkg}".into());
        }
        let tool = match e.package {
            Package::Deb => ["apt-get", "apt ", "dpkg"].as_slice(),
            Package::Rpm => ["dnf", "yum", "zypper", "rpm "].as_slice(),
            Package::Apk => ["apk "].as_slice(),
        };
        if !tool.iter().any(|t| e.install.contains(t)) {
            bad(format!("install does not use a package tool for {:?} packages", e.package));
        }
        if e.package == Package::Apk && e.init != Init::Openrc {
            bad("an apk image runs OpenRC here (our .apk ships an OpenRC service)".into());
        }
        if e.user.is_empty() || e.root_layout.is_empty() {
            bad("user and root_layout must not be empty".into());
        }
        for s in &e.skip {
            if !scenarios.contains(&s.scenario.as_str()) {
                bad(format!("skip names an unknown scenario {:?}", s.scenario));
            }
            if s.reason.trim().is_empty() {
                bad(format!("skip of {} gives no reason", s.scenario));
            }
        }
    }
    out
}

/// The GitHub Actions matrix: `{"include":[{"image":NAME,"package":..},..]}`.
pub fn github_matrix(entries: &[Entry]) -> serde_json::Value {
    let include: Vec<_> = entries
        .iter()
        .map(|e| {
            serde_json::json!({
                "image": e.name,
                "package": format!("{:?}", e.package).to_lowercase(),
                "init": format!("{:?}", e.init).to_lowercase(),
            })
        })
        .collect();
    serde_json::json!({ "include": include })
}

/// The cached, verified image of `e`: downloaded with curl when absent or
/// when its digest does not match, checked before it is used.
pub fn fetch(e: &Entry, cache: &Path) -> Result<PathBuf> {
    let file = e.url.rsplit('/').next().context("url has no file name")?;
    let dir = cache.join(&e.name);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (algo, want) = if let Some(h) = &e.sha256 {
        (Algo::Sha256, h.to_ascii_lowercase())
    } else if let Some(h) = &e.sha512 {
        (Algo::Sha512, h.to_ascii_lowercase())
    } else {
        let u = e.checksum_url.as_deref().context("no checksum given")?;
        let sums = dir.join("checksums");
        crate::util::step(&format!("{}: fetching the checksum file {u}", e.name));
        curl(u, &sums)?;
        let text = std::fs::read_to_string(&sums)?;
        expected_digest(ChecksumFormat::of_url(u)?, &text, file).with_context(|| format!("in {u}"))?
    };
    let img = dir.join(file);
    if verified(&img, algo, &want)? {
        return Ok(img);
    }
    crate::util::step(&format!("{}: downloading {}", e.name, e.url));
    let part = dir.join(format!("{file}.part"));
    curl(&e.url, &part)?;
    let got = digest_file(algo, &part)?;
    if got != want {
        let _ = std::fs::remove_file(&part);
        bail!("{}: {} of {} is {got}, the distribution says {want}: not used", e.name, algo.name(), e.url);
    }
    std::fs::rename(&part, &img)?;
    Ok(img)
}

/// Whether `img` exists and has the digest `want`.
fn verified(img: &Path, algo: Algo, want: &str) -> Result<bool> {
    Ok(img.exists() && digest_file(algo, img)? == want)
}

fn curl(url: &str, out: &Path) -> Result<()> {
    crate::util::run(
        std::process::Command::new("curl").args(["-fL", "--retry", "3", "--proto", "=https", "-o"]).arg(out).arg(url),
    )
}

fn digest_file(algo: Algo, p: &Path) -> Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(p).with_context(|| format!("cannot open {}", p.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut h256 = sha2::Sha256::new();
    let mut h512 = sha2::Sha512::new();
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        match algo {
            Algo::Sha256 => h256.update(&buf[..n]),
            Algo::Sha512 => h512.update(&buf[..n]),
        }
    }
    let bytes: Vec<u8> = match algo {
        Algo::Sha256 => h256.finalize().to_vec(),
        Algo::Sha512 => h512.finalize().to_vec(),
    };
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const H256: &str = "8f6e5d4c3b2a19081726354433221100ffeeddccbbaa99887766554433221100";

    #[test]
    fn formats_are_told_by_the_file_name() {
        use ChecksumFormat::*;
        assert_eq!(ChecksumFormat::of_url("https://x/SHA256SUMS").unwrap(), GnuSums(Algo::Sha256));
        assert_eq!(ChecksumFormat::of_url("https://x/SHA512SUMS").unwrap(), GnuSums(Algo::Sha512));
        assert_eq!(ChecksumFormat::of_url("https://x/CHECKSUM").unwrap(), Bsd);
        assert_eq!(ChecksumFormat::of_url("https://x/Fedora-Cloud-44-1.7-x86_64-CHECKSUM").unwrap(), Bsd);
        assert_eq!(ChecksumFormat::of_url("https://x/a.qcow2.sha256").unwrap(), Single(Algo::Sha256));
        assert_eq!(ChecksumFormat::of_url("https://x/a.qcow2.sha512").unwrap(), Single(Algo::Sha512));
        let e = ChecksumFormat::of_url("https://x/MD5SUMS").unwrap_err().to_string();
        assert!(e.contains("MD5SUMS") && e.contains("unknown format"), "{e}");
    }

    #[test]
    fn digests_are_found_in_each_distributions_format() {
        let f = "img.qcow2";
        // Ubuntu / Debian: GNU lines, binary marker allowed, other files around.
        let gnu = format!("{}  other.img\n{H256} *{f}\n", "0".repeat(64));
        assert_eq!(
            expected_digest(ChecksumFormat::GnuSums(Algo::Sha256), &gnu, f).unwrap(),
            (Algo::Sha256, H256.into())
        );
        // Fedora: clearsigned BSD lines.
        let bsd = format!(
            "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\n# {f}: 1 bytes\nSHA256 ({f}) = {H256}\n-----BEGIN PGP SIGNATURE-----\n"
        );
        assert_eq!(expected_digest(ChecksumFormat::Bsd, &bsd, f).unwrap(), (Algo::Sha256, H256.into()));
        // AlmaLinux's CHECKSUM has used GNU lines.
        assert_eq!(expected_digest(ChecksumFormat::Bsd, &format!("{H256}  {f}\n"), f).unwrap().1, H256);
        // openSUSE / Alpine: one line, or the bare digest.
        let h512 = "ab".repeat(64);
        assert_eq!(
            expected_digest(ChecksumFormat::Single(Algo::Sha512), &format!("{h512}\n"), f).unwrap(),
            (Algo::Sha512, h512.clone())
        );
        assert_eq!(
            expected_digest(ChecksumFormat::Single(Algo::Sha256), &format!("{H256}  {f}\n"), f).unwrap().1,
            H256
        );
        // A digest for another file, or of the wrong length, is not taken.
        assert!(expected_digest(ChecksumFormat::GnuSums(Algo::Sha256), &format!("{H256}  other\n"), f).is_err());
        assert!(expected_digest(ChecksumFormat::GnuSums(Algo::Sha512), &format!("{H256}  {f}\n"), f).is_err());
        assert!(expected_digest(ChecksumFormat::Bsd, &format!("SHA256 (x{f}) = {H256}\n"), f).is_err());
    }

    #[test]
    fn only_an_image_with_the_expected_digest_counts_as_cached() {
        let dir = tempdir();
        let img = dir.join("x.qcow2");
        assert!(!verified(&img, Algo::Sha256, H256).unwrap(), "a missing image is not cached");
        std::fs::write(&img, b"not the image").unwrap();
        assert!(!verified(&img, Algo::Sha256, H256).unwrap(), "wrong bytes must be fetched again");
        let body = b"the image";
        std::fs::write(&img, body).unwrap();
        assert!(verified(&img, Algo::Sha256, &digest_bytes(body)).unwrap());
        assert!(!verified(&img, Algo::Sha512, &digest_bytes(body)).unwrap(), "the algorithm counts");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn digest_bytes(b: &[u8]) -> String {
        sha2::Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect()
    }

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("xtask-catalogue-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn the_github_matrix_has_one_row_per_image() {
        let entries = load(&path()).unwrap();
        let m = github_matrix(&entries);
        let rows = m["include"].as_array().unwrap();
        assert_eq!(rows.len(), entries.len());
        assert_eq!(rows[0]["image"], entries[0].name.as_str());
    }
}
