//! Configuration: `/etc/xcp-vm-agent/config.json`, compatible with the Python
//! agent 1.0.3's files (`server_url`, `check_in_interval`, `client_cert`,
//! `server_cert`) plus the keys this agent adds.
//!
//! Loading is two steps: the JSON is read into [`RawConfig`] (everything
//! optional, unknown keys collected as warnings), then validated into
//! [`Config`] with typed fields and defaults. Adding a key: a field in both,
//! its default in `validate`, and a row in the configuration table of
//! `README.md`.
use crate::http::Target;
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const DEFAULT_PATH: &str = "/etc/xcp-vm-agent/config.json";

/// `client_cert` in the old agent: either `[cert, key]` or one PEM holding both.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum ClientCertSpec {
    Pair(PathBuf, PathBuf),
    Combined(PathBuf),
}

#[derive(Debug, Default, Deserialize)]
pub struct RawConfig {
    pub server_url: Option<String>,
    pub check_in_interval: Option<f64>,
    pub client_cert: Option<ClientCertSpec>,
    pub server_cert: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub log_file: Option<PathBuf>,
    pub allowed_operations: Option<Vec<String>>,
    pub log_level: Option<String>,
    pub fstab_path: Option<PathBuf>,
    pub status_listen: Option<String>,
    pub long_poll_seconds: Option<u64>,
    pub xenstore_publish: Option<String>,
    pub not_upgradable_key: Option<String>,
    #[serde(flatten)]
    pub unknown: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XenPublish {
    Auto,
    Always,
    Never,
}

/// Validated configuration with every default applied.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    /// None when the file has no `server_url` yet (fresh package install).
    pub server_url: Option<String>,
    /// `server_url` parsed by the client's own parser (`http::Target`), in
    /// `validate`: the client connects to this value, never to a re-parse of
    /// the text, so what `check-config` accepted is what `run` uses. Some
    /// exactly when `server_url` is.
    pub server: Option<Target>,
    pub check_in_interval: std::time::Duration,
    /// (certificate chain PEM, private key PEM) paths.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    pub server_cert: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub log_file: Option<PathBuf>,
    /// Parsed into the operation enum here, so `check-config` and `run`
    /// agree: a name this agent does not know is a warning and left out.
    pub allowed_operations: Vec<crate::protocol::Operation>,
    pub log_level: String,
    pub fstab_path: PathBuf,
    pub status_listen: Option<std::net::SocketAddr>,
    pub long_poll_seconds: u64,
    pub xenstore_publish: XenPublish,
    pub not_upgradable_key: String,
    pub warnings: Vec<String>,
}

impl Config {
    /// Defaults for everything, with no server: what `identity`, `metrics`
    /// and `exec` use when no config file exists.
    pub fn defaults(path: &Path) -> Config {
        validate(path, RawConfig::default()).expect("defaults are valid")
    }

    /// The server URL, or an error telling the administrator what to write where.
    pub fn require_server(&self) -> Result<&str> {
        self.server_url.as_deref().ok_or_else(|| self.no_server())
    }

    /// The server as the client reaches it (the same error as
    /// [`Config::require_server`] when there is none).
    pub fn require_target(&self) -> Result<&Target> {
        self.server.as_ref().ok_or_else(|| self.no_server())
    }

    fn no_server(&self) -> anyhow::Error {
        anyhow::anyhow!(
            "no server_url configured: set \"server_url\": \"https://SERVER:PORT\" in {}",
            self.path.display()
        )
    }
}

/// Read and validate the config file at `path`.
pub fn load(path: &Path) -> Result<Config> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config file {}", path.display()))?;
    parse(path, &text)
}

/// Like [`load`], but a missing file gives the defaults (for commands that
/// work without a server).
pub fn load_or_default(path: &Path) -> Result<Config> {
    if path.exists() {
        load(path)
    } else {
        Ok(Config::defaults(path))
    }
}

pub fn parse(path: &Path, text: &str) -> Result<Config> {
    let raw: RawConfig = serde_json::from_str(text).map_err(|e| {
        anyhow::anyhow!(
            "invalid config file {} at line {} column {}: {}",
            path.display(),
            e.line(),
            e.column(),
            strip_position(&e.to_string())
        )
    })?;
    validate(path, raw)
}

fn strip_position(s: &str) -> String {
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s.to_string(),
    }
}

