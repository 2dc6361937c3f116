//! `cargo xtask dist`: the static binary and the four release artifacts in
//! `target/dist/`: `.deb` (cargo-deb, pinned), `.rpm` (the `rpm` crate, gzip
//! payload), `.apk` (our own writer, `apk.rs`), `.tar.gz` (our own tar writer
//! plus `install.sh`/`uninstall.sh`), and `SHA256SUMS`.
//!
//! Reproducible: every timestamp is `SOURCE_DATE_EPOCH` (default: the last
//! commit's time), every archive is sorted and owned by root, gzip headers
//! carry no time or name. `pkgtest` builds twice and compares (it calls this
//! module; this module never calls it). What the packages are called and say
//! (name, summary, dependencies, artifact file names) is in `pkgmeta`.
//!
//! The package contents are listed once, in [`contents`]; the three package
//! formats differ only in which init files they take and in their scripts
//! (`packaging/{deb,rpm,apk}`). To add a file: one line in [`contents`].
use crate::apk;
use crate::pkgmeta::{
    apk_name, deb_name, rpm_name, tarball_name, workspace_version, APK_DEPENDS, DEB_DEPENDS, DESCRIPTION, LICENSE,
    MAINTAINER, NAME, RPM_REQUIRES, SUMMARY, URL,
};
use crate::util::{self, cargo, have, root, step};
use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const CARGO_DEB_VERSION: &str = "3.8.0";
const MUSL: &str = "x86_64-unknown-linux-musl";
const GNU: &str = "x86_64-unknown-linux-gnu";

/// Options for one packaging run.
pub struct Opts {
    pub version: String,
    pub epoch: u64,
    pub out: PathBuf,
    /// Replaces packaging/common/config.json (upgrade tests ship a changed
    /// default config in N+1 to see .dpkg-dist/.rpmnew handling).
    pub config: Option<Vec<u8>>,
}

pub fn run(args: &[String]) -> Result<()> {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!(
            "cargo xtask dist [--version V] [--out DIR] [--binary PATH]\n\n\
             Build the static binary (musl target when installed, else gnu + crt-static) and write\n\
             target/dist/: {NAME}_V_amd64.deb, {NAME}-V-1.x86_64.rpm, {NAME}-V-r0.apk,\n\
             {NAME}-V-x86_64.tar.gz and SHA256SUMS. Timestamps come from SOURCE_DATE_EPOCH\n\
             (default: the last commit's time), so two runs give identical files.\n\
             --version V   package version (default: the workspace version); used to make N+1 for tests\n\
             --out DIR     output directory (default: target/dist)\n\
             --binary PATH package this binary instead of building one\n\n\
             cargo xtask dist --check   run only the packaging checks (the tier of cargo xtask test)"
        );
        return Ok(());
    }
    let mut version = workspace_version()?;
    let mut out = root().join("target/dist");
    let mut binary: Option<PathBuf> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--version" => version = it.next().context("--version needs a value")?.clone(),
            "--out" => out = PathBuf::from(it.next().context("--out needs a value")?),
            "--binary" => binary = Some(PathBuf::from(it.next().context("--binary needs a value")?)),
            other => bail!("unknown dist argument {other:?} (see cargo xtask dist --help)"),
        }
    }
    let epoch = source_date_epoch()?;
    let bin = match binary {
        Some(b) => b,
        None => build_binary(epoch)?.0,
    };
    let opts = Opts { version, epoch, out, config: None };
    let files = package_all(&opts, &bin)?;
    step(&format!("dist: wrote {}", opts.out.display()));
    for f in files {
        let len = std::fs::metadata(&f)?.len();
        eprintln!("    {:>9} bytes  {}", len, f.file_name().unwrap().to_string_lossy());
    }
    Ok(())
}

/// `SOURCE_DATE_EPOCH`, else the last commit's time, else 0.
pub fn source_date_epoch() -> Result<u64> {
    if let Ok(v) = std::env::var("SOURCE_DATE_EPOCH") {
        return v.trim().parse().with_context(|| format!("SOURCE_DATE_EPOCH={v:?} is not a number"));
    }
    let out = Command::new("git").args(["log", "-1", "--format=%ct"]).current_dir(root()).output();
    Ok(out.ok().and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok()).unwrap_or(0))
}

