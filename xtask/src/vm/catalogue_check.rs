//! The cloud-image catalogue (`crate::catalogue`) checked against the VM
//! matrix: every entry valid for the scenario names here, every scenario an
//! entry does not skip applicable to its package format and init
//! ([`super::pkg::applicability`]), and the GitHub workflow; `cargo xtask
//! catalogue` and `vm-test --check-catalogue`. Here, under `vm`, because the
//! checks need the matrix's scenarios while the matrix reads the catalogue.
use crate::catalogue::{fetch, github_matrix, load, path, problems};
use anyhow::{bail, ensure, Context, Result};
use std::path::Path;

/// `--check-catalogue`: print each entry and fail with every problem.
pub fn check(scenarios: &[&str]) -> Result<()> {
    let p = path();
    let entries = load(&p)?;
    let probs = problems(&entries, scenarios);
    for e in &entries {
        let skips =
            if e.skip.is_empty() { String::new() } else { format!(", {} scenario(s) red by reason", e.skip.len()) };
        eprintln!("    {:<20} {:?} {:?} {}{skips}", e.name, e.package, e.init, e.root_layout);
        if !e.notes.is_empty() {
            eprintln!("    {:<20} {}", "", e.notes);
        }
    }
    ensure!(probs.is_empty(), "{}: {} problem(s):\n  {}", p.display(), probs.len(), probs.join("\n  "));
    // Scenario list applicable: the package and init commands of every
    // scenario an entry does not skip exist for its format and init, and
    // are POSIX sh (dash, BusyBox ash, shellcheck): super::pkg.
    let mut seen = std::collections::HashMap::new();
    let probs: Vec<String> = entries.iter().flat_map(|e| super::pkg::applicability(e, scenarios, &mut seen)).collect();
    ensure!(probs.is_empty(), "{}: scenarios not applicable:\n  {}", p.display(), probs.join("\n  "));
    eprintln!(
        "    {} entries, all valid; every scenario applicable ({} distinct package/init commands are POSIX sh)",
        entries.len(),
        seen.len()
    );
    Ok(())
}

