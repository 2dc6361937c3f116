//! `cargo xtask repo`: signed apt, rpm-md and apk repositories from the
//! `dist` artifacts, as one tree any static web server can host.
//!
//! ```text
//! DIR/xcp-vm-agent.gpg, .asc          OpenPGP public key (binary, armored)
//! DIR/<apk key name>.rsa.pub          RSA public key for /etc/apk/keys
//! DIR/xcp-vm-agent.sources            deb822 source (Signed-By: /etc/apt/keyrings/xcp-vm-agent.gpg)
//! DIR/xcp-vm-agent.repo               dnf/yum/zypper (gpgcheck=1, repo_gpgcheck=1)
//! DIR/deb/pool/main/x/xcp-vm-agent/*.deb
//! DIR/deb/dists/stable/{Release,InRelease,Release.gpg}
//! DIR/deb/dists/stable/main/binary-amd64/{Packages,Packages.gz}
//! DIR/rpm/packages/*.rpm              header signed (OpenPGP, rpm crate)
//! DIR/rpm/repodata/repomd.xml{,.asc,.key} + primary/filelists/other (createrepo_c)
//! DIR/apk/x86_64/*.apk                signed (.SIGN.RSA.<key name> first)
//! DIR/apk/x86_64/APKINDEX.tar.gz      signed the same way
//! ```
//!
//! Publishing adds the artifacts found in `--from` to what DIR already
//! holds and regenerates every index over all of them, so publishing N+1
//! into the same DIR gives an upgrade. Keys: one OpenPGP key (rpgp) signs
//! the apt Release files, repomd.xml and the .rpm headers; one RSA key
//! (PKCS#1 v1.5 over SHA-1, what apk-tools v2 verifies) signs the .apk files
//! and APKINDEX. Without `--key`/`--apk-key` a throwaway pair is generated
//! for this run and saved beside (never inside) DIR.
use crate::apk::{self, gzip, sha256_hex};
use crate::apkcheck;
use crate::pkgmeta::NAME;
use crate::util::{self, root, step};
use anyhow::{bail, ensure, Context, Result};
use pgp::composed::{
    ArmorOptions, CleartextSignedMessage, Deserializable, DetachedSignature, KeyType, SecretKeyParamsBuilder,
    SignedSecretKey,
};
use pgp::crypto::hash::HashAlgorithm;
use pgp::ser::Serialize as _;
use pgp::types::Password;
use rsa::pkcs1::DecodeRsaPrivateKey as _;
use rsa::pkcs8::{DecodePrivateKey as _, EncodePrivateKey as _, EncodePublicKey as _, LineEnding};
use sha1::Digest as _;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Environment variables naming the key files (instead of the options).
pub const KEY_ENV: &str = "XCP_REPO_KEY";
pub const APK_KEY_ENV: &str = "XCP_REPO_APK_KEY";
/// Where the instructions install the OpenPGP key for apt.
pub const APT_KEYRING: &str = "/etc/apt/keyrings/xcp-vm-agent.gpg";
const SUITE: &str = "stable";

const HELP: &str = "\
cargo xtask repo --out DIR --base-url URL [--from DIST] [--key FILE] [--apk-key FILE]

Build signed package repositories from the cargo xtask dist artifacts, as a
tree any static web server can host at URL:
  DIR/deb/   apt: dists/stable/{InRelease,Release,Release.gpg}, main/binary-amd64/Packages{,.gz}, pool/
  DIR/rpm/   rpm-md: repodata/repomd.xml signed as repomd.xml.asc; the .rpm files signed
  DIR/apk/   x86_64/APKINDEX.tar.gz and the .apk files, RSA-signed for apk-tools
  DIR/xcp-vm-agent.sources, DIR/xcp-vm-agent.repo, and the public keys
