//! `cargo xtask vm-test`: the VM matrix. Every scenario ([`scenario`]) on
//! every image ([`image`]), each image booted with QEMU ([`qemu`], TCG by
//! default) against one `mgmt-server` on this machine's loopback; the
//! results go to `target/vm-report/` ([`report`]).
//!
//! Flow: the real .deb (`cargo xtask dist`) and a newer build of it, a test
//! PKI whose server certificate names `mgmt.test`, mgmt-server on free
//! loopback ports, a small read-only `FILES` disk carrying packages,
//! certificates and the agent config; then images in parallel (as many as
//! `--jobs`, default 2 for 2 cores), each: build or take the cached disk,
//! run its chains of scenarios, print one progress line per scenario.
//! Images of the cloud kind (`debian-12-genericcloud`, and every entry of
//! the catalogue ci/distros.toml) are booted by their own bootloader and
//! provisioned by cloud-init ([`cloud`]); the scenarios are the same.
pub mod catalogue_check;
pub mod cloud;
pub mod image;
pub mod pkg;
pub mod qemu;
pub mod report;
pub mod scenario;

use crate::util::{self, cargo, have, is_root, root, step};
use anyhow::{bail, ensure, Context, Result};
use report::Row;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The name the guest uses for the management server (in the server cert).
pub const SERVER_NAME: &str = "mgmt.test";

const HELP: &str = "\
cargo xtask vm-test [--image NAME]... [--scenario NAME]... [--list] [--catalogue]
                    [--keep] [--jobs N] [--accel tcg|kvm] [--deb PATH]

The VM matrix: boots images (QEMU, software emulation by default) with the
real .deb and runs every scenario on every image against mgmt-server on this
machine's loopback. Images are the Debian images built here and, of the
cloud kind, debian-12-genericcloud (built here to look like Debian's cloud
image) and every entry of the catalogue ci/distros.toml (downloaded and
verified; needs internet): booted by their own bootloader, provisioned by
cloud-init from a NoCloud seed, our package installed from the FILES disk by
the entry's `install` command. Writes target/vm-report/report.json, report.md and
report.html (the image x scenario grid, each cell linking to its console log),
checks the page in headless chromium when it is installed (screenshot
target/vm-report/report.png). One progress line per scenario as it ends.
Fails when any cell is red.

Images are built with mmdebstrap and cached under target/vm/ by a hash of
their recipe (first build: 2-4 minutes per image); catalogue images are
cached under target/vm-images/. Needs root.