fn musl_installed() -> bool {
    let sysroot = Command::new("rustc").args(["--print", "sysroot"]).output();
    match sysroot {
        Ok(o) => Path::new(String::from_utf8_lossy(&o.stdout).trim()).join("lib/rustlib").join(MUSL).exists(),
        Err(_) => false,
    }
}

/// Build the release binary statically. Returns its path and the target used.
pub fn build_binary(epoch: u64) -> Result<(PathBuf, &'static str)> {
    build_binary_in(epoch, &root().join("target/dist-build"))
}

/// [`build_binary`] into a given target directory (the reproducibility
/// check builds a second time elsewhere and compares).
pub fn build_binary_in(epoch: u64, target_dir: &Path) -> Result<(PathBuf, &'static str)> {
    let target = if musl_installed() { MUSL } else { GNU };
    let how = if target == MUSL {
        "musl target".to_string()
    } else {
        format!("{GNU} with crt-static (the musl target is not installed)")
    };
    step(&format!("dist: building the static binary ({how})"));
    let home = std::env::var("CARGO_HOME")
        .unwrap_or_else(|_| format!("{}/.cargo", std::env::var("HOME").unwrap_or_else(|_| "/root".into())));
    // Paths that would otherwise end up in panic messages and differ
    // between machines.
    let mut flags = format!("--remap-path-prefix={}=/src --remap-path-prefix={home}=/cargo", root().display());
    if target == GNU {
        flags.push_str(" -C target-feature=+crt-static");
    } else {
        // Packed relative relocations (DT_RELR, binutils >= 2.38): the
        // static-pie's ~10,000 R_X86_64_RELATIVE entries (81 KB of .rela.dyn,
        // one per pointer in vtables and tables) become a 1 KB bitmap that
        // musl's static-pie start-up (rcrt1, musl >= 1.2.4) applies the same
        // way. Still position-independent (ASLR unchanged), same code.
        flags.push_str(" -C link-arg=-Wl,-z,pack-relative-relocs");
    }
    let var = format!("CARGO_TARGET_{}_RUSTFLAGS", target.to_uppercase().replace('-', "_"));
    // A target directory of its own: other builds in the shared target/
    // (benchmarks, debug-info builds) cannot overwrite the release binary
    // between build and packaging. Strip and no debug info, whatever the
    // environment says.
    util::run(
        cargo()
            .env(var, flags)
            .env("SOURCE_DATE_EPOCH", epoch.to_string())
            .env("CARGO_TARGET_DIR", target_dir)
            .env_remove("CARGO_PROFILE_RELEASE_DEBUG")
            .env_remove("CARGO_PROFILE_RELEASE_STRIP")
            .args(["build", "--release", "-p", NAME, "--target", target])
            .args(["--config", "profile.release.strip=true", "--config", "profile.release.debug=false"]),
    )?;
    let bin = target_dir.join(target).join("release").join(NAME);
    let elf = std::fs::read(&bin)?;
    if has_interpreter(&elf)? {
        bail!("{} is dynamically linked (it has a PT_INTERP program header)", bin.display());
    }
    if target == MUSL {
        within_budget(elf.len() as u64)?;
    }
    eprintln!("    static binary: {} bytes (budget {SIZE_BUDGET})", elf.len());
    Ok((bin, target))
}

/// The most the static (musl) binary may weigh, in bytes (docs/performance.md).
/// Every build of it checks, so a change over budget fails `cargo xtask dist`
/// and with it `cargo xtask test`, not a later measurement.
pub const SIZE_BUDGET: u64 = 2_200_000;

fn within_budget(len: u64) -> Result<()> {
    if len > SIZE_BUDGET {
        bail!(
            "the static binary is {len} bytes, {} over its budget of {SIZE_BUDGET} (docs/performance.md): \
             find the saving in the agent before adding to it",
            len - SIZE_BUDGET
        );
    }
    Ok(())
}

