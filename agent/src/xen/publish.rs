//! Guest-tools reporting: the xenstore keys XAPI reads to show the guest's
//! tools version, OS, memory and IP addresses, and the NotUpgradable flag.
//!
//! The daemon calls [`Publisher::tick`] on every check-in (at least every
//! 60 s). Each tick works out the values every key should have, writes only
//! those that differ from what this publisher last wrote, removes keys that
//! no longer apply (a VIF's vanished address, NotUpgradable once
//! `/etc/pv-drivers-not-upgradable` is gone) and, if anything changed, writes
//! `data/updated` so XAPI rereads them. Memory figures are refreshed every
//! 60 s; everything is rewritten every 10 minutes and whenever the domain id
//! changes (resume, migration), because the toolstack may have dropped them.
//!
//! `xenstore_publish`: `never` publishes nothing; `always` publishes; `auto`
//! publishes unless xe-daemon or xen-guest-agent is running, so two agents
//! never fight over the same keys. Every key is listed in `docs/xen.md`; add
//! a key there when adding it here.
use super::xenstore::{Client, XsError};
use crate::config::{Config, XenPublish};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// Processes whose presence makes `auto` mode stay silent.
pub const OTHER_AGENTS: [&str; 2] = ["xe-daemon", "xen-guest-agent"];
/// How often memory figures are refreshed.
pub const MEMINFO_INTERVAL: Duration = Duration::from_secs(60);
/// How often everything is rewritten regardless of the cache.
pub const FULL_REFRESH_INTERVAL: Duration = Duration::from_secs(600);

/// Files the publisher reads; tests point them into a scratch tree.
#[derive(Debug, Clone)]
pub struct PublishPaths {
    /// `/proc`: `meminfo` and `*/comm` (other guest agents).
    pub proc_root: PathBuf,
    /// `/etc/os-release` (`/etc/debian_version` next to it is read for the minor version).
    pub os_release: PathBuf,
    /// `/etc/pv-drivers-not-upgradable`.
    pub not_upgradable_file: PathBuf,
}

impl Default for PublishPaths {
    fn default() -> Self {
        PublishPaths {
            proc_root: "/proc".into(),
            os_release: "/etc/os-release".into(),
            not_upgradable_file: "/etc/pv-drivers-not-upgradable".into(),
        }
    }
}

/// A network interface as far as VIF matching needs it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    /// Lower-case `aa:bb:cc:dd:ee:ff`.
    pub mac: Option<String>,
    pub ipv4: Vec<Ipv4Addr>,
    pub ipv6: Vec<Ipv6Addr>,
}

/// What the last tick did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// `xenstore_publish` is `never`.
    Disabled,
    /// `auto` and another guest agent is running (its process name).
    OtherAgent(String),
    /// No xenstore here (not a Xen guest).
    NoXenstore,
    /// Keys were written or removed.
    Published { written: usize, removed: usize },
    /// Everything was already up to date.
    Unchanged,
    /// xenstore failed; retried on the next tick.
    Failed(String),
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Status::Disabled => write!(f, "xenstore publishing disabled (xenstore_publish = never)"),
            Status::OtherAgent(a) => write!(f, "not publishing to xenstore: {a} is running (xenstore_publish = auto)"),
            Status::NoXenstore => write!(f, "not publishing to xenstore: not a Xen guest"),
            Status::Published { written, removed } => {
                write!(f, "published guest information to xenstore ({written} keys written, {removed} removed)")
            }
            Status::Unchanged => write!(f, "xenstore guest information unchanged"),
            Status::Failed(e) => write!(f, "publishing to xenstore failed: {e}"),
        }
    }
}

type Connector = Box<dyn FnMut() -> Result<Client, XsError> + Send>;
type NetworkSource = Box<dyn FnMut() -> Vec<Interface> + Send>;

/// Keeps the guest-tools keys up to date; one per daemon.
pub struct Publisher {
    paths: PublishPaths,
    connect: Connector,
    network: NetworkSource,
    client: Option<Client>,
    /// key → value as last written by us.
    written: BTreeMap<String, String>,
    last_meminfo: Option<Instant>,
    last_full: Option<Instant>,
    domain: Option<String>,
    status: Option<Status>,
}

impl Default for Publisher {
    fn default() -> Self {
        Publisher::new()
    }
}

impl Publisher {
    /// The real thing: `/proc`, `/etc`, the network via getifaddrs, xenstore
    /// via [`Client::open`].
    pub fn new() -> Publisher {
        Publisher::with_paths(PublishPaths::default())
    }

    pub fn with_paths(paths: PublishPaths) -> Publisher {
        Publisher {
            paths,
            connect: Box::new(Client::open),
            network: Box::new(interfaces),
            client: None,
            written: BTreeMap::new(),
            last_meminfo: None,
            last_full: None,
            domain: None,
            status: None,
        }
    }