Options:
  --image NAME     only this image (repeatable): one built here (see --list) or
                   a catalogue entry (ci/distros.toml)
  --catalogue      --image names the catalogue's entry even where an image
                   built here has the same name (debian-11, -12, -13)
  --scenario NAME  only this scenario and those it builds on (repeatable)
  --list           print the images and scenarios and exit; with --json, the
                   CI job matrix generated from the cloud-image catalogue
  --check-catalogue  validate ci/distros.toml and ci/github/vm-matrix.yml offline
  --offline        all images built here (the default when no --image is given)
  --ci             the cells `cargo xtask test` runs (CI_IMAGES x CI_SCENARIOS)
  --keep           keep the run directories under target/vm/run
  --build-only     build (or check the cache of) the images, boot nothing
  --jobs N         images booted at once (default 2)
  --accel A        QEMU accelerator (default tcg: this machine's KVM does not boot guests)
  --deb PATH       install this .deb instead of building one with `cargo xtask dist`
  -h, --help       this text
Environment: XCP_VM_SLOW=N multiplies every scenario deadline by N.
";

/// What every image run shares: the server, the packages, the FILES disk.
pub struct Env {
    pub accel: String,
    pub server_port: u16,
    pub admin: String,
    pub files_disk: PathBuf,
    pub deb_name: String,
    pub next_deb_name: String,
    pub version: String,
    pub next_version: String,
    pub slow_factor: u32,
    pub run_dir: PathBuf,
}

/// The cells `cargo xtask test` runs (CI fails on any red or missing one):
/// every image built here ([`image::IMAGES`]) x every scenario, each proven
/// green here before it joined (docs/vm-tests.md); tests check none is left
/// out. debian-11 joined with the udev re-probe (2e0c2b5), debian-12-openrc
/// after runs of its own. Slowest first (the run starts the main chains in
/// this order).
pub const CI_IMAGES: &[&str] =
    &["debian-12-genericcloud", "debian-13", "debian-12-sysvinit", "debian-12", "debian-12-openrc", "debian-11"];
/// Every scenario (freeze-deadline joined once the thaw guard ran in a
/// scope of its own, c084026).
pub const CI_SCENARIOS: &[&str] = &[
    "install",
    "check-in",
    "initialize-ext4",
    "initialize-xfs",
    "run-script",
    "grow-root-online",
    "grow-lvm-online",
    "swap-after-root-refused",
    "freeze-thaw",
    "freeze-deadline",
    "reboot-remount",
    "grow-data-online",
    "reboot-once",
    "shutdown",
    "boot-without-disk",
    "restart-during-job",
    "upgrade-from-script",
    "upgrade",
    "remove",
    "takeover-1.0.3",
    "inject-offline",
];

/// `vm-test` arguments for `cargo xtask test`.
pub fn ci_args() -> Vec<String> {
    let mut v = vec!["--offline".to_string()];
    for i in CI_IMAGES {
        v.extend(["--image".to_string(), i.to_string()]);
    }
    for s in CI_SCENARIOS {
        v.extend(["--scenario".to_string(), s.to_string()]);
    }
    v
}

pub struct Opts {
    pub images: Vec<String>,
    pub scenarios: Vec<String>,
    pub keep: bool,
    pub jobs: usize,
    pub accel: String,
    pub deb: Option<PathBuf>,
    pub build_only: bool,
    /// `--image` names catalogue entries.
    pub catalogue: bool,
}

pub fn run(args: &[String]) -> Result<()> {
    let mut o = Opts {
        images: vec![],
        scenarios: vec![],
        keep: false,
        jobs: 2,
        accel: "tcg".into(),
        deb: None,
        build_only: false,
        catalogue: false,
    };
    let mut list_json: Option<bool> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-h" | "--help" => {
                print!("{HELP}");
                return Ok(());
            }
            "--list" => list_json = list_json.or(Some(false)),
            "--json" => list_json = Some(true),
            "--check-catalogue" => {
                step("vm-test: checking the cloud-image catalogue ci/distros.toml and ci/github/vm-matrix.yml");
                return catalogue_check::ci_checks(&scenario_names());
            }
            "--offline" => {}
            "--ci" => {
                o.images.extend(CI_IMAGES.iter().map(|s| s.to_string()));
                o.scenarios.extend(CI_SCENARIOS.iter().map(|s| s.to_string()));
            }
            "--catalogue" => o.catalogue = true,
            "--build-only" => o.build_only = true,
            "--keep" => o.keep = true,
            "--image" => o.images.push(it.next().context("--image needs a name")?.clone()),
            "--scenario" => o.scenarios.push(it.next().context("--scenario needs a name")?.clone()),
            "--jobs" => o.jobs = it.next().context("--jobs needs a number")?.parse().context("--jobs")?,
            "--accel" => o.accel = it.next().context("--accel needs a value")?.clone(),
            "--deb" => o.deb = Some(PathBuf::from(it.next().context("--deb needs a value")?)),
            other => bail!("unknown option {other:?}\n\n{HELP}"),
        }
    }
    match list_json {
        Some(false) => {
            list();
            Ok(())
        }
        // The CI matrix: one row per catalogue image (ci/distros.toml).
        Some(true) => {
            let entries = crate::catalogue::load(&crate::catalogue::path())?;
            let probs = crate::catalogue::problems(&entries, &scenario_names());
            ensure!(probs.is_empty(), "the catalogue is not valid:\n  {}", probs.join("\n  "));
            println!("{}", crate::catalogue::github_matrix(&entries));
            Ok(())
        }
        None => run_matrix(&o),
    }
}

/// Every scenario name, in table order (the catalogue's `skip` entries
/// must name one of these).
pub fn scenario_names() -> Vec<&'static str> {
    scenario::SCENARIOS.iter().map(|s| s.name).collect()
}