/// The CI files' checks in `cargo xtask test`: the catalogue is valid, and
/// the GitHub workflow passes the GitHub workflow schema (check-jsonschema's
/// built-in copy, offline) while a broken copy of it does not, so the check
/// is known to bite.
pub fn ci_checks(scenarios: &[&str]) -> Result<()> {
    check(scenarios)?;
    let wf = crate::util::root().join("ci/github/vm-matrix.yml");
    let text = std::fs::read_to_string(&wf).with_context(|| format!("cannot read {}", wf.display()))?;
    ensure!(
        text.contains("cargo xtask vm-test --list --json") && text.contains("fromJSON(needs.build.outputs.matrix)"),
        "{}: the job matrix must be generated from the catalogue",
        wf.display()
    );
    let schema = |p: &Path| {
        std::process::Command::new("python3")
            .args(["-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows"])
            .arg(p)
            .output()
            .context("cannot run python3 -m check_jsonschema (cargo xtask setup installs it)")
    };
    let out = schema(&wf)?;
    ensure!(
        out.status.success(),
        "{} fails the GitHub workflow schema:\n{}{}",
        wf.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("    {}: valid GitHub workflow", wf.display());
    let broken = std::env::temp_dir().join(format!("vm-matrix-broken-{}.yml", std::process::id()));
    std::fs::write(&broken, text.replace("runs-on:", "runs_on:"))?;
    let out = schema(&broken);
    let _ = std::fs::remove_file(&broken);
    ensure!(!out?.status.success(), "check-jsonschema accepted a workflow with runs_on: the check proves nothing");
    eprintln!("    a copy with a misspelt key is refused");
    Ok(())
}

const HELP: &str = "\
cargo xtask catalogue [--check] [--json] [--fetch NAME]...

The cloud-image catalogue ci/distros.toml (docs/vm-tests.md, ci/README.md).
  --check        validate every entry offline: names, https URLs, checksum
                 forms, package format, init, install command, skipped
                 scenarios with reasons; and the workflow ci/github/vm-matrix.yml
                 against the GitHub workflow schema (the default)
  --json         print the GitHub Actions matrix generated from it
  --fetch NAME   download NAME's image and its checksum file into
                 target/vm-images/NAME/, verify it, print its path (needs
                 internet; a cached image that verifies is not fetched again)
";

pub fn run(args: &[String]) -> Result<()> {
    let mut json = false;
    let mut fetches = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-h" | "--help" => {
                print!("{HELP}");
                return Ok(());
            }
            "--check" => {}
            "--json" => json = true,
            "--fetch" => fetches.push(it.next().context("--fetch needs an image name")?.clone()),
            other => bail!("unknown option {other:?}\n\n{HELP}"),
        }
    }
    if json {
        let entries = load(&path())?;
        let probs = problems(&entries, &super::scenario_names());
        ensure!(probs.is_empty(), "the catalogue is not valid:\n  {}", probs.join("\n  "));
        println!("{}", github_matrix(&entries));
        return Ok(());
    }
    crate::util::step("catalogue: checking ci/distros.toml and ci/github/vm-matrix.yml");
    ci_checks(&super::scenario_names())?;
    let entries = load(&path())?;
    for name in fetches {
        let e =
            entries.iter().find(|e| e.name == name).with_context(|| format!("no image {name:?} in the catalogue"))?;
        let img = fetch(e, &crate::util::root().join("target/vm-images"))?;
        println!("{}", img.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::catalogue::{load, parse, path, problems};

    #[test]
    fn the_workspace_catalogue_is_valid() {
        let entries = load(&path()).unwrap();
        assert!(entries.len() >= 14, "{} entries", entries.len());
        let p = problems(&entries, &super::super::scenario_names());
        assert!(p.is_empty(), "{p:#?}");
        for want in ["ubuntu-20.04", "ubuntu-22.04", "ubuntu-24.04", "rocky-8", "rocky-9", "almalinux-8", "almalinux-9"]
        {
            assert!(entries.iter().any(|e| e.name == want), "{want} missing");
        }
        for prefix in ["debian-", "fedora-", "opensuse-leap-15.6", "alpine-"] {
            assert!(entries.iter().any(|e| e.name.starts_with(prefix)), "{prefix} missing");
        }
    }

    #[test]
    fn bad_entries_are_named_with_their_problem() {
        let text = r#"
[[image]]
name = "Ubuntu"
url = "http://example.invalid/a.qcow2"
sha256 = "abc"
checksum_url = "https://example.invalid/MD5SUMS"
package = "deb"
init = "systemd"
root_layout = "ext4"
user = "u"
install = "dnf install -y x"
skip = [{ scenario = "no-such", reason = "" }]

[[image]]
name = "alpine-3.23"
url = "https://example.invalid/a.qcow2"
sha512 = "00"
package = "apk"
init = "systemd"
root_layout = "ext4"
user = "alpine"
install = "apk add {pkg}"
"#;
        let p = problems(&parse(text).unwrap(), &super::super::scenario_names()).join("\n");
        for want in [
            "Ubuntu: name must be",
            "Ubuntu: url \"http://example.invalid/a.qcow2\" is not an https URL",
            "Ubuntu: give exactly one of",
            "Ubuntu: sha256 must be 64 hex digits",
            "MD5SUMS",
            "Ubuntu: install must install our package",
            "Ubuntu: install does not use a package tool",
            "unknown scenario \"no-such\"",
            "gives no reason",
            "alpine-3.23: sha512 must be 128 hex digits",
            "alpine-3.23: an apk image runs OpenRC",
        ] {
            assert!(p.contains(want), "missing {want:?} in:\n{p}");
        }
        // Unknown keys are refused, not ignored.
        let err = parse("[[image]]\nname = \"x-1\"\nbogus = 1\n").unwrap_err();
        assert!(format!("{err:#}").contains("bogus"), "{err:#}");
    }
}