    /// Connect some other way (tests: a socket without touching the environment).
    pub fn with_connector(mut self, f: impl FnMut() -> Result<Client, XsError> + Send + 'static) -> Publisher {
        self.connect = Box::new(f);
        self
    }

    /// Take interfaces from elsewhere (tests: MACs that match a fixture's VIFs).
    pub fn with_network(mut self, f: impl FnMut() -> Vec<Interface> + Send + 'static) -> Publisher {
        self.network = Box::new(f);
        self
    }

    /// What this publisher believes is in xenstore (key → value).
    pub fn written(&self) -> &BTreeMap<String, String> {
        &self.written
    }

    /// One round; never fails (a failure is a [`Status::Failed`], retried
    /// next tick). Logs when the status changes kind.
    pub fn tick(&mut self, cfg: &Config) -> Status {
        self.tick_at(cfg, Instant::now())
    }

    /// [`Publisher::tick`] at a given time (tests drive the 60 s clock).
    pub fn tick_at(&mut self, cfg: &Config, now: Instant) -> Status {
        let status = self.run(cfg, now);
        let changed = match (&self.status, &status) {
            (Some(a), b) => std::mem::discriminant(a) != std::mem::discriminant(b) || matches!(b, Status::Failed(_)),
            (None, _) => true,
        };
        if changed {
            match &status {
                Status::Failed(_) => tracing::warn!("{status}"),
                Status::Unchanged => {}
                _ => tracing::info!("{status}"),
            }
        }
        self.status = Some(status.clone());
        status
    }

    fn run(&mut self, cfg: &Config, now: Instant) -> Status {
        match cfg.xenstore_publish {
            XenPublish::Never => return Status::Disabled,
            XenPublish::Auto => {
                if let Some(agent) = other_agent(&self.paths.proc_root) {
                    // The other agent owns the keys now; start afresh if it goes away.
                    self.forget();
                    return Status::OtherAgent(agent);
                }
            }
            XenPublish::Always => {}
        }
        if self.client.is_none() {
            match (self.connect)() {
                Ok(c) => self.client = Some(c),
                Err(XsError::NotAvailable { .. }) => return Status::NoXenstore,
                Err(e) => return Status::Failed(e.to_string()),
            }
            self.forget();
        }
        match self.publish(cfg, now) {
            Ok(s) => s,
            Err(e) => {
                if e.is_fatal() {
                    self.client = None;
                }
                Status::Failed(e.to_string())
            }
        }
    }

    /// Forget what was written, so the next tick rewrites and cleans up everything.
    fn forget(&mut self) {
        self.written.clear();
        self.last_full = None;
        self.last_meminfo = None;
    }

    fn publish(&mut self, cfg: &Config, now: Instant) -> Result<Status, XsError> {
        let client = self.client.as_mut().expect("connected");
        // A new domain id (resume, migration) means a fresh xenstore area.
        let domain = format!(
            "{}/{}",
            client.read_opt("domid")?.unwrap_or_default(),
            client.read_opt("unique-domain-id")?.unwrap_or_default()
        );
        if self.domain.as_ref() != Some(&domain) {
            self.domain = Some(domain);
            self.written.clear();
            self.last_full = None;
            self.last_meminfo = None;
        }
        let full = self.last_full.is_none_or(|t| now.duration_since(t) >= FULL_REFRESH_INTERVAL);
        if full {
            self.written.clear();
            self.last_full = Some(now);
        }

        let mut want = BTreeMap::new();
        tools_keys(&mut want);
        os_keys(&self.paths.os_release, &mut want);
        if self.last_meminfo.is_none_or(|t| now.duration_since(t) >= MEMINFO_INTERVAL) {
            if meminfo_keys(&self.paths.proc_root, &mut want) {
                self.last_meminfo = Some(now);
            }
        } else {
            for k in ["data/meminfo_free", "data/meminfo_total"] {
                if let Some(v) = self.written.get(k) {
                    want.insert(k.to_string(), v.clone());
                }
            }
        }
        let vif_ids = client.directory_opt("device/vif")?;
        let ifaces = (self.network)();
        for id in &vif_ids {
            let Some(mac) = client.read_opt(&format!("device/vif/{id}/mac"))? else { continue };
            let mac = mac.trim().to_ascii_lowercase();
            let (v4, v6) = addresses_for_mac(&ifaces, &mac);
            for (n, a) in v4.iter().enumerate() {
                want.insert(format!("attr/vif/{id}/ipv4/{n}"), a.to_string());
            }
            for (n, a) in v6.iter().enumerate() {
                want.insert(format!("attr/vif/{id}/ipv6/{n}"), a.to_string());
            }
        }
        let flag = cfg.not_upgradable_key.trim_matches('/').to_string();
        if self.paths.not_upgradable_file.exists() {
            want.insert(flag.clone(), "1".into());
        }

        let mut written = 0;
        let mut removed = 0;
        // Removals: what we wrote before and no longer want; on a full round
        // also leftovers from an earlier run or another agent.
        let mut stale: BTreeSet<String> = self.written.keys().filter(|k| !want.contains_key(*k)).cloned().collect();
        if full {
            if !want.contains_key(&flag) && client.read_opt(&flag)?.is_some() {
                stale.insert(flag.clone());
            }
            let mut ids: BTreeSet<String> = vif_ids.iter().cloned().collect();
            ids.extend(client.directory_opt("attr/vif")?);
            for id in ids {
                for fam in ["ipv4", "ipv6"] {
                    let dir = format!("attr/vif/{id}/{fam}");
                    for n in client.directory_opt(&dir)? {
                        let k = format!("{dir}/{n}");
                        if !want.contains_key(&k) {
                            stale.insert(k);
                        }
                    }
                }
            }
        }
        for k in stale {
            client.rm_if_present(&k)?;
            self.written.remove(&k);
            removed += 1;
        }
        for (k, v) in &want {
            if self.written.get(k) != Some(v) {
                client.write(k, v)?;
                self.written.insert(k.clone(), v.clone());
                written += 1;
            }
        }
        if written + removed == 0 {
            return Ok(Status::Unchanged);
        }
        let secs = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        client.write("data/updated", &secs.to_string())?;
        Ok(Status::Published { written, removed })
    }
}

