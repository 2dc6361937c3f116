//! What the guest runs that depends on the image's package format (the
//! catalogue's `package`: deb, rpm, apk): installing, upgrading,
//! downgrading and purging our package from the FILES disk, and reading what
//! is installed. The init system's commands (service running, enabled,
//! gone, restart) are [`super::image::Init`]'s. The scenarios take both from
//! here as data, so the same scenario runs on Debian, RHEL-family, openSUSE
//! and Alpine images.
//!
//! The low-level tool of each format is used (dpkg, rpm, apk): it is there on
//! every image of the format, whichever front end (apt, dnf, zypper) the
//! image has, and needs no network. Every command is POSIX sh that also runs
//! under BusyBox ash (checked by the tests below with `dash -n`,
//! `busybox sh -n` and `shellcheck -s sh`), with stdin closed (as fleets
//! install: no prompt may wait) and stderr merged into stdout.
use crate::catalogue::Package;

/// Our package's name in every format.
pub const NAME: &str = "xcp-vm-agent";

/// Where the FILES disk is mounted in the guest.
pub const FILES: &str = "/mnt/files";

/// The file name of our package of `version` in format `p` (as `cargo xtask
/// dist` names it; the FILES disk carries them).
pub fn file(p: Package, version: &str) -> String {
    match p {
        Package::Deb => crate::pkgmeta::deb_name(version),
        Package::Rpm => crate::pkgmeta::rpm_name(version),
        Package::Apk => crate::pkgmeta::apk_name(version),
    }
}

/// Install our package file `name` from the FILES disk, or upgrade to it.
pub fn install(p: Package, name: &str) -> String {
    let f = format!("{FILES}/{name}");
    match p {
        Package::Deb => format!("DEBIAN_FRONTEND=noninteractive dpkg -i {f} </dev/null 2>&1"),
        Package::Rpm => format!("rpm -U --replacepkgs {f} </dev/null 2>&1"),
        // The bare .apk of `cargo xtask dist` is unsigned (the repository's
        // copy is signed by `cargo xtask repo`).
        Package::Apk => format!("apk add --allow-untrusted --no-network {f} </dev/null 2>&1"),
    }
}

/// Go back to the older package file `name` (a downgrade) from the FILES disk.
pub fn downgrade(p: Package, name: &str) -> String {
    let f = format!("{FILES}/{name}");
    match p {
        Package::Deb => install(p, name),
        Package::Rpm => format!("rpm -U --oldpackage --replacepkgs {f} </dev/null 2>&1"),
        // `apk add FILE` pins the world to that file's package, older or not.
        Package::Apk => format!("apk add --allow-untrusted --no-network {f} </dev/null 2>&1"),
    }
}

/// Remove our package with its configuration (what the package manager
/// offers: dpkg purges; rpm and apk keep changed configuration files).
pub fn purge(p: Package) -> String {
    match p {
        Package::Deb => format!("DEBIAN_FRONTEND=noninteractive dpkg --purge {NAME} </dev/null 2>&1"),
        Package::Rpm => format!("rpm -e {NAME} </dev/null 2>&1"),
        Package::Apk => format!("apk del --no-network {NAME} </dev/null 2>&1"),
    }
}

/// Prints the installed version of our package and exits 0 only when it is
/// cleanly installed: dpkg's state `ii` (not half-configured), one rpm of
/// it (a failed upgrade can leave two), an apk in the world.
pub fn installed_version(p: Package) -> String {
    match p {
        Package::Deb => format!(
            "s=$(dpkg-query -W -f '${{db:Status-Abbrev}}' {NAME}) && [ \"$s\" = 'ii ' ] || \
             {{ echo \"dpkg state: $s\"; exit 1; }}; dpkg-query -W -f '${{Version}}' {NAME}"
        ),
        Package::Rpm => format!(
            "n=$(rpm -q {NAME} | wc -l) && [ \"$n\" -eq 1 ] || {{ rpm -q {NAME}; exit 1; }}; \
             rpm -q --qf '%{{VERSION}}' {NAME}"
        ),
        Package::Apk => format!(
            "v=$(apk info -e -v {NAME}) && [ -n \"$v\" ] || exit 1; \
             printf '%s\\n' \"$v\" | sed 's/^{NAME}-//; s/-r[0-9]*$//'"
        ),
    }
}