/// Whether a 64-bit little-endian ELF file names a dynamic loader
/// (PT_INTERP): a static (or static-pie) binary does not.
pub fn has_interpreter(elf: &[u8]) -> Result<bool> {
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 || elf[5] != 1 {
        bail!("not a 64-bit little-endian ELF file");
    }
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[32..40].try_into()?) as usize;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    for i in 0..phnum {
        let o = phoff + i * phentsize;
        if o + 4 > elf.len() {
            bail!("truncated ELF program headers");
        }
        if u32::from_le_bytes(elf[o..o + 4].try_into()?) == 3 {
            return Ok(true);
        }
    }
    Ok(false)
}

/// A file of the package: destination, mode, content; `conf` marks config
/// (conffile, %config(noreplace), apk-protected: all of /etc is).
pub struct Item {
    pub dest: String,
    pub mode: u32,
    pub data: Vec<u8>,
}

/// Which package a file goes into.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Deb,
    Rpm,
    Apk,
}

fn config_json(opts: &Opts) -> Result<Vec<u8>> {
    match &opts.config {
        Some(c) => Ok(c.clone()),
        None => read_pkg("common/config.json"),
    }
}

pub fn read_pkg(rel: &str) -> Result<Vec<u8>> {
    let p = root().join("packaging").join(rel);
    std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))
}

/// Man page and shell completions from the agent's command table.
pub fn generated_docs(version: &str) -> Result<Vec<(String, Vec<u8>)>> {
    use clap_complete::Shell;
    let version: &'static str = Box::leak(version.to_string().into_boxed_str());
    let cmd = crate::clidef::agent_command(version);
    let mut man = Vec::new();
    clap_mangen::Man::new(cmd.clone()).section("8").date("").render(&mut man)?;
    let mut out = vec![(format!("{NAME}.8"), man)];
    for (shell, name) in [
        (Shell::Bash, format!("completions/{NAME}.bash")),
        (Shell::Zsh, format!("completions/_{NAME}")),
        (Shell::Fish, format!("completions/{NAME}.fish")),
    ] {
        let mut buf = Vec::new();
        let mut c = cmd.clone();
        clap_complete::generate(shell, &mut c, NAME, &mut buf);
        out.push((name, buf));
    }
    Ok(out)
}

fn doc(docs: &[(String, Vec<u8>)], name: &str) -> Vec<u8> {
    docs.iter().find(|(n, _)| n == name).map(|(_, d)| d.clone()).unwrap_or_default()
}