fn list() {
    println!("images built here (name, suite, init, root layout, kind):");
    for i in image::IMAGES {
        let kind = match i.kind {
            image::Kind::Built => "mmdebstrap, -kernel".to_string(),
            image::Kind::Cloud { entry, .. } => format!("cloud (own bootloader, cloud-init, install of {entry})"),
        };
        println!("  {:<22} {:<9} {:<9} {:<11} {kind}", i.name, i.suite, i.init.name(), i.layout.describe());
    }
    if let Ok(entries) = crate::catalogue::load(&crate::catalogue::path()) {
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        println!("catalogue images (ci/distros.toml, downloaded; --catalogue for debian-*): {}", names.join(" "));
    }
    println!("scenarios (name, chain, builds on):");
    for s in scenario::SCENARIOS {
        println!("  {:<24} {:<9} {}", s.name, s.chain, s.needs.join(", "));
    }
}

/// The scenarios to run: those asked for and what they build on, in table order.
fn selected_scenarios(names: &[String]) -> Result<Vec<&'static scenario::Scenario>> {
    scenario::check_names(names)?;
    if names.is_empty() {
        return Ok(scenario::SCENARIOS.iter().collect());
    }
    let mut want: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut i = 0;
    while i < want.len() {
        for n in scenario::by_name(want[i]).map(|s| s.needs).unwrap_or(&[]) {
            if !want.contains(n) {
                want.push(n);
            }
        }
        i += 1;
    }
    Ok(scenario::SCENARIOS.iter().filter(|s| want.contains(&s.name)).collect())
}

pub fn run_matrix(o: &Opts) -> Result<()> {
    let t0 = Instant::now();
    let imgs: Vec<&'static image::Image> = if o.images.is_empty() {
        image::IMAGES.iter().collect()
    } else {
        o.images.iter().map(|n| image::by_name(n, o.catalogue)).collect::<Result<_>>()?
    };
    let scens = selected_scenarios(&o.scenarios)?;
    if !is_root() {
        bail!("cargo xtask vm-test needs root (mmdebstrap, loop devices, chroot)");
    }
    ensure_tools()?;
    if o.build_only {
        for img in &imgs {
            let t = Instant::now();
            let b = image::build(img)?;
            eprintln!(
                "    vm: {:<20} image ready in {:.0} s: {}",
                img.name,
                t.elapsed().as_secs_f64(),
                b.disk.display()
            );
        }
        return Ok(());
    }
    let run_dir = root().join("target/vm/run");
    if run_dir.exists() {
        std::fs::remove_dir_all(&run_dir).with_context(|| format!("cannot remove {}", run_dir.display()))?;
    }
    std::fs::create_dir_all(&run_dir)?;

    let version = crate::pkgmeta::workspace_version()?;
    let next_version = next_version(&version);
    let (deb, next_deb) = packages(o, &version, &next_version)?;
    step("vm: building mgmt-server");
    util::run(cargo().args(["build", "-q", "-p", "vm-tests", "--bin", "mgmt-server"]))?;
    let server_bin = target_dir().join("debug/mgmt-server");
    let pki = run_dir.join("pki");
    util::run(Command::new(&server_bin).arg("init-pki").arg(&pki).args(["--san", SERVER_NAME]).stdout(Stdio::null()))?;
    let mut server = start_server(&server_bin, &pki, &run_dir)?;
    let files_disk = files_disk(&run_dir, &pki, (&deb, &version), (&next_deb, &next_version))?;
    let slow_factor = std::env::var("XCP_VM_SLOW").ok().and_then(|v| v.parse().ok()).unwrap_or(1u32).max(1);
    let env = Arc::new(Env {
        accel: o.accel.clone(),
        server_port: server.1,
        admin: server.2.clone(),
        files_disk,
        deb_name: deb.file_name().unwrap().to_string_lossy().into_owned(),
        next_deb_name: next_deb.file_name().unwrap().to_string_lossy().into_owned(),
        version,
        next_version,
        slow_factor,
        run_dir: run_dir.clone(),
    });

    step(&format!(
        "vm: {} image(s) x {} scenario(s), {} VM(s) at a time (one per chain of an image)",
        imgs.len(),
        scens.len(),
        o.jobs.max(1)
    ));
    let sched = Arc::new(Sched::new(&imgs, &scens));
    let mut workers = Vec::new();
    for _ in 0..o.jobs.max(1) {
        let (sched, env, scens) = (sched.clone(), env.clone(), scens.clone());
        workers.push(std::thread::spawn(move || {
            while let Some((i, chain)) = sched.next() {
                run_unit(&sched, i, chain, &env, &scens);
            }
        }));
    }
    for w in workers {
        let _ = w.join();
    }
    let _ = server.0.kill();
    let _ = server.0.wait();
    let results = sched.results(&scens);
    let total = t0.elapsed().as_secs_f64();
    let out = report::write(&results, &scens, total)?;
    if !o.keep && results.iter().all(|r| r.rows.iter().all(|x| x.status == "pass")) {
        let _ = std::fs::remove_dir_all(&run_dir);
    }
    let rows: Vec<&Row> = results.iter().flat_map(|r| r.rows.iter()).collect();
    let passed = rows.iter().filter(|r| r.status == "pass").count();
    let expected = imgs.len() * scens.len();
    step(&format!(
        "vm: {passed}/{expected} cells green in {:.0} s; report {}",
        total,
        out.join("report.html").display()
    ));
    report::check_in_browser(&out, &results)?;
    ensure!(rows.len() == expected, "{} cells missing from the report", expected - rows.len());
    if passed != expected {
        for r in rows.iter().filter(|r| r.status != "pass") {
            eprintln!("    RED {} / {}: {} (step: {})", r.image, r.scenario, r.message, r.step);
        }
        bail!("{} of {expected} cells are red (report: {})", expected - passed, out.join("report.md").display());
    }
    Ok(())
}