/// Exits 0 when the package manager no longer knows our package.
pub fn not_installed(p: Package) -> String {
    match p {
        Package::Deb => format!(
            "s=$(dpkg-query -W -f '${{Status}}' {NAME} 2>/dev/null); \
             case \"$s\" in ''|*not-installed*) ;; *) echo \"dpkg still lists it: $s\"; exit 1;; esac"
        ),
        Package::Rpm => format!("! rpm -q {NAME}"),
        Package::Apk => format!("! apk info -e {NAME}"),
    }
}

/// Where the package leaves its default config when a config it does not
/// own (the Python agent 1.0.3's) is in place: docs/packaging.md. `None`:
/// nothing is written beside it (the .deb ships no conffile for it).
pub fn new_config_beside(p: Package) -> Option<&'static str> {
    match p {
        Package::Deb => None,
        Package::Rpm => Some("/etc/xcp-vm-agent/config.json.rpmnew"),
        Package::Apk => Some("/etc/xcp-vm-agent/config.json.apk-new"),
    }
}

/// The line of the package tool's output that says what it did (for the
/// cell's message).
pub fn summary(p: Package, out: &str) -> String {
    let pick = match p {
        Package::Deb => out.lines().find(|l| l.starts_with("Setting up")),
        Package::Rpm | Package::Apk => out.lines().rev().find(|l| !l.trim().is_empty()),
    };
    pick.unwrap_or("").trim().to_string()
}

/// Prints `key=value` lines, the versions of the tools the report lists
/// (the keys of an image built here: kernel, growpart, e2fsprogs, xfsprogs,
/// util-linux, lvm2, init, openrc), read in a booted guest from the tools
/// themselves, and for growpart (which has no `--version`) from the package
/// that owns it: how a cloud image, built elsewhere, gets its column of the
/// report. A tool that is missing prints nothing.
pub fn tool_versions(p: Package) -> String {
    let owner = match p {
        Package::Deb => "dpkg-query -W -f '${Version}' \"$(dpkg-query -S \"$g\" | sed 's/:.*//')\"",
        Package::Rpm => "rpm -qf --qf '%{VERSION}-%{RELEASE}' \"$g\"",
        Package::Apk => "apk info -W \"$g\" | sed 's/.* is owned by //'",
    };
    format!(
        "echo \"kernel=$(uname -r)\"; \
         g=$(command -v growpart) && echo \"growpart=$({owner} 2>/dev/null)\"; \
         command -v mke2fs >/dev/null && echo \"e2fsprogs=$(mke2fs -V 2>&1 | sed -n '1s/^mke2fs \\([^ ]*\\).*/\\1/p')\"; \
         command -v xfs_growfs >/dev/null && echo \"xfsprogs=$(xfs_growfs -V 2>&1 | sed -n '1s/.* //p')\"; \
         command -v findmnt >/dev/null && echo \"util-linux=$(findmnt -V 2>&1 | sed -n '1s/.* //p')\"; \
         command -v lvm >/dev/null && echo \"lvm2=$(lvm version 2>/dev/null | sed -n 's/^ *LVM version: *\\([^ ]*\\).*/\\1/p')\"; \
         command -v systemctl >/dev/null && echo \"init=$(systemctl --version | sed -n '1s/^systemd [0-9]* (\\(.*\\))/\\1/p')\"; \
         command -v openrc >/dev/null && echo \"openrc=$(openrc --version | sed -n '1s/^openrc (OpenRC) \\([^ ]*\\).*/\\1/p')\"; \
         true"
    )
}

/// The `key=value` lines of [`tool_versions`], empty values dropped.
pub fn parse_versions(out: &str) -> Vec<(String, String)> {
    out.lines()
        .filter_map(|l| l.trim().split_once('='))
        .filter(|(k, v)| !k.is_empty() && !v.trim().is_empty())
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

#[cfg(test)]
/// Every package-format command of `p` (the test and `--check-catalogue`
/// check each of them).
pub fn all(p: Package) -> Vec<(&'static str, String)> {
    let mut v = vec![
        ("install", install(p, &file(p, "1.2.3"))),
        ("downgrade", downgrade(p, &file(p, "1.2.3"))),
        ("purge", purge(p)),
        ("installed_version", installed_version(p)),
        ("not_installed", not_installed(p)),
        ("tool_versions", tool_versions(p)),
    ];
    if let Some(f) = new_config_beside(p) {
        v.push(("new_config_beside", format!("[ -f {f} ]")));
    }
    v
}

/// A guest command a scenario runs that depends on the package format or
/// the init system.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Install,
    Downgrade,
    Purge,
    Version,
    NotInstalled,
    NewConfigBeside,
    Running,
    Enabled,
    Gone,
    Pid,
    Restart,
    BootFinished,
}

