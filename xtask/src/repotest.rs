//! The signed-repository checks (`cargo xtask test`, tier "signed
//! repositories"; `cargo xtask repo --check` runs only this tier).
//!
//! In order: the apk signature verifier proven on Alpine's own signed
//! package and key (accepted) and on a copy with one byte of `.PKGINFO`
//! changed (rejected); version N and N+1 packaged from one binary; N
//! published by `repo::publish` with throwaway keys into a tree served by a
//! tiny static HTTP server on loopback; the apk index and packages checked
//! (signatures with the published key, records matching the files);
//! `rpmkeys --checksig` on the signed .rpm; dnf with `gpgcheck=1
//! repo_gpgcheck=1` lists the package, and refuses the repository once
//! one byte of repomd.xml changed; zypper the same, with the key imported
//! by `rpm --import` as the instructions say; then, as root, in a Debian chroot: apt
//! with the published `.sources` and key refuses the repository with one byte
//! of Packages, or of the signed Release text, changed; installs N from it, and after N+1 is published into
//! the same tree (keys loaded with `--key`/`--apk-key`) `apt-get upgrade`
//! moves to N+1 and keeps the edited config byte for byte.
use crate::apkcheck::{self, ApkKey};
use crate::dist::{self, Opts};
use crate::pkgmeta::{self, NAME};
use crate::repo;
use crate::util::{self, in_ci, is_root, root, step};
use anyhow::{bail, ensure, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

fn work() -> PathBuf {
    root().join("target/repotest")
}

fn fixture(name: &str) -> PathBuf {
    let p = root().join("../shared/fixtures/apk").join(name);
    if p.exists() {
        p
    } else {
        PathBuf::from("/work/shared/fixtures/apk").join(name)
    }
}

pub fn run() -> Result<()> {
    let t0 = Instant::now();
    for tool in ["createrepo_c", "dnf", "zypper", "rpmkeys", "dpkg-deb", "mmdebstrap"] {
        dist::need(tool)?;
    }
    step("repositories: apk signature verifier on Alpine's signed rssh-2.3.4-r3.apk");
    prove_apk_signatures()?;

    step("repositories: package N and N+1 from one binary");
    let w = work();
    if w.exists() {
        std::fs::remove_dir_all(&w)?;
    }
    std::fs::create_dir_all(&w)?;
    let epoch = dist::source_date_epoch()?;
    let (bin, _) = dist::build_binary(epoch)?;
    let v = pkgmeta::workspace_version()?;
    let v1 = next_version(&v);
    let n = Opts { version: v.clone(), epoch, out: w.join("n"), config: None };
    let n1 = Opts { version: v1.clone(), epoch, out: w.join("n1"), config: None };
    dist::package_all(&n, &bin)?;
    dist::package_all(&n1, &bin)?;

    let www = w.join("www");
    let server = StaticServer::start(&www)?;
    let url = server.url.clone();
    step(&format!("repositories: cargo xtask repo --out {} --base-url {url} (throwaway keys)", www.display()));
    let tk = Instant::now();
    let publish = |from: &Path, keys: Option<(PathBuf, PathBuf)>| {
        repo::publish(&repo::Opts {
            out: www.clone(),
            base_url: url.clone(),
            from: from.to_path_buf(),
            key: keys.as_ref().map(|k| k.0.clone()),
            apk_key: keys.map(|k| k.1),
        })
    };
    let keys = publish(&n.out, None)?;
    eprintln!("    published in {:.1} s (key generation included)", tk.elapsed().as_secs_f64());
    for f in [format!("{NAME}.gpg"), format!("{NAME}.asc"), keys.apk_name.clone(), format!("{NAME}.sources")] {
        ensure!(www.join(&f).exists(), "the repository has no {f} at its top");
    }
    let tdir = repo::throwaway_dir(&www);
    ensure!(!tdir.starts_with(&www), "throwaway keys inside the served tree");

    step("repositories: apk index and packages (our checker, signatures by the published key)");
    check_apk_repo(&www, &keys.apk_name, std::slice::from_ref(&v))?;
    step("repositories: rpm signatures (rpmkeys --checksig), dnf (gpgcheck=1 repo_gpgcheck=1) and zypper");
    check_rpm_repo(&www, &n.out.join(pkgmeta::rpm_name(&v)), &v)?;

    if !is_root() {
        if in_ci() {
            bail!("the apt checks need root (chroot), and CI=true forbids skipping them");
        }
        eprintln!("\n    note: not root: the apt install and upgrade checks in a chroot were skipped");
        return Ok(());
    }
    let base = crate::pkgtest::chroot_base()?;
    let dir = crate::pkgtest::fresh_chroot(&base, "chroot-repo")?;
    step("repositories: apt refuses the repository with Packages or Release changed after signing");
    apt_setup(&dir, &www)?;
    apt_refuses_tampered(&dir, &www)?;
    step(&format!("repositories: apt-get install {NAME} from the signed repository"));
    let out = apt(&dir, &format!("apt-get update && apt-get install -y {NAME}"))?;
    ensure!(!out.contains("not signed") && !out.contains("insecure"), "apt warned about signatures:\n{out}");
    let got = crate::pkgtest::in_chroot(&dir, &format!("dpkg-query -W -f='${{Version}}' {NAME}"))?;
    ensure!(got == v, "apt installed {got:?}, expected {v}");
    eprintln!("    installed {v} over HTTP with InRelease verified against {}", repo::APT_KEYRING);

    step(&format!("repositories: publish {v1} into the same tree; apt-get upgrade keeps the edited config"));
    let cfg = dir.join(format!("etc/{NAME}/config.json"));
    let edited = b"{\n  \"server_url\": \"https://mgmt.example.invalid:8443\",\n  \"log_level\": \"debug\"\n}\n";
    std::fs::write(&cfg, edited)?;
    let apk_key = std::fs::read_dir(&tdir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "rsa"))
        .context("no throwaway apk key saved")?;
    publish(&n1.out, Some((tdir.join("openpgp.asc"), apk_key)))?;
    check_apk_repo(&www, &keys.apk_name, &[v.clone(), v1.clone()])?;
    apt(&dir, "apt-get update && apt-get upgrade -y")?;
    let got = crate::pkgtest::in_chroot(&dir, &format!("dpkg-query -W -f='${{Version}}' {NAME}"))?;
    ensure!(got == v1, "apt-get upgrade left {got:?}, expected {v1}");
    ensure!(std::fs::read(&cfg)? == edited, "apt-get upgrade changed the edited config.json");
    eprintln!("    upgraded {v} -> {v1} by apt-get upgrade; config.json byte-identical");
    std::fs::remove_dir_all(&dir)?;
    drop(server);
    step(&format!("signed repository checks passed in {:.0} s", t0.elapsed().as_secs_f64()));
    Ok(())
}