/// An image's build, done once per run: the image, or why it failed.
type BuildSlot = Mutex<Option<std::result::Result<Arc<image::Built>, String>>>;

/// The work of a run: one unit per chain of each image (a chain is one
/// VM at a time on its own overlay), so `--jobs` VMs stay busy until the
/// end instead of one image's long tail running alone (give the images
/// slowest first: `--image` order, as `CI_IMAGES` does). An image is built
/// once, by the first unit that needs it (the others wait for it, and a
/// free worker prefers a unit whose image is not being built); its report
/// row gathers the rows of all its chains.
struct Sched {
    imgs: Vec<&'static image::Image>,
    queue: Mutex<Vec<(usize, &'static str)>>,
    /// Per image: the build (once), and what its chains gave so far.
    builds: Vec<BuildSlot>,
    results: Vec<Mutex<report::ImageResult>>,
    chains_left: Vec<Mutex<usize>>,
}

impl Sched {
    fn new(imgs: &[&'static image::Image], scens: &[&'static scenario::Scenario]) -> Sched {
        let mut chains: Vec<&'static str> = Vec::new();
        for s in scens {
            if !chains.contains(&s.chain) {
                chains.push(s.chain);
            }
        }
        // Longest first: every image's main chain (most of an image's
        // time, and its image build), then the short chains, which fill
        // the end of the run while the last main chains finish.
        let mut queue = Vec::new();
        for c in &chains {
            queue.extend((0..imgs.len()).map(|i| (i, *c)));
        }
        Sched {
            imgs: imgs.to_vec(),
            queue: Mutex::new(queue),
            builds: imgs.iter().map(|_| Mutex::new(None)).collect(),
            results: imgs
                .iter()
                .map(|img| {
                    Mutex::new(report::ImageResult {
                        image: img,
                        versions: vec![],
                        build_seconds: 0.0,
                        seconds: 0.0,
                        rows: vec![],
                    })
                })
                .collect(),
            chains_left: imgs.iter().map(|_| Mutex::new(chains.len())).collect(),
        }
    }

    /// The next unit: the first whose image is not being built right now
    /// (else the first).
    fn next(&self) -> Option<(usize, &'static str)> {
        let mut q = self.queue.lock().unwrap();
        if q.is_empty() {
            return None;
        }
        let pick = q.iter().position(|(i, _)| self.builds[*i].try_lock().is_ok()).unwrap_or(0);
        Some(q.remove(pick))
    }