/// What every scenario runs: the boot (waiting for the init system), and
/// the agent's service running, with its pid.
const BASE: &[Op] = &[Op::BootFinished, Op::Running, Op::Pid];

/// The package and init commands each scenario runs beyond [`BASE`]
/// (scenarios not listed run [`BASE`] only). `vm-test --check-catalogue`
/// checks, per catalogue entry, that every scenario it does not skip has
/// each of these commands for the entry's format and init, valid POSIX sh.
pub const SCENARIO_OPS: &[(&str, &[Op])] = &[
    ("install", &[Op::Install, Op::Version, Op::Enabled, Op::Restart]),
    ("freeze-deadline", &[Op::Restart]),
    ("restart-during-job", &[Op::Restart]),
    ("upgrade-from-script", &[Op::Install, Op::Downgrade, Op::Version]),
    ("upgrade", &[Op::Install, Op::Version]),
    ("remove", &[Op::Purge, Op::Gone, Op::NotInstalled]),
    ("takeover-1.0.3", &[Op::Install, Op::NewConfigBeside]),
];

/// The ops of `scenario`: [`BASE`] and its row of [`SCENARIO_OPS`].
pub fn ops(scenario: &str) -> Vec<Op> {
    let extra = SCENARIO_OPS.iter().find(|(n, _)| *n == scenario).map_or(&[][..], |(_, o)| *o);
    BASE.iter().chain(extra).copied().collect()
}

/// The guest command of `op` on an image of format `p` and init `init`;
/// `Ok(None)` where the op has nothing to run there (no config beside the
/// kept one for a .deb), `Err` where it has no command for this combination.
pub fn command(op: Op, p: Package, init: super::image::Init) -> Result<Option<String>, String> {
    let f = file(p, "1.2.3");
    Ok(Some(match op {
        Op::Install => install(p, &f),
        Op::Downgrade => downgrade(p, &f),
        Op::Purge => purge(p),
        Op::Version => installed_version(p),
        Op::NotInstalled => not_installed(p),
        Op::NewConfigBeside => match new_config_beside(p) {
            Some(f) => format!("[ -f {f} ]"),
            None => return Ok(None),
        },
        Op::Running => init.service_running().into(),
        Op::Enabled => init.service_enabled().into(),
        Op::Gone => init.service_gone().into(),
        Op::Pid => init.service_pid().into(),
        Op::Restart => init.service_restart().into(),
        Op::BootFinished => init.boot_finished().into(),
    }))
}

/// The init system of a catalogue entry, as the matrix names it.
pub fn init_of(i: crate::catalogue::Init) -> super::image::Init {
    match i {
        crate::catalogue::Init::Systemd => super::image::Init::Systemd,
        crate::catalogue::Init::Openrc => super::image::Init::Openrc,
        crate::catalogue::Init::Sysv => super::image::Init::Sysvinit,
    }
}

/// "Scenario list applicable" for one catalogue entry: every scenario of
/// `scenarios` that `e` does not skip has each of its package and init
/// commands for `e`'s format and init, and each is POSIX sh (dash, BusyBox
/// ash, shellcheck); the entry's `install` command too. `checked` caches
/// the verdict per command across entries. Problems name the entry.
pub fn applicability(
    e: &crate::catalogue::Entry,
    scenarios: &[&str],
    checked: &mut std::collections::HashMap<String, Vec<String>>,
) -> Vec<String> {
    let init = init_of(e.init);
    let mut out = Vec::new();
    let mut verdict = |cmd: &str| checked.entry(cmd.to_string()).or_insert_with(|| posix_problems(cmd)).clone();
    for s in scenarios {
        if e.skip.iter().any(|k| k.scenario == *s) {
            continue;
        }
        for op in ops(s) {
            match command(op, e.package, init) {
                Err(m) => out.push(format!("{}: scenario {s} needs {op:?}: {m}", e.name)),
                Ok(None) => {}
                Ok(Some(cmd)) => {
                    for prob in verdict(&cmd) {
                        out.push(format!("{}: scenario {s}, {op:?} `{cmd}`: {prob}", e.name));
                    }
                }
            }
        }
    }
    let install =
        e.install.replace("{pkg}", "/mnt/files/x").replace("{tools}", "/mnt/files").replace("{keys}", "/mnt/files");
    for prob in verdict(&install) {
        out.push(format!("{}: install `{}`: {prob}", e.name, e.install));
    }
    out.sort();
    out.dedup();
    out
}