fn next_version(v: &str) -> String {
    let mut parts: Vec<u64> = v.split('.').filter_map(|p| p.parse().ok()).collect();
    if let Some(last) = parts.last_mut() {
        *last += 1;
    }
    parts.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(".")
}

/// The verifier accepts Alpine's package with Alpine's key, and rejects:
/// the same package with one byte of its signed control member changed, and
/// the genuine package against a key of another name.
fn prove_apk_signatures() -> Result<()> {
    let key = ApkKey::from_file(&fixture("alpine-devel@lists.alpinelinux.org-6165ee59.rsa.pub"))?;
    let bytes = std::fs::read(fixture("rssh-2.3.4-r3.apk"))?;
    let name = apkcheck::verify_signature(&bytes, std::slice::from_ref(&key))
        .context("the verifier must accept Alpine's own signed package")?;
    eprintln!("    accepted: signed by {name}");
    let bad = apkcheck::tampered_copy(&bytes)?;
    apkcheck::check_bytes(&bad).context("the tampered copy should still be a well-formed package")?;
    match apkcheck::verify_signature(&bad, std::slice::from_ref(&key)) {
        Ok(_) => bail!("the apk verifier accepted a package whose .PKGINFO was changed after signing"),
        Err(e) => eprintln!("    rejected (one byte of .PKGINFO changed): {e:#}"),
    }
    let other = ApkKey { name: "someone-else.rsa.pub".into(), key: key.key.clone() };
    match apkcheck::verify_signature(&bytes, &[other]) {
        Ok(_) => bail!("the apk verifier accepted a signature by a key that is not trusted"),
        Err(e) => eprintln!("    rejected (key not trusted): {e:#}"),
    }
    Ok(())
}