pub fn validate(path: &Path, raw: RawConfig) -> Result<Config> {
    let mut warnings = Vec::new();
    for k in raw.unknown.keys() {
        warnings.push(format!("unknown key {k:?} in {} is ignored", path.display()));
    }
    let server_url = match raw.server_url.map(|s| s.trim().trim_end_matches('/').to_string()) {
        Some(s) if s.is_empty() => None,
        Some(s) => {
            if !s.starts_with("https://") {
                bail!(
                    "server_url {s:?} in {} must start with https:// (TLS verification is always on)",
                    path.display()
                );
            }
            // The client's own parser: what check-config accepts, `run` can
            // use (control characters, spaces, user, query refused alike).
            let target = Target::parse(&s).with_context(|| format!("in {}", path.display()))?;
            Some((s, target))
        }
        None => None,
    };
    let (server_url, server) = server_url.unzip();
    let interval = raw.check_in_interval.unwrap_or(30.0);
    if !(interval.is_finite() && (1.0..=86400.0).contains(&interval)) {
        bail!("check_in_interval {interval} in {} must be between 1 and 86400 seconds", path.display());
    }
    let client_cert = raw.client_cert.map(|c| match c {
        ClientCertSpec::Pair(c, k) => (c, k),
        ClientCertSpec::Combined(p) => (p.clone(), p),
    });
    let allowed = match raw.allowed_operations {
        None => crate::protocol::Operation::ALL.to_vec(),
        Some(names) => {
            let mut ops = Vec::new();
            for name in &names {
                match crate::protocol::Operation::parse(name) {
                    Some(op) if !ops.contains(&op) => ops.push(op),
                    Some(_) => {}
                    None => warnings.push(format!(
                        "allowed_operations in {} names {name:?}, which is not an operation of this agent ({})",
                        path.display(),
                        crate::protocol::Operation::NAMES.join(", ")
                    )),
                }
            }
            ops
        }
    };
    let log_level = raw.log_level.unwrap_or_else(|| "info".into()).to_ascii_lowercase();
    if !["error", "warn", "warning", "info", "debug", "trace"].contains(&log_level.as_str()) {
        bail!("log_level {log_level:?} in {} must be one of error, warn, info, debug, trace", path.display());
    }
    let status_listen = match raw.status_listen {
        None => None,
        Some(s) if s.is_empty() => None,
        Some(s) => Some(
            s.parse::<std::net::SocketAddr>()
                .with_context(|| format!("status_listen {s:?} in {} is not an address:port", path.display()))?,
        ),
    };
    let xenstore_publish = match raw.xenstore_publish.as_deref().unwrap_or("auto") {
        "auto" => XenPublish::Auto,
        "always" => XenPublish::Always,
        "never" => XenPublish::Never,
        other => bail!("xenstore_publish {other:?} in {} must be auto, always or never", path.display()),
    };
    let long_poll = raw.long_poll_seconds.unwrap_or(55);
    if long_poll > 600 {
        bail!("long_poll_seconds {long_poll} in {} must be at most 600", path.display());
    }
    Ok(Config {
        path: path.to_path_buf(),
        server_url,
        server,
        check_in_interval: std::time::Duration::from_secs_f64(interval),
        client_cert,
        server_cert: raw.server_cert,
        state_dir: raw.state_dir.unwrap_or_else(|| "/var/lib/xcp-vm-agent".into()),
        log_file: match raw.log_file {
            Some(p) if p.as_os_str().is_empty() => None,
            Some(p) => Some(p),
            None => Some("/var/log/xcp-vm-agent/agent.log".into()),
        },
        allowed_operations: allowed,
        log_level: if log_level == "warning" { "warn".into() } else { log_level },
        fstab_path: raw.fstab_path.unwrap_or_else(|| "/etc/fstab".into()),
        status_listen,
        long_poll_seconds: long_poll,
        xenstore_publish,
        not_upgradable_key: raw.not_upgradable_key.unwrap_or_else(|| "data/NotUpgradable".into()),
        warnings,
    })
}

/// Refuse a private key that group or others can read, naming the fix.
pub fn check_key_permissions(key: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(key).with_context(|| format!("cannot read client key {}", key.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "client key {} has mode {:04o}, readable by group or others; run: chmod 600 {}",
            key.display(),
            mode,
            key.display()
        );
    }
    Ok(())
}