Packages already in DIR are kept: publishing version N+1 into the same DIR
makes it an upgrade for machines that installed N.

  --out DIR       the repository tree (created or updated)
  --base-url URL  where DIR will be served (goes into .sources and .repo)
  --from DIST     directory with the .deb, .rpm and .apk (default: target/dist)
  --key FILE      ASCII-armored OpenPGP secret key (no passphrase; its primary
                  key signs), or $XCP_REPO_KEY
  --apk-key FILE  RSA private key in PEM (abuild-keygen's NAME.rsa), or
                  $XCP_REPO_APK_KEY; the key name in /etc/apk/keys is NAME.rsa.pub
Without keys a throwaway pair is generated for this run (FOR TESTING ONLY) and
saved in DIR.throwaway-keys/ so the same test repository can be republished.

cargo xtask repo --check   run only the signed-repository checks (a tier of cargo xtask test)";

/// The signing keys of one run.
pub struct Keys {
    pub pgp: SignedSecretKey,
    pub apk: rsa::RsaPrivateKey,
    /// File name of the public key in /etc/apk/keys, e.g. `foo-1234.rsa.pub`.
    pub apk_name: String,
}

pub struct Opts {
    pub out: PathBuf,
    pub base_url: String,
    pub from: PathBuf,
    pub key: Option<PathBuf>,
    pub apk_key: Option<PathBuf>,
}

pub fn run(args: &[String]) -> Result<()> {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{HELP}");
        return Ok(());
    }
    let mut out = None;
    let mut base_url = None;
    let mut from = root().join("target/dist");
    let mut key = std::env::var_os(KEY_ENV).map(PathBuf::from);
    let mut apk_key = std::env::var_os(APK_KEY_ENV).map(PathBuf::from);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--out" => out = Some(PathBuf::from(val()?)),
            "--base-url" => base_url = Some(val()?.clone()),
            "--from" => from = PathBuf::from(val()?),
            "--key" => key = Some(PathBuf::from(val()?)),
            "--apk-key" => apk_key = Some(PathBuf::from(val()?)),
            other => bail!("unknown repo argument {other:?} (see cargo xtask repo --help)"),
        }
    }
    let opts = Opts {
        out: out.context("--out DIR is required (see cargo xtask repo --help)")?,
        base_url: base_url.context("--base-url URL is required (see cargo xtask repo --help)")?,
        from,
        key,
        apk_key,
    };
    publish(&opts)?;
    println!("{}", instructions(&opts.base_url, &apk_key_name_in(&opts.out)?));
    Ok(())
}

/// Build or update the repository tree. Returns the keys it signed with.
pub fn publish(opts: &Opts) -> Result<Keys> {
    let url = opts.base_url.trim_end_matches('/').to_string();
    ensure!(url.contains("://"), "--base-url {url:?} is not a URL (e.g. https://repo.example.org/xcp-vm-agent)");
    let keys = keys_for(opts)?;
    let out = &opts.out;
    std::fs::create_dir_all(out)?;
    let found = artifacts(&opts.from)?;
    ensure!(!found.is_empty(), "no {NAME} .deb, .rpm or .apk in {}: run cargo xtask dist first", opts.from.display());

    step("repo: public keys and client configuration");
    let public = keys.pgp.to_public_key();
    std::fs::write(out.join(format!("{NAME}.gpg")), public.to_bytes()?)?;
    std::fs::write(out.join(format!("{NAME}.asc")), public.to_armored_string(ArmorOptions::default())?)?;
    let apk_pub = rsa::RsaPublicKey::from(&keys.apk).to_public_key_pem(LineEnding::LF)?;
    std::fs::write(out.join(&keys.apk_name), apk_pub)?;
    std::fs::write(out.join(format!("{NAME}.sources")), sources_file(&url))?;
    std::fs::write(out.join(format!("{NAME}.repo")), repo_file(&url))?;

    step("repo: apt repository (deb/)");
    deb_repo(out, &found, &keys)?;
    step("repo: rpm-md repository (rpm/), packages signed");
    rpm_repo(out, &found, &keys)?;
    step("repo: apk repository (apk/x86_64), packages and index signed");
    apk_repo(out, &found, &keys)?;
    step(&format!("repo: wrote {}", out.display()));
    Ok(keys)
}

/// The `.deb`, `.rpm` and `.apk` files of ours in a dist directory.
fn artifacts(from: &Path) -> Result<Vec<PathBuf>> {
    let mut v = Vec::new();
    let rd = std::fs::read_dir(from).with_context(|| format!("cannot read {}", from.display()))?;
    for e in rd {
        let p = e?.path();
        let n = p.file_name().unwrap().to_string_lossy().into_owned();
        if n.starts_with(NAME) && (n.ends_with(".deb") || n.ends_with(".rpm") || n.ends_with(".apk")) {
            v.push(p);
        }
    }
    v.sort();
    Ok(v)
}