/// `attr/PVAddons/*` from the agent's version (`MAJOR.MINOR.MICRO`, build
/// number from `XCP_AGENT_BUILD_NUMBER` at build time, else 0).
fn tools_keys(want: &mut BTreeMap<String, String>) {
    let core = crate::VERSION.split(['-', '+']).next().unwrap_or("0");
    let mut parts = core.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor, micro) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    let build = option_env!("XCP_AGENT_BUILD_NUMBER").and_then(|b| b.parse::<u32>().ok()).unwrap_or(0);
    for (k, v) in [
        ("Installed", 1),
        ("MajorVersion", major),
        ("MinorVersion", minor),
        ("MicroVersion", micro),
        ("BuildVersion", build),
    ] {
        want.insert(format!("attr/PVAddons/{k}"), v.to_string());
    }
}

/// `data/os_*` from os-release and uname.
fn os_keys(os_release: &Path, want: &mut BTreeMap<String, String>) {
    let text = std::fs::read_to_string(os_release)
        .or_else(|_| std::fs::read_to_string("/usr/lib/os-release"))
        .unwrap_or_default();
    let fields = parse_os_release(&text);
    if let Some(n) = fields.get("PRETTY_NAME").or(fields.get("NAME")) {
        want.insert("data/os_name".into(), n.clone());
    }
    if let Some(id) = fields.get("ID") {
        want.insert("data/os_distro".into(), id.clone());
    }
    let mut version = fields.get("VERSION_ID").cloned().unwrap_or_default();
    if !version.contains('.') {
        // Debian's VERSION_ID is "12"; /etc/debian_version has "12.5".
        if let Some(dir) = os_release.parent() {
            if let Ok(dv) = std::fs::read_to_string(dir.join("debian_version")) {
                let dv = dv.trim();
                if dv.split('.').next() == Some(version.as_str()) && dv.bytes().all(|b| b.is_ascii_digit() || b == b'.')
                {
                    version = dv.to_string();
                }
            }
        }
    }
    let mut v = version.split('.').filter(|s| !s.is_empty());
    if let Some(major) = v.next() {
        want.insert("data/os_majorver".into(), major.to_string());
        want.insert("data/os_minorver".into(), v.next().unwrap_or("0").to_string());
    }
    if let Ok(u) = nix::sys::utsname::uname() {
        want.insert("data/os_uname".into(), u.release().to_string_lossy().into_owned());
    }
}

/// KEY=value lines, values unquoted.
pub fn parse_os_release(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            let v = v.trim();
            let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v);
            (k.trim().to_string(), v.replace("\\\"", "\""))
        })
        .collect()
}

/// `data/meminfo_total` (MemTotal) and `data/meminfo_free` (MemAvailable,
/// else MemFree), in kB. False when /proc/meminfo cannot be read.
fn meminfo_keys(proc_root: &Path, want: &mut BTreeMap<String, String>) -> bool {
    let Ok(text) = std::fs::read_to_string(proc_root.join("meminfo")) else { return false };
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
    };
    let Some(total) = field("MemTotal") else { return false };
    let free = field("MemAvailable").or_else(|| field("MemFree")).unwrap_or(0);
    want.insert("data/meminfo_total".into(), total.to_string());
    want.insert("data/meminfo_free".into(), free.to_string());
    true
}

