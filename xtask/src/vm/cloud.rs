//! The cloud kind of image ([`super::image::Kind::Cloud`]): how a cloud
//! image is obtained and provisioned for the matrix. Everything after the
//! first boot (the scenarios, the test shell, the report) is the same code
//! as for the images built here.
//!
//! - Obtained: `debian-12-genericcloud` is built here from Debian's archive
//!   ([`crate::cloudimg`]); a catalogue image (ci/distros.toml) is
//!   downloaded and verified by [`crate::catalogue::fetch`] and cached under
//!   `target/vm-images/`.
//! - Booted: by its own bootloader (no `-kernel`), a qcow2 overlay of the
//!   image, plus a NoCloud seed (vfat `cidata`, serial `CIDATA`).
//! - Provisioned by cloud-init at the first boot of each chain
//!   ([`user_data`]): the test shell on the virtio serial port (the same
//!   script as the built images), `mgmt.test` in /etc/hosts, the FILES disk
//!   mounted at /mnt/files; and in the chain that holds the `install`
//!   scenario, the agent's config and certificates written by cloud-init and
//!   our package installed from the FILES disk by the catalogue entry's
//!   `install` command (its exit code and output kept in /var/lib/vmtest/
//!   for the `install` scenario to judge).
use super::image::{Built, CloudSource, Image, Init, GUEST_SHELL, SHELL_UNIT};
use super::Env;
use crate::catalogue::Package;
use crate::cloudimg::{nocloud_seed, user_data, SeedFile};
use crate::util;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// What the cloud kind adds to a [`Built`].
#[derive(Clone, Debug)]
pub struct CloudBuilt {
    /// Format of the image file (`qcow2` or `raw`), for the overlay.
    pub format: String,
    /// The catalogue entry's `install` command.
    pub install: String,
    pub package: Package,
}

/// Where the cloud kind keeps its results of the install step, in the guest.
pub const INSTALL_RC: &str = "/var/lib/vmtest/install.rc";
pub const INSTALL_LOG: &str = "/var/lib/vmtest/install.log";

/// The image file of a cloud-kind image: built here or downloaded and
/// verified; the install command from its catalogue entry.
pub fn build(img: &Image, source: CloudSource, entry: &str) -> Result<Built> {
    let entries = crate::catalogue::load(&crate::catalogue::path())?;
    let e = entries
        .iter()
        .find(|e| e.name == entry)
        .with_context(|| format!("{}: no catalogue entry {entry:?} in ci/distros.toml", img.name))?;
    let (disk, from) = match source {
        CloudSource::Genericcloud => {
            (crate::cloudimg::build_genericcloud()?, "built here from Debian's archive".to_string())
        }
        CloudSource::Catalogue => {
            let cache = util::root().join("target/vm-images");
            (crate::catalogue::fetch(e, &cache)?, e.url.clone())
        }
    };
    let info = util::output(Command::new("qemu-img").args(["info", "--output=json"]).arg(&disk))?;
    let v: serde_json::Value = serde_json::from_str(&info).context("qemu-img info")?;
    let format = v["format"].as_str().unwrap_or("qcow2").to_string();
    Ok(Built {
        disk,
        kernel: PathBuf::new(),
        initrd: PathBuf::new(),
        append: String::new(),
        versions: vec![("image".into(), from)],
        cloud: Some(CloudBuilt { format, install: e.install.clone(), package: e.package }),
    })
}