    /// The rows of every image, each in scenario table order.
    fn results(&self, scens: &[&'static scenario::Scenario]) -> Vec<report::ImageResult> {
        self.results
            .iter()
            .map(|m| {
                let mut r = std::mem::replace(
                    &mut *m.lock().unwrap(),
                    report::ImageResult {
                        image: self.imgs[0],
                        versions: vec![],
                        build_seconds: 0.0,
                        seconds: 0.0,
                        rows: vec![],
                    },
                );
                r.rows.sort_by_key(|row| scens.iter().position(|s| s.name == row.scenario));
                r
            })
            .collect()
    }
}

/// One chain of one image: build the image if no unit did yet, run the
/// chain's scenarios on a fresh overlay, print one line per scenario.
/// An image's `seconds` is its build plus the time of each of its chains
/// (what it costs the run, whichever worker ran it).
fn run_unit(sched: &Sched, i: usize, chain: &'static str, env: &Env, scens: &[&'static scenario::Scenario]) {
    let img = sched.imgs[i];
    let t = Instant::now();
    let built = {
        let mut b = sched.builds[i].lock().unwrap();
        if b.is_none() {
            let r = image::build(img).map(Arc::new).map_err(|e| format!("{e:#}"));
            let secs = t.elapsed().as_secs_f64();
            let mut res = sched.results[i].lock().unwrap();
            res.build_seconds = secs;
            res.seconds += secs;
            match &r {
                Ok(b) => {
                    res.versions = b.versions.clone();
                    eprintln!("    vm: {:<20} image ready in {secs:.0} s", img.name);
                }
                Err(e) => eprintln!("    vm: {:<20} image build FAILED: {e}", img.name),
            }
            *b = Some(r);
        }
        b.clone().unwrap()
    };
    let t = Instant::now();
    let (rows, versions) = match built {
        Ok(b) => run_chain(img, &b, env, chain, scens),
        Err(e) => {
            let msg = format!("image build failed: {e}");
            let rows = scens
                .iter()
                .filter(|s| s.chain == chain)
                .map(|s| Row::new(img, s.name, false, 0.0, &msg, "image build", None, String::new()))
                .collect();
            (rows, vec![])
        }
    };
    let mut res = sched.results[i].lock().unwrap();
    res.seconds += t.elapsed().as_secs_f64();
    res.versions.extend(versions);
    res.rows.extend(rows);
    let mut left = sched.chains_left[i].lock().unwrap();
    *left -= 1;
    if *left == 0 {
        eprintln!(
            "    vm: {:<20} done: {:.0} s of VM time (image {:.0} s): {}/{} green",
            img.name,
            res.seconds,
            res.build_seconds,
            res.rows.iter().filter(|r| r.status == "pass").count(),
            res.rows.len()
        );
    }
}

/// The scenarios of one chain on a fresh overlay of the image; a row each,
/// and the tool versions the chain read in the guest (cloud images).
/// A scenario's `needs` are scenarios of the same chain (unit test
/// `needs_are_earlier_in_the_same_chain`).
fn run_chain(
    img: &'static image::Image,
    built: &image::Built,
    env: &Env,
    chain: &'static str,
    scens: &[&'static scenario::Scenario],
) -> (Vec<Row>, Vec<(String, String)>) {
    let mut rows = Vec::new();
    let dir = env.run_dir.join(img.name).join(chain);
    let mut ctx = match scenario::Ctx::new(img, built, env, dir, chain) {
        Ok(c) => c,
        Err(e) => {
            for s in scens.iter().filter(|s| s.chain == chain) {
                let m = format!("cannot set up the chain: {e:#}");
                rows.push(Row::new(img, s.name, false, 0.0, &m, "setup", None, String::new()));
            }
            return (rows, vec![]);
        }
    };
    let mut passed: Vec<&str> = Vec::new();
    for s in scens.iter().filter(|s| s.chain == chain) {
        let missing: Vec<&str> = s.needs.iter().filter(|n| !passed.contains(n)).copied().collect();
        let row = if !missing.is_empty() {
            let m = format!("not run: it builds on {} which did not pass", missing.join(", "));
            Row::new(img, s.name, false, 0.0, &m, "needs", None, String::new())
        } else {
            let out = ctx.run(s);
            if out.pass {
                passed.push(s.name);
            }
            Row::new(img, s.name, out.pass, out.seconds, &out.message, &out.step, out.console, out.console_tail)
        };
        eprintln!(
            "    vm: {:<20} {:<24} {} {:>5.0} s  {}",
            img.name,
            s.name,
            if row.status == "pass" { "pass" } else { "FAIL" },
            row.seconds,
            one_line(&row.message, 110)
        );
        rows.push(row);
    }
    if let Some(mut vm) = ctx.vm.take() {
        vm.kill();
    }
    (rows, ctx.versions)
}

fn one_line(s: &str, n: usize) -> String {
    let l = s.lines().next().unwrap_or("");
    if l.chars().count() > n {
        format!("{}...", l.chars().take(n).collect::<String>())
    } else {
        l.to_string()
    }
}

fn next_version(v: &str) -> String {
    let mut parts: Vec<u64> = v.split('.').filter_map(|p| p.parse().ok()).collect();
    if let Some(last) = parts.last_mut() {
        *last += 1;
    }
    parts.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(".")
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("target"))
}

/// The .deb of this tree and a newer build of it (version N+1, the same
/// code with the version it reports changed: see [`newer_binary`]).
fn packages(o: &Opts, version: &str, next: &str) -> Result<(PathBuf, PathBuf)> {
    let deb = match &o.deb {
        Some(d) => d.clone(),
        None => {
            step("vm: building the .deb (cargo xtask dist)");
            crate::dist::run(&[])?;
            root().join("target/dist").join(crate::pkgmeta::deb_name(version))
        }
    };
    ensure!(deb.exists(), "{} does not exist", deb.display());
    let dir = root().join("target/vm/next");
    std::fs::create_dir_all(&dir)?;
    let bin = dir.join("xcp-vm-agent");
    newer_binary(&deb, &bin, version, next, &dir)?;
    step(&format!("vm: packaging the newer build {next}"));
    crate::dist::run(&[
        "--version".into(),
        next.into(),
        "--out".into(),
        dir.display().to_string(),
        "--binary".into(),
        bin.display().to_string(),
    ])?;
    Ok((deb, dir.join(crate::pkgmeta::deb_name(next))))
}

/// The agent binary of `deb` with its version string changed from
/// `version` to `next` (same length), so that an upgrade shows in the
/// check-in as a real newer build would. Only the agent's own
/// `NAME/VERSION`-style strings are touched: every occurrence of the exact
/// version bytes delimited by non-version characters.
fn newer_binary(deb: &Path, out: &Path, version: &str, next: &str, dir: &Path) -> Result<()> {
    ensure!(version.len() == next.len(), "version {version} -> {next} changes length; cannot patch the binary");
    let x = dir.join("x");
    let _ = std::fs::remove_dir_all(&x);
    util::output(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&x))?;
    let mut b = std::fs::read(x.join("usr/bin/xcp-vm-agent"))?;
    let (v, n) = (version.as_bytes(), next.as_bytes());
    let is_ver = |c: u8| c.is_ascii_digit() || c == b'.';
    let mut count = 0;
    let mut i = 0;
    while i + v.len() <= b.len() {
        if &b[i..i + v.len()] == v && (i == 0 || !is_ver(b[i - 1])) && b.get(i + v.len()).is_none_or(|&c| !is_ver(c)) {
            b[i..i + v.len()].copy_from_slice(n);
            count += 1;
            i += v.len();
        } else {
            i += 1;
        }
    }
    ensure!(count > 0, "no version string {version} in the agent binary");
    std::fs::write(out, &b)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o755))?;
    let _ = std::fs::remove_dir_all(&x);
    let o = util::output(Command::new(out).arg("--version"))?;
    ensure!(o.contains(next), "the patched binary says {o:?}, not {next}");
    Ok(())
}