/// The first running process named like another guest agent, if any.
pub fn other_agent(proc_root: &Path) -> Option<String> {
    let me = std::process::id().to_string();
    let entries = std::fs::read_dir(proc_root).ok()?;
    for e in entries.flatten() {
        let pid = e.file_name().to_string_lossy().into_owned();
        if pid == me || !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        // comm is cut at 15 characters; argv[0] has the full name.
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
        let argv0 = String::from_utf8_lossy(argv0);
        let base = argv0.rsplit('/').next().unwrap_or_default();
        for agent in OTHER_AGENTS {
            if comm.trim() == agent || base == agent {
                return Some(agent.to_string());
            }
        }
    }
    None
}

/// Addresses of every interface carrying `mac` (a bridge or VLAN on top of
/// the VIF shares its MAC), without duplicates, in interface order.
fn addresses_for_mac(ifaces: &[Interface], mac: &str) -> (Vec<Ipv4Addr>, Vec<Ipv6Addr>) {
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    for i in ifaces.iter().filter(|i| i.mac.as_deref() == Some(mac)) {
        for a in &i.ipv4 {
            if !v4.contains(a) {
                v4.push(*a);
            }
        }
        for a in &i.ipv6 {
            if !v6.contains(a) {
                v6.push(*a);
            }
        }
    }
    (v4, v6)
}

/// This machine's interfaces with MAC and addresses, from getifaddrs.
pub fn interfaces() -> Vec<Interface> {
    let mut out: Vec<Interface> = Vec::new();
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else { return out };
    for a in addrs {
        let idx = match out.iter().position(|i| i.name == a.interface_name) {
            Some(i) => i,
            None => {
                out.push(Interface { name: a.interface_name.clone(), ..Default::default() });
                out.len() - 1
            }
        };
        let Some(addr) = a.address else { continue };
        let iface = &mut out[idx];
        if let Some(link) = addr.as_link_addr() {
            if let Some(m) = link.addr() {
                if m != [0; 6] {
                    iface.mac = Some(m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":"));
                }
            }
        } else if let Some(sin) = addr.as_sockaddr_in() {
            iface.ipv4.push(sin.ip());
        } else if let Some(sin6) = addr.as_sockaddr_in6() {
            iface.ipv6.push(sin6.ip());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release_is_unquoted() {
        let f = parse_os_release("PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\nVERSION_ID=\"12\"\n");
        assert_eq!(f["PRETTY_NAME"], "Debian GNU/Linux 12 (bookworm)");
        assert_eq!(f["VERSION_ID"], "12");
    }

    #[test]
    fn debian_minor_version_comes_from_debian_version() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("os-release"), "ID=debian\nVERSION_ID=\"12\"\nPRETTY_NAME=\"Debian 12\"\n")
            .unwrap();
        std::fs::write(d.path().join("debian_version"), "12.5\n").unwrap();
        let mut w = BTreeMap::new();
        os_keys(&d.path().join("os-release"), &mut w);
        assert_eq!(w["data/os_majorver"], "12");
        assert_eq!(w["data/os_minorver"], "5");
        assert_eq!(w["data/os_distro"], "debian");
    }

    #[test]
    fn meminfo_uses_mem_available() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("meminfo"), "MemTotal:  2048000 kB\nMemFree: 100 kB\nMemAvailable: 1500000 kB\n")
            .unwrap();
        let mut w = BTreeMap::new();
        assert!(meminfo_keys(d.path(), &mut w));
        assert_eq!(w["data/meminfo_total"], "2048000");
        assert_eq!(w["data/meminfo_free"], "1500000");
    }

    #[test]
    fn other_agents_are_found_by_comm_or_argv0() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("1")).unwrap();
        std::fs::write(d.path().join("1/comm"), "systemd\n").unwrap();
        assert_eq!(other_agent(d.path()), None);
        std::fs::create_dir_all(d.path().join("77")).unwrap();
        std::fs::write(d.path().join("77/comm"), "bash\n").unwrap();
        std::fs::write(d.path().join("77/cmdline"), "/usr/sbin/xe-daemon\0-p\0/run/x.pid\0").unwrap();
        assert_eq!(other_agent(d.path()).as_deref(), Some("xe-daemon"));
    }

    #[test]
    fn tools_version_comes_from_crate_version() {
        let mut w = BTreeMap::new();
        tools_keys(&mut w);
        assert_eq!(w["attr/PVAddons/Installed"], "1");
        let v: Vec<&str> = crate::VERSION.split('.').collect();
        assert_eq!(w["attr/PVAddons/MajorVersion"], v[0]);
    }

    #[test]
    fn getifaddrs_sees_loopback() {
        let i = interfaces();
        assert!(i.iter().any(|i| i.ipv4.contains(&Ipv4Addr::LOCALHOST)), "{i:?}");
    }
}
