//! `cargo xtask`: the project's build, test, demo, bench and packaging tasks.
//!
//! `main` only parses the task name and dispatches to one file per task.
mod apk;
mod apkcheck;
mod bench;
mod bench_disk;
mod bench_guest;
mod catalogue;
mod clidef;
mod cloudimg;
mod demo;
mod dist;
mod fuzz;
mod mutants;
mod offlinetest;
mod pkgmeta;
mod pkgtest;
mod repo;
mod repotest;
mod setup;
mod test;
mod util;
mod vm;

use anyhow::Result;

const HELP: &str = "\
cargo xtask TASK [ARGS]

Tasks:
  test     install what is missing, then run every test tier (unit, integration,
           root-only loop-device tier, packaging checks)
  demo     build, start mgmt-server on loopback with a fresh PKI, run the agent
           against it and show jobs coming back
  bench    measure binary size, idle RSS, CPU per check-in, job pickup latency
           and disk-operation overhead; writes target/bench/results.json
  dist     build the static binary and .deb, .rpm, .apk and .tar.gz into target/dist
  repo     signed apt, rpm-md and apk repositories from the dist artifacts
           (--out DIR --base-url URL [--key FILE --apk-key FILE])
  fuzz     run the cargo-fuzz targets (job, fstab, http_response, xenstore_reply,
           config) for --seconds N each (docs/fuzzing.md)
  mutants  mutation testing (cargo-mutants) of the agent's pure core modules;
           `--file PATH` for one file; writes target/mutants/summary.md
  pkgtest  the packaging tier of `test` alone (--takeover-only: only the checks of
           installing over the Python agent 1.0.3; root)
  setup    install the system packages and Rust targets the tasks need
  offline-test  install.sh --root / --image and uninstall.sh --root into Debian trees
           and disk images, links compared with systemctl, update-rc.d, rc-update (root)
  vm-test  the VM matrix: every scenario on booted images (QEMU) with the packaged
           agent: the Debian images built here, debian-12-genericcloud and the
           catalogue's cloud images; report in target/vm-report (root; part of test)
  catalogue  the cloud-image catalogue ci/distros.toml: --check, --json (the CI
           matrix), --fetch NAME (download and verify into target/vm-images)
  vm-cloud alias: vm-test --image debian-12-genericcloud (own bootloader,
           NoCloud seed, cloud-init installs the package)
  help     this text; `cargo xtask TASK --help` for a task's options
";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let task = args.first().map(String::as_str).unwrap_or("help");
    let rest = if args.is_empty() { &[][..] } else { &args[1..] };
    let r: Result<()> = match task {
        "test" => test::run(rest),
        "setup" => setup::run(rest),
        "fuzz" => fuzz::run(rest),
        "demo" => demo::run(rest),
        // `dist --check` is the packaging tier: dispatched here, so that
        // `dist` (which pkgtest calls) never calls pkgtest.
        "dist" if rest.first().map(String::as_str) == Some("--check") => pkgtest::run(&rest[1..]),
        "dist" => dist::run(rest),
        // `repo --check` (the signed-repositories tier) likewise: repotest
        // uses repo, repo never calls repotest.
        "repo" if rest.first().map(String::as_str) == Some("--check") => repotest::run(),
        "repo" => repo::run(rest),
        "bench" => bench::run(rest),
        "mutants" => mutants::run(rest),
        "vm-test" => vm::run(rest),
        "catalogue" => vm::catalogue_check::run(rest),
        "offline-test" => offlinetest::run(rest),
        // vm-cloud is vm-test with the cloud image: vm uses cloudimg's
        // builders, cloudimg never calls vm.
        "vm-cloud" => cloudimg::vm_args(rest).map_or(Ok(()), |v| vm::run(&v)),
        "pkgtest" => pkgtest::run(rest),
        "help" | "--help" | "-h" => {
            print!("{HELP}");
            Ok(())
        }
        other => {
            eprint!("unknown task {other:?}\n\n{HELP}");
            std::process::exit(2);
        }
    };
    if let Err(e) = r {
        eprintln!("xtask {task}: error: {e:#}");
        std::process::exit(1);
    }
}