/// `mgmt-server serve` on free loopback ports: (child, agent port, admin URL).
fn start_server(bin: &Path, pki: &Path, dir: &Path) -> Result<(std::process::Child, u16, String)> {
    let mut child = Command::new(bin)
        .args(["serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--pki"])
        .arg(pki)
        .arg("--state")
        .arg(dir.join("server-state"))
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("server.log"))?)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line)?;
    let https = line.split_whitespace().find(|w| w.starts_with("https://")).context("no https address")?;
    let admin = line.split_whitespace().find(|w| w.starts_with("http://")).context("no admin address")?.to_string();
    let port: u16 = https.rsplit(':').next().and_then(|p| p.trim_end_matches('/').parse().ok()).context("port")?;
    Ok((child, port, admin))
}

/// A small read-only ext4 disk (serial FILES) with the packages, the test
/// PKI and the agent config the guests use.
fn files_disk(
    dir: &Path,
    pki: &Path,
    (deb, version): (&Path, &str),
    (next, next_version): (&Path, &str),
) -> Result<PathBuf> {
    let f = dir.join("files");
    std::fs::create_dir_all(f.join("pki"))?;
    std::fs::copy(deb, f.join(deb.file_name().unwrap()))?;
    std::fs::copy(next, f.join(next.file_name().unwrap()))?;
    // The .rpm and .apk of both builds, for catalogue images that install
    // those (`cargo xtask dist` writes them next to the .deb; the scenarios
    // upgrade to N+1 and back with the image's own format: pkg.rs).
    for (p, v) in [(deb, version), (next, next_version)] {
        let Some(d) = p.parent() else { continue };
        for fmt in [crate::catalogue::Package::Rpm, crate::catalogue::Package::Apk] {
            let n = pkg::file(fmt, v);
            if d.join(&n).exists() {
                std::fs::copy(d.join(&n), f.join(&n))?;
            }
        }
    }
    for n in ["ca.pem", "agent-cert.pem", "agent-key.pem"] {
        std::fs::copy(pki.join(n), f.join("pki").join(n))?;
    }
    let config = serde_json::json!({
        "server_url": format!("https://{SERVER_NAME}:{}", qemu::GUEST_FWD_PORT),
        "server_cert": "/etc/xcp-vm-agent/pki/ca.pem",
        "client_cert": ["/etc/xcp-vm-agent/pki/agent-cert.pem", "/etc/xcp-vm-agent/pki/agent-key.pem"],
        // Check in every 2 s, and the server holds a check-in at most 5 s
        // (a queued job answers it at once): a scenario waiting for "the
        // next check-in" waits seconds, not the default 55 s hold.
        "check_in_interval": 2,
        "long_poll_seconds": 5,
        "log_level": "debug",
    });
    std::fs::write(f.join("config.json"), serde_json::to_vec_pretty(&config)?)?;
    let fixture = root().join("vm-tests/fixtures/python-agent-1.0.3");
    if fixture.is_dir() {
        util::run(Command::new("cp").arg("-a").arg(&fixture).arg(f.join("python-agent-1.0.3")))?;
    }
    let img = dir.join("files.raw");
    // No orphan_file / metadata_csum_seed: the 5.10 kernel of bullseye mounts it too.
    util::output(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-O", "^orphan_file,^metadata_csum_seed", "-L", "FILES", "-d"])
            .arg(&f)
            .arg(&img)
            .arg("64M"),
    )
    .or_else(|_| {
        util::output(Command::new("mkfs.ext4").args(["-q", "-F", "-L", "FILES", "-d"]).arg(&f).arg(&img).arg("64M"))
    })?;
    Ok(img)
}