fn with_ext<'a>(found: &'a [PathBuf], ext: &str) -> impl Iterator<Item = &'a PathBuf> + 'a {
    let ext = ext.to_string();
    found.iter().filter(move |p| p.extension().is_some_and(|e| e.to_string_lossy() == ext))
}

// ---------------------------------------------------------------- keys

fn keys_for(opts: &Opts) -> Result<Keys> {
    match (&opts.key, &opts.apk_key) {
        (Some(k), Some(a)) => load_keys(k, a),
        (None, None) => {
            let dir = throwaway_dir(&opts.out);
            if dir.join("openpgp.asc").exists() {
                let keys = load_keys(&dir.join("openpgp.asc"), &dir.join(apk_file_in(&dir)?))?;
                warn_throwaway(&dir, "reusing the throwaway keys");
                return Ok(keys);
            }
            step("repo: generating a throwaway OpenPGP key and apk RSA key (no --key given)");
            let keys = generate_keys()?;
            std::fs::create_dir_all(&dir)?;
            set_mode(&dir, 0o700)?;
            let sec = keys.pgp.to_armored_string(ArmorOptions::default())?;
            std::fs::write(dir.join("openpgp.asc"), sec)?;
            let pem = keys.apk.to_pkcs8_pem(LineEnding::LF)?;
            std::fs::write(dir.join(keys.apk_name.trim_end_matches(".pub")), pem.as_bytes())?;
            warn_throwaway(&dir, "generated throwaway keys");
            Ok(keys)
        }
        _ => bail!("give both --key and --apk-key (or ${KEY_ENV} and ${APK_KEY_ENV}), or neither for throwaway keys"),
    }
}

/// `DIR.throwaway-keys`, beside the published tree so it is never served.
pub fn throwaway_dir(out: &Path) -> PathBuf {
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "repo".into());
    out.with_file_name(format!("{name}.throwaway-keys"))
}

fn apk_file_in(dir: &Path) -> Result<String> {
    for e in std::fs::read_dir(dir)? {
        let n = e?.file_name().to_string_lossy().into_owned();
        if n.ends_with(".rsa") {
            return Ok(n);
        }
    }
    bail!("no *.rsa key in {}", dir.display())
}