/// APKINDEX signed by the published key, one record per version, each
/// record matching its package; every package signed and well formed; a
/// tampered index rejected.
fn check_apk_repo(www: &Path, key_name: &str, versions: &[String]) -> Result<()> {
    let key = ApkKey::from_file(&www.join(key_name))?;
    let keys = [key];
    let dir = www.join("apk/x86_64");
    let index = std::fs::read(dir.join("APKINDEX.tar.gz"))?;
    let recs = apkcheck::check_index(&index, &keys).context("APKINDEX.tar.gz")?;
    ensure!(recs.len() == versions.len(), "APKINDEX lists {} packages, expected {}", recs.len(), versions.len());
    for v in versions {
        let file = dir.join(pkgmeta::apk_name(v));
        let pkg = std::fs::read(&file)?;
        let s = apkcheck::check_bytes(&pkg).with_context(|| format!("{}", file.display()))?;
        ensure!(s.signed, "{} is not signed", file.display());
        apkcheck::verify_signature(&pkg, &keys).with_context(|| format!("{}", file.display()))?;
        let rec = recs
            .iter()
            .find(|r| r[&'V'] == format!("{v}-r0"))
            .with_context(|| format!("APKINDEX has no record for {v}-r0"))?;
        apkcheck::record_matches(rec, &pkg)?;
    }
    match apkcheck::check_index(&apkcheck::tampered_copy(&index)?, &keys) {
        Ok(_) => bail!("the checker accepted an APKINDEX changed after signing"),
        Err(e) => eprintln!("    tampered APKINDEX rejected: {e:#}"),
    }
    eprintln!("    APKINDEX.tar.gz signed by {key_name}: {} record(s), each matching its signed .apk", recs.len());
    Ok(())
}

fn check_rpm_repo(www: &Path, unsigned: &Path, v: &str) -> Result<()> {
    let w = work();
    // rpm's own verification, in an rpmdb of its own.
    let kroot = w.join("rpmkeys-root");
    std::fs::create_dir_all(&kroot)?;
    util::output(Command::new("rpm").arg("--root").arg(&kroot).arg("--initdb"))?;
    util::output(
        Command::new("rpmkeys").arg("--root").arg(&kroot).arg("--import").arg(www.join(format!("{NAME}.asc"))),
    )?;
    let signed = www.join("rpm/packages").join(pkgmeta::rpm_name(v));
    let checksig = |p: &Path| -> Result<String> {
        let o =
            Command::new("rpmkeys").arg("--root").arg(&kroot).arg("--checksig").arg(p).env("LC_ALL", "C").output()?;
        Ok(format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)).trim().to_string())
    };
    let ok = checksig(&signed)?;
    ensure!(ok.ends_with("digests signatures OK"), "rpmkeys --checksig on the published .rpm: {ok}");
    let plain = checksig(unsigned)?;
    ensure!(!plain.contains("signatures OK"), "the unsigned dist .rpm passed as signed: {plain}");
    eprintln!("    {ok}\n    (unsigned dist .rpm: {plain})");

    // dnf, configured by the published .repo file exactly as a user installs it.
    let dnf_root = w.join("dnf-root");
    std::fs::create_dir_all(dnf_root.join("etc/yum.repos.d"))?;
    std::fs::copy(www.join(format!("{NAME}.repo")), dnf_root.join(format!("etc/yum.repos.d/{NAME}.repo")))?;
    let dnf = |cache: &str| -> Result<(bool, String)> {
        let o = Command::new("dnf")
            .arg(format!("--installroot={}", dnf_root.display()))
            .arg(format!("--setopt=cachedir={}", w.join(cache).display()))
            .args(["--releasever=12", "-y", "--repo", NAME, "list", "--available", NAME])
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .output()
            .context("cannot run dnf")?;
        let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        Ok((o.status.success(), text))
    };
    let (ok, text) = dnf("dnf-cache")?;
    ensure!(ok && text.contains(&format!("{NAME}.x86_64")) && text.contains(&format!("{v}-1")), "dnf list:\n{text}");
    let line = text.lines().find(|l| l.starts_with(&format!("{NAME}.x86_64"))).unwrap_or_default();
    eprintln!("    dnf (gpgcheck=1 repo_gpgcheck=1) lists: {}", line.split_whitespace().collect::<Vec<_>>().join(" "));

    let repomd = www.join("rpm/repodata/repomd.xml");
    let good = std::fs::read(&repomd)?;
    let mut bad = good.clone();
    let at = bad.windows(10).position(|x| x == b"<revision>").context("no <revision> in repomd.xml")? + 10;
    bad[at] = if bad[at] == b'1' { b'2' } else { b'1' };
    std::fs::write(&repomd, &bad)?;
    let r = dnf("dnf-cache-tampered");
    std::fs::write(&repomd, &good)?;
    let (ok, text) = r?;
    ensure!(
        !ok && !text.contains(&format!("{NAME}.x86_64")) && text.contains("GPG signature verification error"),
        "dnf did not refuse repomd.xml changed after signing for its signature:\n{text}"
    );
    let why = text.lines().find(|l| l.contains("GPG signature verification error")).unwrap_or_default();
    eprintln!("    one byte of repomd.xml changed: dnf refuses ({})", why.trim());
    zypper_reads(www, &good, v)
}