/// qemu-system-x86_64 (from bookworm-backports), qemu-img and mmdebstrap.
pub fn ensure_tools() -> Result<()> {
    const SOURCES: &str = "/etc/apt/sources.list.d/debian.sources";
    const SED: &str = "0,/^Suites: bookworm bookworm-updates$/s//Suites: bookworm bookworm-updates bookworm-backports/";
    let mut missing = Vec::new();
    if !have("mmdebstrap") {
        missing.push("mmdebstrap");
    }
    if !have("qemu-system-x86_64") {
        missing.push("qemu-system-x86");
    }
    if !have("qemu-img") {
        missing.push("qemu-utils");
    }
    if !have("socat") {
        missing.push("socat");
    }
    if missing.is_empty() {
        return Ok(());
    }
    let cmd = format!(
        "sed -i -E '{SED}' {SOURCES} && apt-get update && apt-get install -y -t bookworm-backports {}",
        missing.join(" ")
    );
    if !have("apt-get") || !Path::new(SOURCES).exists() {
        bail!("missing {}; on Debian 12 install them (as root) with:\n    {cmd}", missing.join(", "));
    }
    step(&format!("vm: installing {} (QEMU from bookworm-backports)", missing.join(" ")));
    let text = std::fs::read_to_string(SOURCES)?;
    if !text.contains("bookworm-backports") {
        util::run(Command::new("sed").args(["-i", "-E", SED, SOURCES]))?;
        ensure!(
            std::fs::read_to_string(SOURCES)?.contains("bookworm-backports"),
            "{SOURCES} has no `Suites: bookworm bookworm-updates` line to add bookworm-backports to; run:\n    {cmd}"
        );
    }
    util::run(Command::new("apt-get").args(["-o", "DPkg::Lock::Timeout=300", "update", "-q"]))?;
    util::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["-o", "DPkg::Lock::Timeout=300", "install", "-y", "-q", "-t", "bookworm-backports"])
            .args(&missing),
    )?;
    Ok(())
}