/// The NoCloud seed of one chain, in `dir`: `install` says whether this
/// chain's first boot installs our package (the chain with the `install`
/// scenario) or only sets up the test shell (e.g. takeover-1.0.3, which
/// installs over an older agent itself).
pub fn seed(img: &Image, cloud: &CloudBuilt, env: &Env, dir: &Path, chain: &str, install: bool) -> Result<PathBuf> {
    let read = |p: PathBuf| std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()));
    let pki = env.run_dir.join("pki");
    let config = read(env.run_dir.join("files/config.json"))?;
    let (ca, cert, key) =
        (read(pki.join("ca.pem"))?, read(pki.join("agent-cert.pem"))?, read(pki.join("agent-key.pem"))?);
    let systemd = img.init == Init::Systemd;
    let mut files = vec![SeedFile { path: "/usr/local/sbin/vmtest-shell", mode: "0755", content: GUEST_SHELL }];
    if systemd {
        files.push(SeedFile { path: "/etc/systemd/system/vmtest-shell.service", mode: "0644", content: SHELL_UNIT });
    }
    if install {
        files.extend([
            SeedFile { path: "/etc/xcp-vm-agent/config.json", mode: "0600", content: &config },
            SeedFile { path: "/etc/xcp-vm-agent/pki/ca.pem", mode: "0644", content: &ca },
            SeedFile { path: "/etc/xcp-vm-agent/pki/agent-cert.pem", mode: "0644", content: &cert },
            SeedFile { path: "/etc/xcp-vm-agent/pki/agent-key.pem", mode: "0600", content: &key },
        ]);
        if systemd {
            // As the built images' install scenario does: after a reboot the
            // agent starts once /data is mounted (docs/vm-tests.md).
            files.push(SeedFile {
                path: "/etc/systemd/system/xcp-vm-agent.service.d/vmtest-order.conf",
                mode: "0644",
                content: "[Unit]\nAfter=data.mount\n",
            });
        }
    }
    let start_shell = if systemd {
        "systemctl daemon-reload && systemctl enable --now vmtest-shell.service".to_string()
    } else {
        // BusyBox init (Alpine) or sysvinit: respawned by init from now on.
        "if grep -q '^::' /etc/inittab; then echo '::respawn:/usr/local/sbin/vmtest-shell'; \
         else echo 'vt:2345:respawn:/usr/local/sbin/vmtest-shell'; fi >> /etc/inittab && kill -HUP 1"
            .to_string()
    };
    let install_cmd = if install {
        format!(
            "mkdir -p /var/lib/vmtest; ( {} ) > {INSTALL_LOG} 2>&1 < /dev/null; echo $? > {INSTALL_RC}",
            cloud.install
        )
    } else {
        String::new()
    };
    // Our package of the image's format on the FILES disk.
    let pkg = match cloud.package {
        Package::Deb => env.deb_name.clone(),
        p => super::pkg::file(p, &env.version),
    };
    let ud = user_data(
        &files,
        &format!("{} {}\n", super::qemu::GUEST_FWD_ADDR, super::SERVER_NAME),
        &[start_shell, "mkdir -p /mnt/files && mount -o ro LABEL=FILES /mnt/files".into(), install_cmd],
        "/mnt/files",
        &pkg,
    );
    std::fs::write(dir.join("user-data"), &ud)?;
    let path = dir.join("seed.img");
    nocloud_seed(&path, &format!("{}-{chain}", img.name), img.name, &ud)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::super::image::{Kind, IMAGES};

    #[test]
    fn every_cloud_row_installs_with_an_entry_of_the_catalogue() {
        let entries = crate::catalogue::load(&crate::catalogue::path()).unwrap();
        let rows: Vec<&str> = IMAGES
            .iter()
            .filter_map(|i| match i.kind {
                Kind::Cloud { entry, .. } => Some(entry),
                Kind::Built => None,
            })
            .collect();
        assert!(!rows.is_empty(), "no image of the cloud kind in the table");
        for entry in rows {
            assert!(entries.iter().any(|e| e.name == entry), "no catalogue entry {entry}");
        }
    }

    #[test]
    fn a_catalogue_name_is_an_image_of_the_cloud_kind() {
        let i = super::super::image::by_name("rocky-9", false).unwrap();
        assert!(matches!(i.kind, Kind::Cloud { entry: "rocky-9", .. }), "{:?}", i.kind);
        // A name both built here and in the catalogue: the built one unless asked.
        assert_eq!(super::super::image::by_name("debian-12", false).unwrap().kind, Kind::Built);
        assert!(matches!(super::super::image::by_name("debian-12", true).unwrap().kind, Kind::Cloud { .. }));
        assert!(super::super::image::by_name("no-such-image", false).is_err());
    }
}