/// zypper (openSUSE's, as Debian packages it) in a root of its own, with
/// the lines docs/packaging.md gives: rpm --import the key, addrepo the
/// published .repo; it lists the package, and refuses the metadata once one
/// byte of repomd.xml is changed.
fn zypper_reads(www: &Path, repomd_good: &[u8], v: &str) -> Result<()> {
    let zroot = work().join("zypper-root");
    std::fs::create_dir_all(&zroot)?;
    let url = std::fs::read_to_string(www.join(format!("{NAME}.repo")))?
        .lines()
        .find_map(|l| l.strip_prefix("gpgkey="))
        .map(|k| k.trim_end_matches(&format!("/{NAME}.asc")).to_string())
        .context("no gpgkey= in the .repo")?;
    util::output(Command::new("rpm").arg("--root").arg(&zroot).arg("--initdb"))?;
    util::output(Command::new("rpm").arg("--root").arg(&zroot).arg("--import").arg(www.join(format!("{NAME}.asc"))))?;
    let zypper = |args: &[&str]| -> Result<String> {
        let o = Command::new("zypper")
            .arg("--root")
            .arg(&zroot)
            .arg("--non-interactive")
            .args(args)
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .output()
            .context("cannot run zypper")?;
        Ok(format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
    };
    zypper(&["addrepo", &format!("{url}/{NAME}.repo")])?;
    let refresh = zypper(&["refresh", "--force"])?;
    ensure!(refresh.contains("All repositories have been refreshed"), "zypper refresh:\n{refresh}");
    let found = zypper(&["search", "-s", NAME])?;
    ensure!(found.lines().any(|l| l.contains(NAME) && l.contains(&format!("{v}-1"))), "zypper search:\n{found}");
    eprintln!("    zypper (repo key imported by rpm --import) lists {NAME} {v}-1");
    let repomd = www.join("rpm/repodata/repomd.xml");
    let mut bad = repomd_good.to_vec();
    let at = bad.windows(10).position(|x| x == b"<revision>").context("no <revision>")? + 10;
    bad[at] = if bad[at] == b'1' { b'2' } else { b'1' };
    std::fs::write(&repomd, &bad)?;
    let r = zypper(&["refresh", "--force"]);
    std::fs::write(&repomd, repomd_good)?;
    let text = r?;
    ensure!(
        text.contains("Signature verification failed") && !text.contains("All repositories have been refreshed"),
        "zypper did not refuse repomd.xml changed after signing:\n{text}"
    );
    eprintln!("    one byte of repomd.xml changed: zypper refuses (Signature verification failed for repomd.xml)");
    Ok(())
}

/// The chroot configured as the instructions say: the key in
/// /etc/apt/keyrings, the published .sources, no other source.
fn apt_setup(dir: &Path, www: &Path) -> Result<()> {
    std::fs::create_dir_all(dir.join("etc/apt/keyrings"))?;
    std::fs::copy(www.join(format!("{NAME}.gpg")), dir.join(repo::APT_KEYRING.trim_start_matches('/')))?;
    let _ = std::fs::remove_file(dir.join("etc/apt/sources.list"));
    let d = dir.join("etc/apt/sources.list.d");
    if d.exists() {
        std::fs::remove_dir_all(&d)?;
    }
    std::fs::create_dir_all(&d)?;
    std::fs::copy(www.join(format!("{NAME}.sources")), d.join(format!("{NAME}.sources")))?;
    Ok(())
}

fn apt(dir: &Path, script: &str) -> Result<String> {
    crate::pkgtest::in_chroot(dir, &format!("exec 2>&1; {script}"))
}

/// What an attacker serving the tree could do, each refused by apt since
/// Release is signed: one byte of Packages changed (Packages.gz remade from
/// it), and one byte of the Release text changed in InRelease and Release.
fn apt_refuses_tampered(dir: &Path, www: &Path) -> Result<()> {
    let d = www.join("deb/dists/stable");
    let p = d.join("main/binary-amd64/Packages");
    let mut bad = std::fs::read(&p)?;
    let at = bad.windows(9).position(|x| x == b"Version: ").context("no Version in Packages")? + 9;
    bad[at] = if bad[at] == b'9' { b'8' } else { b'9' };
    let gz = crate::apk::gzip(&bad)?;
    apt_refuses(dir, "one byte of Packages changed", &[(p, bad), (d.join("main/binary-amd64/Packages.gz"), gz)])?;
    let flip = |f: &Path| -> Result<Vec<u8>> {
        let mut b = std::fs::read(f)?;
        let at = b.windows(7).position(|x| x == b"Label: ").context("no Label in Release")? + 7;
        b[at] ^= 0x20;
        Ok(b)
    };
    let (inr, rel) = (d.join("InRelease"), d.join("Release"));
    let changed = [(inr.clone(), flip(&inr)?), (rel.clone(), flip(&rel)?)];
    apt_refuses(dir, "one byte of the signed Release text changed", &changed)
}

/// Serve `files` changed, run `apt-get update` on empty lists, put the
/// files back: apt must fail, or at least offer no candidate.
fn apt_refuses(dir: &Path, what: &str, files: &[(PathBuf, Vec<u8>)]) -> Result<()> {
    let good: Vec<Vec<u8>> = files.iter().map(|(f, _)| std::fs::read(f)).collect::<Result<_, _>>()?;
    for (f, b) in files {
        std::fs::write(f, b)?;
    }
    crate::pkgtest::in_chroot(dir, "rm -rf /var/lib/apt/lists/*")?;
    let r = apt(dir, "apt-get update");
    for ((f, _), g) in files.iter().zip(&good) {
        std::fs::write(f, g)?;
    }
    let text = match r {
        Ok(out) => {
            // apt exits 0 on some failures; the index must still be unusable.
            let pol = apt(dir, &format!("apt-cache policy {NAME}"))?;
            ensure!(
                !pol.contains("Candidate:") || pol.contains("Candidate: (none)"),
                "apt accepted the repository with {what}:\n{out}\n{pol}"
            );
            out
        }
        Err(e) => format!("{e:#}"),
    };
    let why = text
        .lines()
        .find(|l| {
            ["Hash Sum mismatch", "unexpected size", "BADSIG", "invalid", "not signed", "E: "]
                .iter()
                .any(|k| l.contains(k))
        })
        .unwrap_or("failed");
    eprintln!("    {what}: refused ({})", why.trim());
    crate::pkgtest::in_chroot(dir, "rm -rf /var/lib/apt/lists/*")?;
    Ok(())
}

/// A static file server on 127.0.0.1 (an ephemeral port), one thread per
/// connection, `Connection: close`; GET and HEAD only.
struct StaticServer {
    url: String,
    addr: std::net::SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl StaticServer {
    fn start(dir: &Path) -> Result<StaticServer> {
        use std::sync::atomic::{AtomicBool, Ordering};
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?;
        let url = format!("http://{addr}");
        let dir = dir.to_path_buf();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                if stopped.load(Ordering::SeqCst) {
                    break;
                }
                let dir = dir.clone();
                std::thread::spawn(move || {
                    let _ = serve_one(s, &dir);
                });
            }
        });
        Ok(StaticServer { url, addr, stop })
    }
}

impl Drop for StaticServer {
    /// Stop accepting: set the flag, then wake the accept loop.
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(self.addr);
    }
}

fn serve_one(s: std::net::TcpStream, dir: &Path) -> Result<()> {
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut first = String::new();
    r.read_line(&mut first)?;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
    }
    let mut w = s;
    let mut parts = first.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
    let path = target.split('?').next().unwrap_or("/");
    let rel = path.trim_start_matches('/');
    let file = dir.join(rel);
    let body = if (method == "GET" || method == "HEAD") && !rel.split('/').any(|c| c == "..") && file.is_file() {
        std::fs::read(&file).ok()
    } else {
        None
    };
    match body {
        Some(b) => {
            write!(w, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", b.len())?;
            if method == "GET" {
                w.write_all(&b)?;
            }
        }
        None => write!(w, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?,
    }
    w.flush()?;
    Ok(())
}