/// The shells a guest command must parse in, and how to ask each for a
/// syntax check of a script given as its argument (`-n`: read, not run).
pub const SHELLS: &[(&str, &[&str])] = &[("dash", &["dash", "-n", "-c"]), ("busybox", &["busybox", "sh", "-n", "-c"])];

/// Problems of `script` as POSIX sh: a syntax error under dash or BusyBox
/// ash, or a non-POSIX construct shellcheck finds (its SC3xxx checks:
/// arrays, `[[`, `==` in `[`, `$'..'`, `echo -e`, process substitution...).
/// Tools that are absent count as a problem: the check must not pass by
/// not running.
pub fn posix_problems(script: &str) -> Vec<String> {
    use std::process::{Command, Stdio};
    let mut out = Vec::new();
    for (name, argv) in SHELLS {
        match Command::new(argv[0]).args(&argv[1..]).arg(script).stdin(Stdio::null()).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => out.push(format!("{name} -n: {}", String::from_utf8_lossy(&o.stderr).trim())),
            Err(e) => out.push(format!("cannot run {name}: {e} (cargo xtask setup installs it)")),
        }
    }
    let sc = Command::new("shellcheck")
        .args(["-s", "sh", "-f", "gcc", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(script.as_bytes())?;
            c.wait_with_output()
        });
    match sc {
        Ok(o) => {
            let text = String::from_utf8_lossy(&o.stdout);
            // SC3xxx: "In POSIX sh, ... is undefined/not supported".
            for l in text.lines().filter(|l| l.contains("[SC3")) {
                out.push(format!("shellcheck: {l}"));
            }
        }
        Err(e) => out.push(format!("cannot run shellcheck: {e}")),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORMATS: [Package; 3] = [Package::Deb, Package::Rpm, Package::Apk];

    #[test]
    fn every_command_of_every_format_is_posix_sh() {
        let mut bad = Vec::new();
        for p in FORMATS {
            for (what, cmd) in all(p) {
                for prob in posix_problems(&cmd) {
                    bad.push(format!("{p:?} {what}: {prob}\n    {cmd}"));
                }
            }
        }
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    }

    /// Every other script the guest runs that is not a scenario's own:
    /// the test shell itself and each init system's commands.
    #[test]
    fn the_test_shell_and_the_init_commands_are_posix_sh() {
        use super::super::image::{Init, GUEST_SHELL};
        let mut bad: Vec<String> =
            posix_problems(GUEST_SHELL).into_iter().map(|p| format!("test shell: {p}")).collect();
        let needs_bash = GUEST_SHELL.lines().any(|l| !l.trim_start().starts_with('#') && l.contains("bash"));
        assert!(GUEST_SHELL.starts_with("#!/bin/sh\n") && !needs_bash, "the test shell needs bash");
        for init in [Init::Systemd, Init::Sysvinit, Init::Openrc] {
            for (what, cmd) in init.commands() {
                for prob in posix_problems(cmd) {
                    bad.push(format!("{init:?} {what}: {prob}\n    {cmd}"));
                }
            }
        }
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    }

    #[test]
    fn every_catalogue_entry_can_run_its_scenarios() {
        let entries = crate::catalogue::load(&crate::catalogue::path()).unwrap();
        let mut seen = std::collections::HashMap::new();
        let names = crate::vm::scenario_names();
        for row in SCENARIO_OPS {
            assert!(names.contains(&row.0), "SCENARIO_OPS names an unknown scenario {}", row.0);
        }
        let bad: Vec<String> = entries.iter().flat_map(|e| applicability(e, &names, &mut seen)).collect();
        assert!(bad.is_empty(), "{}", bad.join("\n"));
        // Each format and init of the catalogue was checked.
        assert!(seen.keys().any(|c| c.contains("apk del")) && seen.keys().any(|c| c.contains("rpm -e")));
        assert!(seen.keys().any(|c| c.contains("rc-service")));
    }

    #[test]
    fn an_entry_whose_install_is_not_posix_is_not_applicable() {
        let mut e = crate::catalogue::load(&crate::catalogue::path()).unwrap().remove(0);
        e.install = "[[ -e {pkg} ]] && apt-get install -y {pkg}".into();
        let p = applicability(&e, &["install"], &mut Default::default());
        assert!(p.iter().any(|m| m.contains("install `") && m.contains("SC3010")), "{p:?}");
    }

    #[test]
    fn the_posix_check_bites() {
        // A syntax error (dash and BusyBox) and bash-isms that parse as
        // commands in POSIX sh (shellcheck) are refused.
        assert!(!posix_problems("if true; then echo x").is_empty());
        assert!(!posix_problems("a=(1 2); echo \"${a[1]}\"").is_empty());
        assert!(posix_problems("[[ -e /x ]] && echo y").iter().any(|p| p.contains("SC3010")));
        assert!(posix_problems("echo ok").is_empty());
    }

    #[test]
    fn each_format_uses_its_own_tool() {
        for (p, tool) in [(Package::Deb, "dpkg"), (Package::Rpm, "rpm"), (Package::Apk, "apk")] {
            for (what, cmd) in all(p) {
                if what != "new_config_beside" {
                    assert!(cmd.contains(tool), "{p:?} {what} does not use {tool}: {cmd}");
                }
                for other in ["dpkg", "rpm -", "apk "] {
                    if !other.starts_with(tool) {
                        assert!(!cmd.contains(other), "{p:?} {what} uses {other}: {cmd}");
                    }
                }
            }
        }
        let (cmds, v) = (|p| all(p).into_iter().map(|x| x.1).collect::<Vec<_>>().join("\n"), "1.2.3");
        assert!(
            cmds(Package::Apk).contains("--no-network /mnt/files/xcp-vm-agent-1.2.3-r0.apk"),
            "{}",
            file(Package::Apk, v)
        );
        assert!(cmds(Package::Rpm).contains("--oldpackage --replacepkgs /mnt/files/xcp-vm-agent-1.2.3-1.x86_64.rpm"));
        assert!(cmds(Package::Deb).contains("dpkg -i /mnt/files/xcp-vm-agent_1.2.3_amd64.deb"));
    }

    /// The version and state readers, run for real on this machine's dpkg
    /// (Debian) against a package that is installed and one that is not.
    #[test]
    fn the_deb_readers_work_on_a_real_dpkg() {
        if !crate::util::have("dpkg-query") {
            return;
        }
        let run = |s: String| {
            let o = std::process::Command::new("dash").arg("-c").arg(s).output().unwrap();
            (o.status.success(), String::from_utf8_lossy(&o.stdout).to_string())
        };
        let with = |s: String, name: &str| s.replace(NAME, name);
        let (ok, v) = run(with(installed_version(Package::Deb), "dpkg"));
        assert!(ok && !v.trim().is_empty() && v.chars().next().unwrap().is_ascii_digit(), "{v:?}");
        assert!(!run(with(not_installed(Package::Deb), "dpkg")).0, "dpkg is installed");
        assert!(!run(with(installed_version(Package::Deb), "no-such-package-here")).0);
        assert!(run(with(not_installed(Package::Deb), "no-such-package-here")).0);
    }

    /// The tool-version probe, run for real on this machine (Debian): the
    /// report's keys with the versions this machine's tools print.
    #[test]
    fn the_version_probe_reads_this_machine() {
        let o = std::process::Command::new("dash").arg("-c").arg(tool_versions(Package::Deb)).output().unwrap();
        assert!(o.status.success());
        let v = parse_versions(&String::from_utf8_lossy(&o.stdout));
        let get = |k: &str| v.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone()).unwrap_or_default();
        assert!(!get("kernel").is_empty(), "{v:?}");
        assert!(get("growpart").starts_with("0."), "{v:?}");
        assert!(get("e2fsprogs").starts_with("1."), "{v:?}");
        assert!(get("util-linux").starts_with("2."), "{v:?}");
        assert!(get("xfsprogs").chars().next().is_some_and(|c| c.is_ascii_digit()), "{v:?}");
    }
}