/// Everything `check-config` checks beyond parsing: files exist, key modes.
pub fn check_files(cfg: &Config) -> Result<()> {
    if let Some((cert, key)) = &cfg.client_cert {
        if !cert.is_file() {
            bail!("client certificate {} named in {} does not exist", cert.display(), cfg.path.display());
        }
        check_key_permissions(key)?;
    }
    if let Some(ca) = &cfg.server_cert {
        if !ca.is_file() {
            bail!("server_cert {} named in {} does not exist", ca.display(), cfg.path.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Config> {
        parse(Path::new("/etc/xcp-vm-agent/config.json"), s)
    }

    #[test]
    fn old_agent_config_is_accepted() {
        let c = p(r#"{"server_url": "https://mgmt.example:8443/", "check_in_interval": 60,
                     "client_cert": ["/etc/xcp-vm-agent/agent.crt", "/etc/xcp-vm-agent/agent.key"],
                     "server_cert": "/etc/xcp-vm-agent/ca.crt"}"#)
        .unwrap();
        assert_eq!(c.server_url.as_deref(), Some("https://mgmt.example:8443"));
        assert_eq!(c.check_in_interval.as_secs(), 60);
        assert_eq!(c.client_cert.unwrap().1, PathBuf::from("/etc/xcp-vm-agent/agent.key"));
        assert_eq!(c.allowed_operations.len(), crate::protocol::Operation::NAMES.len());
        assert!(c.warnings.is_empty());
    }

    /// allowed_operations is parsed into the operation enum: what `run`
    /// allows is exactly what `check-config` reports, a name this agent
    /// does not know is a warning (not a capability), a repeat counts once.
    #[test]
    fn allowed_operations_are_parsed_into_operations() {
        use crate::protocol::Operation;
        let c = p(r#"{"server_url": "https://x", "allowed_operations": ["RunScript", "Format", "RunScript", "ExtendPartition"]}"#)
            .unwrap();
        assert_eq!(c.allowed_operations, vec![Operation::RunScript, Operation::ExtendPartition]);
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        assert!(
            c.warnings[0].contains("names \"Format\", which is not an operation of this agent"),
            "{:?}",
            c.warnings
        );
        let c = p(r#"{"server_url": "https://x", "allowed_operations": []}"#).unwrap();
        assert!(c.allowed_operations.is_empty());
    }

    #[test]
    fn combined_pem_is_accepted() {
        let c = p(r#"{"server_url": "https://x", "client_cert": "/etc/a.pem"}"#).unwrap();
        assert_eq!(c.client_cert, Some(("/etc/a.pem".into(), "/etc/a.pem".into())));
    }

    #[test]
    fn invalid_json_names_file_line_and_column() {
        let e = p("{\n  \"server_url\": \"https://x\",\n  oops\n}").unwrap_err().to_string();
        assert!(e.contains("/etc/xcp-vm-agent/config.json"), "{e}");
        assert!(e.contains("line 3 column 3"), "{e}");
    }

    #[test]
    fn unknown_key_is_a_warning() {
        let c = p(r#"{"server_url": "https://x", "colour": "blue"}"#).unwrap();
        assert_eq!(c.warnings.len(), 1);
        assert!(c.warnings[0].contains("colour"));
    }

    #[test]
    fn wrong_types_and_values_are_errors() {
        assert!(p(r#"{"server_url": 5}"#).is_err());
        assert!(p(r#"{"server_url": "http://x"}"#).unwrap_err().to_string().contains("https://"));
        // Found in review: a control character in the path passed validation
        // and went into the request line (header injection).
        for bad in [r#""https://x/a\r\nX-Injected: 1""#, r#""https://x/\u0000""#, r#""https://x/a b""#] {
            let e = format!("{:#}", p(&format!(r#"{{"server_url": {bad}}}"#)).unwrap_err());
            assert!(e.contains("control characters"), "{bad}: {e}");
        }
        assert!(p(r#"{"check_in_interval": 0}"#).is_err());
        assert!(p(r#"{"log_level": "loud"}"#).is_err());
        assert!(p(r#"{"xenstore_publish": "maybe"}"#).is_err());
    }

    #[test]
    fn missing_server_url_is_allowed_but_explained() {
        let c = p("{}").unwrap();
        let e = c.require_server().unwrap_err().to_string();
        assert!(e.contains("server_url") && e.contains("/etc/xcp-vm-agent/config.json"), "{e}");
    }

    #[test]
    fn group_readable_key_is_refused_with_chmod() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let k = d.path().join("k.pem");
        std::fs::write(&k, "x").unwrap();
        std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = check_key_permissions(&k).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600)).unwrap();
        check_key_permissions(&k).unwrap();
    }

    #[test]
    fn json_errors_say_what_is_wrong_once_with_the_position() {
        let e = p("{\n  \"server_url\": ,\n}").unwrap_err().to_string();
        // serde's own text, without its trailing " at line L column C",
        // which the message already gives once.
        assert!(e.contains(": expected value"), "{e}");
        assert_eq!(e.matches(" at line ").count(), 1, "{e}");
        assert_eq!(strip_position("no position here"), "no position here");
    }

    #[test]
    fn server_url_is_parsed_once_into_the_clients_target() {
        let c = p(r#"{"server_url": "https://mgmt.example:8443/agent/"}"#).unwrap();
        assert_eq!(c.server_url.as_deref(), Some("https://mgmt.example:8443/agent"));
        let t = c.require_target().unwrap();
        assert_eq!((t.host.as_str(), t.port, t.prefix.as_str()), ("mgmt.example", 8443, "/agent"));
        let none = p("{}").unwrap();
        assert!(none.server.is_none());
        assert_eq!(none.require_target().unwrap_err().to_string(), none.require_server().unwrap_err().to_string());
    }

    #[test]
    fn an_empty_server_url_is_no_server_url() {
        for empty in [r#""""#, r#""  ""#, r#""/""#] {
            let c = p(&format!(r#"{{"server_url": {empty}}}"#)).unwrap();
            assert_eq!(c.server_url, None, "{empty}");
        }
    }

    #[test]
    fn optional_settings_empty_given_and_bounded() {
        // status_listen: empty is off, an address is parsed, junk refused.
        assert_eq!(p(r#"{"status_listen": ""}"#).unwrap().status_listen, None);
        assert_eq!(
            p(r#"{"status_listen": "127.0.0.1:9100"}"#).unwrap().status_listen,
            Some("127.0.0.1:9100".parse().unwrap())
        );
        assert!(p(r#"{"status_listen": "nowhere"}"#).is_err());
        // long_poll_seconds: 600 is the largest allowed.
        assert_eq!(p(r#"{"long_poll_seconds": 600}"#).unwrap().long_poll_seconds, 600);
        assert!(p(r#"{"long_poll_seconds": 601}"#).is_err());
        assert_eq!(p("{}").unwrap().long_poll_seconds, 55);
        // log_file: empty means no file, a path is kept, absent is the default.
        assert_eq!(p(r#"{"log_file": ""}"#).unwrap().log_file, None);
        assert_eq!(p(r#"{"log_file": "/tmp/a.log"}"#).unwrap().log_file, Some("/tmp/a.log".into()));
        assert_eq!(p("{}").unwrap().log_file, Some("/var/log/xcp-vm-agent/agent.log".into()));
        // log_level: "warning" is spelt "warn", others kept (lower case).
        assert_eq!(p(r#"{"log_level": "warning"}"#).unwrap().log_level, "warn");
        assert_eq!(p(r#"{"log_level": "DEBUG"}"#).unwrap().log_level, "debug");
    }

    #[test]
    fn check_files_names_what_is_missing_or_open() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let (crt, key, ca) = (d.path().join("a.crt"), d.path().join("a.key"), d.path().join("ca.crt"));
        let cfg = |crt: &Path, key: &Path, ca: &Path| {
            let j = serde_json::json!({"server_url": "https://x", "client_cert": [crt, key], "server_cert": ca});
            p(&j.to_string()).unwrap()
        };
        let e = check_files(&cfg(&crt, &key, &ca)).unwrap_err().to_string();
        assert!(e.contains("client certificate") && e.contains("a.crt"), "{e}");
        std::fs::write(&crt, "c").unwrap();
        std::fs::write(&key, "k").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(check_files(&cfg(&crt, &key, &ca)).unwrap_err().to_string().contains("chmod 600"));
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = check_files(&cfg(&crt, &key, &ca)).unwrap_err().to_string();
        assert!(e.contains("server_cert") && e.contains("ca.crt"), "{e}");
        std::fs::write(&ca, "ca").unwrap();
        check_files(&cfg(&crt, &key, &ca)).unwrap();
    }
}