/// Everything a package installs, for one format.
pub fn contents(fmt: Format, bin: &[u8], docs: &[(String, Vec<u8>)], opts: &Opts) -> Result<Vec<Item>> {
    let epoch = opts.epoch;
    let mut v = vec![
        Item { dest: format!("/usr/bin/{NAME}"), mode: 0o755, data: bin.to_vec() },
        // Run by every package's install script: takes over from the
        // Python agent 1.0.3 (docs/packaging.md).
        Item { dest: format!("/usr/lib/{NAME}/takeover"), mode: 0o755, data: read_pkg("common/takeover.sh")? },
        Item {
            dest: format!("/etc/logrotate.d/{NAME}"),
            mode: 0o644,
            data: read_pkg("common/xcp-vm-agent.logrotate")?,
        },
        Item {
            dest: format!("/usr/share/man/man8/{NAME}.8.gz"),
            mode: 0o644,
            data: gzip_n(&doc(docs, &format!("{NAME}.8")))?,
        },
        Item {
            dest: format!("/usr/share/bash-completion/completions/{NAME}"),
            mode: 0o644,
            data: doc(docs, &format!("completions/{NAME}.bash")),
        },
        Item {
            dest: format!("{}/_{NAME}", zsh_dir(fmt)),
            mode: 0o644,
            data: doc(docs, &format!("completions/_{NAME}")),
        },
        Item {
            dest: format!("/usr/share/fish/vendor_completions.d/{NAME}.fish"),
            mode: 0o644,
            data: doc(docs, &format!("completions/{NAME}.fish")),
        },
    ];
    if fmt == Format::Deb {
        // Never a conffile (a config 1.0.3 wrote would make dpkg prompt):
        // postinst copies the template to /etc when no config exists.
        v.push(Item { dest: format!("/usr/share/{NAME}/config.json"), mode: 0o644, data: config_json(opts)? });
    } else {
        // rpm: %config(noreplace); apk: /etc is protected.
        v.push(Item { dest: format!("/etc/{NAME}/config.json"), mode: 0o600, data: config_json(opts)? });
    }
    match fmt {
        Format::Deb => {
            // The LSB script runs under sysvinit and under Debian's OpenRC;
            // the native OpenRC script is shipped for reference.
            v.push(Item {
                dest: format!("/etc/init.d/{NAME}"),
                mode: 0o755,
                data: read_pkg("common/xcp-vm-agent.init")?,
            });
            v.push(Item {
                dest: format!("/usr/share/doc/{NAME}/examples/openrc-init"),
                mode: 0o644,
                data: read_pkg("common/xcp-vm-agent.openrc")?,
            });
            v.push(Item {
                dest: format!("/usr/share/lintian/overrides/{NAME}"),
                mode: 0o644,
                data: read_pkg("deb/lintian-overrides")?,
            });
            v.push(Item {
                dest: format!("/usr/share/doc/{NAME}/changelog.gz"),
                mode: 0o644,
                data: gzip_n(debian_changelog(NAME, "", epoch).as_bytes())?,
            });
        }
        Format::Rpm => {
            v.push(Item {
                dest: format!("/usr/lib/systemd/system/{NAME}.service"),
                mode: 0o644,
                data: read_pkg("common/xcp-vm-agent.service")?,
            });
            v.push(Item {
                dest: format!("/etc/init.d/{NAME}"),
                mode: 0o755,
                data: read_pkg("common/xcp-vm-agent.init")?,
            });
        }
        Format::Apk => {
            v.push(Item {
                dest: format!("/etc/init.d/{NAME}"),
                mode: 0o755,
                data: read_pkg("common/xcp-vm-agent.openrc")?,
            });
        }
    }
    Ok(v)
}

/// Where zsh looks for vendor completions: Debian's own directory, else
/// the one Fedora, SUSE and Alpine use.
pub fn zsh_dir(fmt: Format) -> &'static str {
    match fmt {
        Format::Deb => "/usr/share/zsh/vendor-completions",
        _ => "/usr/share/zsh/site-functions",
    }
}

/// gzip -n equivalent (no name, no time).
fn gzip_n(data: &[u8]) -> Result<Vec<u8>> {
    apk::gzip(data)
}

/// Word-wrap to `width` columns (RPM descriptions).
pub fn wrap(text: &str, width: usize) -> String {
    let mut out = String::new();
    let mut line = String::new();
    for w in text.split_whitespace() {
        if !line.is_empty() && line.len() + 1 + w.len() > width {
            out.push_str(&line);
            out.push('\n');
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(w);
    }
    out.push_str(&line);
    out
}

/// RFC 2822 date of a Unix time (UTC), for the Debian changelog.
pub fn rfc2822(t: u64) -> String {
    let days = (t / 86400) as i64;
    let secs = t % 86400;
    let (y, m, d) = xcp_vm_agent::logging::civil_from_days(days);
    const WD: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MON: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} +0000",
        WD[days.rem_euclid(7) as usize],
        d,
        MON[(m - 1) as usize],
        y,
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

fn debian_changelog(name: &str, version: &str, epoch: u64) -> String {
    let v = if version.is_empty() { "VERSION" } else { version };
    format!(
        "{name} ({v}) unstable; urgency=medium\n\n  * Release {v}, built by cargo xtask dist.\n\n -- {MAINTAINER}  {}\n",
        rfc2822(epoch)
    )
}

/// Write every artifact and SHA256SUMS into `opts.out`; returns the paths.
pub fn package_all(opts: &Opts, bin: &Path) -> Result<Vec<PathBuf>> {
    let bin_data = std::fs::read(bin).with_context(|| format!("cannot read {}", bin.display()))?;
    std::fs::create_dir_all(&opts.out)?;
    let docs = generated_docs(&opts.version)?;
    let mut files = vec![
        build_deb(opts, &bin_data, &docs)?,
        build_rpm(opts, &bin_data, &docs)?,
        build_apk(opts, &bin_data, &docs)?,
        build_tarball(opts, &bin_data, &docs)?,
    ];
    let mut sums = String::new();
    for f in &files {
        let data = std::fs::read(f)?;
        writeln!(sums, "{}  {}", apk::sha256_hex(&data), f.file_name().unwrap().to_string_lossy())?;
    }
    let sums_path = opts.out.join("SHA256SUMS");
    std::fs::write(&sums_path, sums)?;
    files.push(sums_path);
    Ok(files)
}

/// Install cargo-deb at the pinned version when it is missing or different.
pub fn ensure_cargo_deb() -> Result<()> {
    let have_it = Command::new("cargo-deb")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(CARGO_DEB_VERSION))
        .unwrap_or(false);
    if !have_it {
        step(&format!("dist: installing cargo-deb {CARGO_DEB_VERSION}"));
        util::run(Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())).args([
            "install",
            "cargo-deb",
            "--version",
            CARGO_DEB_VERSION,
            "--locked",
        ]))?;
    }
    Ok(())
}