fn set_mode(p: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn warn_throwaway(dir: &Path, what: &str) {
    eprintln!(
        "\n    WARNING: {what} in {}.\n    WARNING: they are FOR TESTING ONLY: anyone who can read that directory can sign\n    WARNING: packages your machines will trust. Publish for real with --key and --apk-key.\n",
        dir.display()
    );
}

/// A fresh RSA 3072 OpenPGP key that signs with its primary key, and an RSA
/// 2048 key for apk.
pub fn generate_keys() -> Result<Keys> {
    let mut rng = rand::thread_rng();
    let mut b = SecretKeyParamsBuilder::default();
    b.key_type(KeyType::Rsa(3072))
        .can_certify(true)
        .can_sign(true)
        .preferred_hash_algorithms([HashAlgorithm::Sha256].into_iter().collect())
        .primary_user_id(format!("{NAME} repository (throwaway test key) <{NAME}@example.invalid>"));
    let params = b.build().context("OpenPGP key parameters")?;
    let pgp = params.generate(&mut rng).context("generating the OpenPGP key")?;
    let apk = rsa::RsaPrivateKey::new(&mut rng, 2048).context("generating the apk RSA key")?;
    let der = rsa::RsaPublicKey::from(&apk).to_public_key_der()?;
    let tag = &apk::hex(&sha1::Sha1::digest(der.as_bytes()))[..8];
    Ok(Keys { pgp, apk, apk_name: format!("{NAME}-test-{tag}.rsa.pub") })
}

pub fn load_keys(pgp_file: &Path, apk_file: &Path) -> Result<Keys> {
    let text = std::fs::read_to_string(pgp_file).with_context(|| format!("cannot read {}", pgp_file.display()))?;
    let (pgp, _) = SignedSecretKey::from_string(&text)
        .with_context(|| format!("{} is not an ASCII-armored OpenPGP secret key", pgp_file.display()))?;
    pgp.verify_bindings()
        .with_context(|| format!("{}: the key's self-signatures do not verify", pgp_file.display()))?;
    let pem = std::fs::read_to_string(apk_file).with_context(|| format!("cannot read {}", apk_file.display()))?;
    let apk = rsa::RsaPrivateKey::from_pkcs8_pem(&pem)
        .or_else(|_| rsa::RsaPrivateKey::from_pkcs1_pem(&pem))
        .with_context(|| format!("{} is not an RSA private key in PEM", apk_file.display()))?;
    let base = apk_file.file_name().unwrap().to_string_lossy().into_owned();
    let apk_name = if base.ends_with(".rsa") {
        format!("{base}.pub")
    } else {
        format!("{}.rsa.pub", base.split('.').next().unwrap_or(&base))
    };
    Ok(Keys { pgp, apk, apk_name })
}

/// The apk public key file at the top of a published tree.
fn apk_key_name_in(out: &Path) -> Result<String> {
    for e in std::fs::read_dir(out)? {
        let n = e?.file_name().to_string_lossy().into_owned();
        if n.ends_with(".rsa.pub") {
            return Ok(n);
        }
    }
    bail!("no *.rsa.pub in {}", out.display())
}

fn clearsign(keys: &Keys, text: &str) -> Result<String> {
    let msg = CleartextSignedMessage::sign(rand::thread_rng(), text, &keys.pgp.primary_key, &Password::empty())?;
    Ok(msg.to_armored_string(ArmorOptions::default())?)
}

fn detached_sign(keys: &Keys, data: &[u8]) -> Result<String> {
    let sig = DetachedSignature::sign_binary_data(
        rand::thread_rng(),
        &keys.pgp.primary_key,
        &Password::empty(),
        HashAlgorithm::Sha256,
        data,
    )?;
    Ok(sig.to_armored_string(ArmorOptions::default())?)
}

// ---------------------------------------------------------------- client files

pub fn sources_file(url: &str) -> String {
    format!(
        "Types: deb\nURIs: {url}/deb\nSuites: {SUITE}\nComponents: main\nArchitectures: amd64\nSigned-By: {APT_KEYRING}\n"
    )
}

pub fn repo_file(url: &str) -> String {
    format!(
        "[{NAME}]\nname={NAME}\nbaseurl={url}/rpm\nenabled=1\nautorefresh=1\ngpgcheck=1\nrepo_gpgcheck=1\ngpgkey={url}/{NAME}.asc\n"
    )
}

/// The lines a user runs, per family (also in docs/packaging.md).
pub fn instructions(url: &str, apk_name: &str) -> String {
    let url = url.trim_end_matches('/');
    format!(
        "\nInstall on a fleet (as root):\n\
         \n  Debian, Ubuntu:\n\
         \x20   install -d -m 0755 /etc/apt/keyrings\n\
         \x20   curl -fsSL {url}/{NAME}.gpg -o {APT_KEYRING}\n\
         \x20   curl -fsSL {url}/{NAME}.sources -o /etc/apt/sources.list.d/{NAME}.sources\n\
         \x20   apt-get update && apt-get install -y {NAME}\n\
         \n  RHEL, Rocky, Alma, Fedora (dnf; yum on EL7):\n\
         \x20   curl -fsSL {url}/{NAME}.repo -o /etc/yum.repos.d/{NAME}.repo\n\
         \x20   dnf install -y {NAME}\n\
         \n  openSUSE, SLES:\n\
         \x20   rpm --import {url}/{NAME}.asc\n\
         \x20   zypper addrepo {url}/{NAME}.repo\n\
         \x20   zypper --non-interactive install {NAME}\n\
         \n  Alpine:\n\
         \x20   wget -O /etc/apk/keys/{apk_name} {url}/{apk_name}\n\
         \x20   echo {url}/apk >> /etc/apk/repositories\n\
         \x20   apk update && apk add {NAME}\n"
    )
}

// ---------------------------------------------------------------- apt

fn deb_repo(out: &Path, found: &[PathBuf], keys: &Keys) -> Result<()> {
    let first = NAME.chars().next().unwrap();
    let pool_rel = format!("pool/main/{first}/{NAME}");
    let pool = out.join("deb").join(&pool_rel);
    std::fs::create_dir_all(&pool)?;
    for f in with_ext(found, "deb") {
        std::fs::copy(f, pool.join(f.file_name().unwrap()))?;
    }
    let mut debs: Vec<PathBuf> = std::fs::read_dir(&pool)?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
    debs.sort();
    let mut packages = String::new();
    for d in &debs {
        let control = util::output(Command::new("dpkg-deb").arg("--field").arg(d))
            .with_context(|| format!("reading the control fields of {}", d.display()))?;
        let data = std::fs::read(d)?;
        packages.push_str(control.trim_end());
        write!(
            packages,
            "\nFilename: {pool_rel}/{}\nSize: {}\nSHA256: {}\n\n",
            d.file_name().unwrap().to_string_lossy(),
            data.len(),
            sha256_hex(&data)
        )?;
        eprintln!("    {}", d.file_name().unwrap().to_string_lossy());
    }
    let dist = out.join("deb/dists").join(SUITE);
    let bin_dir = dist.join("main/binary-amd64");
    std::fs::create_dir_all(&bin_dir)?;
    let pk_gz = gzip(packages.as_bytes())?;
    std::fs::write(bin_dir.join("Packages"), &packages)?;
    std::fs::write(bin_dir.join("Packages.gz"), &pk_gz)?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let mut release = format!(
        "Origin: {NAME}\nLabel: {NAME}\nSuite: {SUITE}\nCodename: {SUITE}\nDate: {}\nArchitectures: amd64\nComponents: main\nDescription: {NAME} packages\nSHA256:\n",
        crate::dist::rfc2822(now)
    );
    for (rel, data) in [("main/binary-amd64/Packages", packages.as_bytes()), ("main/binary-amd64/Packages.gz", &pk_gz)]
    {
        writeln!(release, " {} {:>8} {rel}", sha256_hex(data), data.len())?;
    }
    std::fs::write(dist.join("Release"), &release)?;
    std::fs::write(dist.join("InRelease"), clearsign(keys, &release)?)?;
    std::fs::write(dist.join("Release.gpg"), detached_sign(keys, release.as_bytes())?)?;
    eprintln!("    Packages: {} package(s); Release signed as InRelease and Release.gpg", debs.len());
    Ok(())
}

// ---------------------------------------------------------------- rpm

fn rpm_repo(out: &Path, found: &[PathBuf], keys: &Keys) -> Result<()> {
    crate::dist::need("createrepo_c")?;
    let rpm_dir = out.join("rpm");
    let pkgs = rpm_dir.join("packages");
    std::fs::create_dir_all(&pkgs)?;
    let secret = keys.pgp.to_armored_string(ArmorOptions::default())?;
    for f in with_ext(found, "rpm") {
        let mut pkg = rpm::Package::open(f).with_context(|| format!("cannot read {}", f.display()))?;
        let signer = rpm::signature::pgp::Signer::from_asc(&secret).context("loading the key for rpm")?;
        let t = pkg.metadata.get_build_time().unwrap_or(0) as u32;
        pkg.sign_with_timestamp(signer, t).with_context(|| format!("signing {}", f.display()))?;
        let dest = pkgs.join(f.file_name().unwrap());
        pkg.write_file(&dest).with_context(|| format!("cannot write {}", dest.display()))?;
        eprintln!("    signed {}", dest.file_name().unwrap().to_string_lossy());
    }
    util::run(
        Command::new("createrepo_c").args(["--quiet", "--general-compress-type=gz", "--no-database"]).arg(&rpm_dir),
    )?;
    let repodata = rpm_dir.join("repodata");
    let repomd = std::fs::read(repodata.join("repomd.xml"))?;
    std::fs::write(repodata.join("repomd.xml.asc"), detached_sign(keys, &repomd)?)?;
    // zypper looks for the key beside the metadata.
    std::fs::write(
        repodata.join("repomd.xml.key"),
        keys.pgp.to_public_key().to_armored_string(ArmorOptions::default())?,
    )?;
    eprintln!("    repodata by createrepo_c; repomd.xml signed as repomd.xml.asc");
    Ok(())
}

// ---------------------------------------------------------------- apk

/// The signature member apk-tools v2 reads first: a tar holding
/// `.SIGN.RSA.<key name>` = RSA PKCS#1 v1.5 signature of the SHA-1 of
/// `signed` (the next gzip member, compressed), end-of-archive cut.
pub fn apk_signature_member(keys: &Keys, signed: &[u8]) -> Result<Vec<u8>> {
    let digest = sha1::Sha1::digest(signed);
    let sig = keys.apk.sign(rsa::Pkcs1v15Sign::new::<sha1::Sha1>(), &digest)?;
    let mut w = apk::TarWriter::new(0);
    w.add(&apk::Entry::file(&format!(".SIGN.RSA.{}", keys.apk_name), 0o644, sig), false)?;
    gzip(&w.finish(false))
}

/// An .apk with its signature (any old one replaced).
pub fn sign_apk(keys: &Keys, bytes: &[u8]) -> Result<Vec<u8>> {
    let ms = apkcheck::members(bytes)?;
    let (first, _) = apkcheck::read_tar(&ms[0].data)?;
    let skip = usize::from(first.first().is_some_and(|e| e.name.starts_with(".SIGN.")));
    ensure!(ms.len() == skip + 2, "not an APK v2 package ({} gzip members)", ms.len());
    let mut v = apk_signature_member(keys, &ms[skip].compressed)?;
    for m in &ms[skip..] {
        v.extend_from_slice(&m.compressed);
    }
    Ok(v)
}

/// The APKINDEX record of one package file (apk-tools v2 field letters).
pub fn apkindex_record(bytes: &[u8]) -> Result<String> {
    let ms = apkcheck::members(bytes)?;
    let n = ms.len();
    ensure!(n >= 2, "not an APK v2 package");
    let control = &ms[n - 2];
    let (entries, _) = apkcheck::read_tar(&control.data)?;
    let info = apkcheck::pkginfo(&String::from_utf8(entries.first().context("empty control tar")?.data.clone())?);
    let one = |k: &str| info.get(k).and_then(|v| v.first()).cloned().unwrap_or_default();
    let mut r = format!("C:Q1{}\n", crate::util::base64(&sha1::Sha1::digest(&control.compressed)));
    for (letter, key) in
        [("P", "pkgname"), ("V", "pkgver"), ("A", "arch"), ("S", ""), ("I", "size"), ("T", "pkgdesc"), ("U", "url")]
    {
        if letter == "S" {
            writeln!(r, "S:{}", bytes.len())?;
        } else {
            writeln!(r, "{letter}:{}", one(key))?;
        }
    }
    for (letter, key) in [("L", "license"), ("o", "origin"), ("m", "maintainer"), ("t", "builddate")] {
        if info.contains_key(key) {
            writeln!(r, "{letter}:{}", one(key))?;
        }
    }
    if let Some(deps) = info.get("depend") {
        writeln!(r, "D:{}", deps.join(" "))?;
    }
    Ok(r)
}

fn apk_repo(out: &Path, found: &[PathBuf], keys: &Keys) -> Result<()> {
    let dir = out.join("apk/x86_64");
    std::fs::create_dir_all(&dir)?;
    for f in with_ext(found, "apk") {
        let signed = sign_apk(keys, &std::fs::read(f)?)?;
        apkcheck::check_bytes(&signed).with_context(|| format!("signed copy of {}", f.display()))?;
        std::fs::write(dir.join(f.file_name().unwrap()), signed)?;
        eprintln!("    signed {}", f.file_name().unwrap().to_string_lossy());
    }
    let mut apks: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "apk"))
        .collect();
    apks.sort();
    let mut index = String::new();
    for a in &apks {
        index.push_str(&apkindex_record(&std::fs::read(a)?)?);
        index.push('\n');
    }
    let mut w = apk::TarWriter::new(0);
    w.add(&apk::Entry::file("DESCRIPTION", 0o644, format!("{NAME} packages").into_bytes()), false)?;
    w.add(&apk::Entry::file("APKINDEX", 0o644, index.into_bytes()), false)?;
    let body = gzip(&w.finish(true))?;
    let mut file = apk_signature_member(keys, &body)?;
    file.extend(body);
    std::fs::write(dir.join("APKINDEX.tar.gz"), file)?;
    eprintln!("    APKINDEX.tar.gz: {} package(s), signed with {}", apks.len(), keys.apk_name);
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn client_files_never_trust_blindly() {
        let s = super::sources_file("https://r.example/x");
        assert!(s.contains("URIs: https://r.example/x/deb\n") && s.contains("Signed-By: /etc/apt/keyrings/"));
        assert!(!s.contains("trusted"));
        let r = super::repo_file("https://r.example/x");
        assert!(
            r.contains("gpgcheck=1\n")
                && r.contains("repo_gpgcheck=1\n")
                && r.contains("baseurl=https://r.example/x/rpm")
        );
    }
}