fn toml_str(s: &str) -> String {
    format!("{:?}", s)
}

/// The .deb, through cargo-deb: a throw-away manifest in the work directory
/// names the staged files as assets, so the agent's Cargo.toml stays free of
/// packaging metadata and the version can be overridden for upgrade tests.
fn build_deb(opts: &Opts, bin: &[u8], docs: &[(String, Vec<u8>)]) -> Result<PathBuf> {
    ensure_cargo_deb()?;
    step("dist: .deb (cargo-deb)");
    let work = opts.out.join("work/deb");
    if work.exists() {
        std::fs::remove_dir_all(&work)?;
    }
    let stage = work.join("stage");
    let mut assets = String::new();
    let mut items = contents(Format::Deb, bin, docs, opts)?;
    // The changelog names the real version.
    for it in &mut items {
        if it.dest.ends_with("/changelog.gz") {
            it.data = gzip_n(debian_changelog(NAME, &opts.version, opts.epoch).as_bytes())?;
        }
    }
    for it in &items {
        let src = stage.join(it.dest.trim_start_matches('/'));
        std::fs::create_dir_all(src.parent().unwrap())?;
        std::fs::write(&src, &it.data)?;
        writeln!(
            assets,
            "  [{}, {}, \"{:o}\"],",
            toml_str(&src.display().to_string()),
            toml_str(it.dest.trim_start_matches('/')),
            it.mode
        )?;
    }
    let units = work.join("units");
    std::fs::create_dir_all(&units)?;
    std::fs::write(units.join(format!("{NAME}.service")), read_pkg("common/xcp-vm-agent.service")?)?;
    let scripts = root().join("packaging/deb/scripts");
    let manifest = format!(
        r#"# Generated by cargo xtask dist; not part of the workspace.
[workspace]

[package]
name = "{NAME}"
version = "{version}"
edition = "2021"
license = "{LICENSE}"
description = {summary}
homepage = "{URL}"
publish = false

[lib]
path = "lib.rs"

[package.metadata.deb]
maintainer = {maint}
copyright = "2025-2026 The xcp-vm-agent authors"
revision = ""
section = "admin"
priority = "optional"
depends = {depends}
pre-depends = "init-system-helpers (>= 1.54~)"
recommends = "logrotate"
extended-description = {desc}
maintainer-scripts = {scripts}
systemd-units = {{ unit-scripts = "units", enable = true, start = true, restart-after-upgrade = true }}
assets = [
{assets}]
"#,
        version = opts.version,
        summary = toml_str(SUMMARY),
        maint = toml_str(MAINTAINER),
        depends = toml_str(DEB_DEPENDS),
        desc = toml_str(DESCRIPTION),
        scripts = toml_str(&scripts.display().to_string()),
    );
    std::fs::write(work.join("Cargo.toml"), manifest)?;
    std::fs::write(work.join("lib.rs"), "")?;
    let out = opts.out.join(deb_name(&opts.version));
    util::run(
        Command::new("cargo-deb")
            .env("SOURCE_DATE_EPOCH", opts.epoch.to_string())
            .env("CARGO_TARGET_DIR", work.join("target"))
            .arg("--manifest-path")
            .arg(work.join("Cargo.toml"))
            .args(["--no-build", "--no-strip", "--quiet", "--offline", "--output"])
            .arg(&out),
    )?;
    Ok(out)
}

fn rpm_script(name: &str) -> Result<String> {
    Ok(String::from_utf8(read_pkg(&format!("rpm/{name}"))?)?)
}

/// The .rpm, through the `rpm` crate (gzip payload).
fn build_rpm(opts: &Opts, bin: &[u8], docs: &[(String, Vec<u8>)]) -> Result<PathBuf> {
    step("dist: .rpm (rpm crate, gzip payload)");
    let cfg = rpm::BuildConfig::v4().compression(rpm::CompressionType::Gzip).source_date(opts.epoch as u32);
    let mut b = rpm::PackageBuilder::new(NAME, &opts.version, LICENSE, "x86_64", SUMMARY);
    b.using_config(cfg)
        .release("1")
        .url(URL)
        .description(wrap(DESCRIPTION, 76))
        .vendor("xcp-vm-agent")
        .packager(MAINTAINER)
        .group("System Environment/Daemons")
        .build_host("localhost")
        .add_changelog_entry(
            format!("{MAINTAINER} - {}-1", opts.version),
            format!("- Release {}, built by cargo xtask dist.", opts.version),
            opts.epoch as u32,
        );
    for it in contents(Format::Rpm, bin, docs, opts)? {
        let mut o = rpm::FileOptions::new(it.dest.clone()).permissions(it.mode as u16).user("root").group("root");
        if it.dest.starts_with(&format!("/etc/{NAME}/")) || it.dest.starts_with("/etc/logrotate.d/") {
            o = o.config().noreplace();
        }
        if it.dest.starts_with("/usr/share/man/") {
            o = o.doc();
        }
        b.with_file_contents(it.data, o)?;
    }
    // Our own directories, and the completion directories of shells we do
    // not depend on (shared ownership, so rpm -e leaves nothing behind).
    for (dir, mode) in [
        (format!("/etc/{NAME}"), 0o700),
        (format!("/var/lib/{NAME}"), 0o700),
        (format!("/var/log/{NAME}"), 0o750),
        (format!("/usr/lib/{NAME}"), 0o755),
        ("/usr/share/zsh".to_string(), 0o755),
        ("/usr/share/zsh/site-functions".to_string(), 0o755),
        ("/usr/share/fish".to_string(), 0o755),
        ("/usr/share/fish/vendor_completions.d".to_string(), 0o755),
    ] {
        b.with_dir_entry(rpm::FileOptions::dir(dir).permissions(mode).user("root").group("root"))?;
    }
    b.post_install_script(rpm_script("post.sh")?)
        .pre_uninstall_script(rpm_script("preun.sh")?)
        .post_uninstall_script(rpm_script("postun.sh")?);
    for r in RPM_REQUIRES {
        b.requires(rpm::Dependency::any(*r));
    }
    b.requires(rpm::Dependency::rpmlib("rpmlib(RichDependencies)", "4.12.0-1"));
    b.recommends(rpm::Dependency::any("logrotate"));
    let pkg = b.build()?;
    let out = opts.out.join(rpm_name(&opts.version));
    pkg.write_file(&out).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(out)
}

fn build_apk(opts: &Opts, bin: &[u8], docs: &[(String, Vec<u8>)]) -> Result<PathBuf> {
    step("dist: .apk (our APK v2 writer)");
    let mut entries: Vec<apk::Entry> = contents(Format::Apk, bin, docs, opts)?
        .into_iter()
        .map(|it| apk::Entry::file(&it.dest, it.mode, it.data))
        .collect();
    entries.push(apk::Entry::dir(&format!("/etc/{NAME}"), 0o700));
    entries.push(apk::Entry::dir(&format!("/var/lib/{NAME}"), 0o700));
    entries.push(apk::Entry::dir(&format!("/var/log/{NAME}"), 0o750));
    let version = format!("{}-r0", opts.version);
    let meta = apk::Meta {
        name: NAME,
        version: &version,
        description: SUMMARY,
        url: URL,
        license: LICENSE,
        packager: MAINTAINER,
        arch: "x86_64",
        depends: APK_DEPENDS,
        builddate: opts.epoch,
    };
    let scripts = [
        (".post-install", read_pkg("apk/post-install")?),
        (".post-upgrade", read_pkg("apk/post-upgrade")?),
        (".pre-deinstall", read_pkg("apk/pre-deinstall")?),
    ];
    let data = apk::build(&meta, &scripts, &entries)?;
    let out = opts.out.join(apk_name(&opts.version));
    std::fs::write(&out, data)?;
    crate::apkcheck::check_file(&out)?;
    Ok(out)
}

/// The universal tarball: binary, installer, service files for every init.
fn build_tarball(opts: &Opts, bin: &[u8], docs: &[(String, Vec<u8>)]) -> Result<PathBuf> {
    step("dist: .tar.gz (install.sh / uninstall.sh)");
    let dir = format!("{NAME}-{}-x86_64", opts.version);
    let mut entries = vec![
        apk::Entry::dir(&dir, 0o755),
        apk::Entry::file(&format!("{dir}/{NAME}"), 0o755, bin.to_vec()),
        apk::Entry::file(&format!("{dir}/install.sh"), 0o755, read_pkg("common/install.sh")?),
        apk::Entry::file(&format!("{dir}/uninstall.sh"), 0o755, read_pkg("common/uninstall.sh")?),
        apk::Entry::file(&format!("{dir}/offline.sh"), 0o644, read_pkg("common/offline.sh")?),
        apk::Entry::file(&format!("{dir}/takeover.sh"), 0o755, read_pkg("common/takeover.sh")?),
        apk::Entry::file(&format!("{dir}/config.json"), 0o600, config_json(opts)?),
    ];
    for f in ["xcp-vm-agent.service", "xcp-vm-agent.logrotate"] {
        entries.push(apk::Entry::file(&format!("{dir}/{f}"), 0o644, read_pkg(&format!("common/{f}"))?));
    }
    for f in ["xcp-vm-agent.init", "xcp-vm-agent.openrc"] {
        entries.push(apk::Entry::file(&format!("{dir}/{f}"), 0o755, read_pkg(&format!("common/{f}"))?));
    }
    entries.push(apk::Entry::dir(&format!("{dir}/completions"), 0o755));
    for (name, data) in docs {
        entries.push(apk::Entry::file(&format!("{dir}/{name}"), 0o644, data.clone()));
    }
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    let mut w = apk::TarWriter::new(opts.epoch);
    for e in &entries {
        w.add(e, false)?;
    }
    let out = opts.out.join(tarball_name(&opts.version));
    std::fs::write(&out, apk::gzip(&w.finish(true))?)?;
    Ok(out)
}

/// Is the tool there? (for checks that need one)
pub fn need(tool: &str) -> Result<()> {
    if !have(tool) {
        bail!("{tool} is not installed: run cargo xtask setup");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc2822_dates() {
        assert_eq!(rfc2822(0), "Thu, 01 Jan 1970 00:00:00 +0000");
        assert_eq!(rfc2822(1_700_000_000), "Tue, 14 Nov 2023 22:13:20 +0000");
        assert_eq!(rfc2822(951_782_400), "Tue, 29 Feb 2000 00:00:00 +0000");
    }

    #[test]
    fn size_budget_is_inclusive_and_names_the_excess() {
        within_budget(SIZE_BUDGET).unwrap();
        within_budget(2_122_680).unwrap();
        let e = within_budget(SIZE_BUDGET + 424).unwrap_err().to_string();
        assert!(e.contains("2200424 bytes, 424 over its budget of 2200000"), "{e}");
    }
}
