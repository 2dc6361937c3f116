//! The command line: its definition (also used by `xtask` to generate the
//! man page and shell completions) and the dispatch of each subcommand.
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

use crate::config::{self, Config};

/// One option of a subcommand: `--long` or `--long VALUE`.
pub struct Opt {
    pub long: &'static str,
    /// Name of the value, or None for a flag.
    pub value: Option<&'static str>,
    pub required: bool,
    pub help: &'static str,
}

/// One subcommand.
pub struct Sub {
    pub name: &'static str,
    pub about: &'static str,
    pub opts: &'static [Opt],
}

const fn flag(long: &'static str, help: &'static str) -> Opt {
    Opt { long, value: None, required: false, help }
}

const JSON: Opt = flag("json", "Print JSON.");

pub const NAME: &str = "xcp-vm-agent";
pub const ABOUT: &str = "In-guest agent for XCP-ng and KVM virtual machines";
pub const LONG_ABOUT: &str = "In-guest agent for XCP-ng and KVM virtual machines. It pulls jobs from a management \
server over HTTPS (no inbound ports), runs them as root (ExtendPartition, InitializeDisk, RunScript) and reports the \
results, with the VM's identity, metrics, addresses and disks.";

/// Options every subcommand takes.
pub const GLOBAL: &[Opt] = &[Opt {
    long: "config",
    value: Some("PATH"),
    required: false,
    help: "Configuration file [default: /etc/xcp-vm-agent/config.json].",
}];

/// The command line. The man page and the shell completions are generated
/// from this table (`cargo xtask dist`), so they cannot drift from it.
///
/// The agent parses its few arguments itself: clap cost about 150 KB of the
/// 2.2 MB binary budget.
pub const COMMANDS: &[Sub] = &[
    Sub { name: "run", about: "Run the daemon: check in, run jobs, report, until SIGTERM.", opts: &[] },
    Sub { name: "once", about: "Check in once, run what arrived, deliver the results, exit.", opts: &[] },
    Sub {
        name: "identity",
        about: "Show the VM's identity (UUID and every source), host, OS, kernel, hypervisor.",
        opts: &[JSON],
    },
    Sub {
        name: "metrics",
        about: "Show the metrics sent with each check-in, and the network interfaces.",
        opts: &[JSON],
    },
    Sub {
        name: "inventory",
        about: "Show every disk, its partitions, filesystems, mount points and room to grow.",
        opts: &[JSON],
    },
    Sub {
        name: "exec",
        about: "Run one job from a JSON file ({\"id\", \"operation\", \"params\"}) without a server and print the \
                result as JSON. Exit 0: succeeded or no_change, 1: failed, 3: refused.",
        opts: &[
            Opt { long: "job", value: Some("FILE"), required: true, help: "Job file; `-` reads standard input." },
            flag("dry-run", "Print the plan (every command it would run) and change nothing."),
            Opt {
                long: "fstab",
                value: Some("PATH"),
                required: false,
                help: "fstab to edit instead of the configured one (tests).",
            },
        ],
    },
    Sub { name: "check-config", about: "Validate the configuration file and the files it names.", opts: &[] },
];

/// A parsed command line.
#[derive(Debug, PartialEq)]
pub struct Args {
    pub config: PathBuf,
    pub command: String,
    /// Options given, by long name; flags have an empty value.
    pub opts: Vec<(String, String)>,
}

impl Args {
    pub fn flag(&self, name: &str) -> bool {
        self.opts.iter().any(|(k, _)| k == name)
    }
    pub fn value(&self, name: &str) -> Option<&str> {
        self.opts.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// What the command line asks for.
#[derive(Debug, PartialEq)]
pub enum Parsed {
    Run(Args),
    /// Text to print on stdout, exit 0 (`--help`, `--version`).
    Print(String),
}

fn usage_opts(opts: &[Opt]) -> String {
    opts.iter()
        .map(|o| match (o.value, o.required) {
            (Some(v), true) => format!(" --{} <{v}>", o.long),
            (Some(v), false) => format!(" [--{} <{v}>]", o.long),
            (None, _) => format!(" [--{}]", o.long),
        })
        .collect()
}

fn opt_lines(out: &mut String, opts: &[Opt]) {
    for o in opts {
        let left = match o.value {
            Some(v) => format!("--{} <{v}>", o.long),
            None => format!("--{}", o.long),
        };
        out.push_str(&format!("  {left:<18}  {}\n", o.help));
    }
}

/// `xcp-vm-agent --help`.
pub fn help() -> String {
    let mut s = format!("{LONG_ABOUT}\n\nUsage: {NAME} [--config <PATH>] <COMMAND>\n\nCommands:\n");
    for c in COMMANDS {
        let about = c.about.split(". ").next().unwrap_or(c.about).trim_end_matches('.');
        s.push_str(&format!("  {:<13} {about}\n", c.name));
    }
    s.push_str("\nOptions:\n");
    opt_lines(&mut s, GLOBAL);
    s.push_str("  -h, --help          Print help (also after a command: `exec --help`)\n");
    s.push_str("  -V, --version       Print version\n");
    s
}

/// `xcp-vm-agent COMMAND --help`.
pub fn sub_help(c: &Sub) -> String {
    let mut s =
        format!("{}\n\nUsage: {NAME} {}{}{}\n\nOptions:\n", c.about, c.name, usage_opts(GLOBAL), usage_opts(c.opts));
    opt_lines(&mut s, c.opts);
    opt_lines(&mut s, GLOBAL);
    s.push_str("  -h, --help          Print help\n");
    s
}

/// Parse the arguments after the program name.
pub fn parse(args: &[String]) -> Result<Parsed> {
    let mut config = PathBuf::from(config::DEFAULT_PATH);
    let mut command: Option<&Sub> = None;
    let mut opts = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-h" | "--help" | "help" if command.is_none() || a != "help" => {
                return Ok(Parsed::Print(command.map(sub_help).unwrap_or_else(help)));
            }
            "-V" | "--version" => return Ok(Parsed::Print(format!("{NAME} {}\n", crate::VERSION))),
            _ => {}
        }
        if let Some(long) = a.strip_prefix("--") {
            let (name, inline) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (long, None),
            };
            let scope: Vec<&Opt> = GLOBAL.iter().chain(command.map(|c| c.opts).unwrap_or(&[])).collect();
            let Some(opt) = scope.iter().find(|o| o.long == name) else {
                match command {
                    Some(c) => bail!("unknown option --{name} for `{}`; see `{NAME} {} --help`", c.name, c.name),
                    None => bail!("unknown option --{name}; see `{NAME} --help`"),
                }
            };
            let value = match (opt.value, inline) {
                (Some(v), None) => it.next().cloned().with_context(|| format!("--{name} needs a value <{v}>"))?,
                (Some(_), Some(v)) => v,
                (None, Some(_)) => bail!("--{name} takes no value"),
                (None, None) => String::new(),
            };
            if name == "config" {
                config = PathBuf::from(value);
            } else {
                opts.push((name.to_string(), value));
            }
        } else if let Some(c) = command {
            bail!("unexpected argument {a:?}; see `{NAME} {} --help`", c.name);
        } else {
            command = Some(COMMANDS.iter().find(|c| c.name == a).with_context(|| {
                let names: Vec<&str> = COMMANDS.iter().map(|c| c.name).collect();
                format!("unknown command {a:?}; the commands are {}", names.join(", "))
            })?);
        }
    }
    let Some(c) = command else { bail!("no command given; see `{NAME} --help`") };
    for o in c.opts.iter().filter(|o| o.required) {
        if !opts.iter().any(|(k, _)| k == o.long) {
            bail!("`{} {}` needs --{} <{}>", NAME, c.name, o.long, o.value.unwrap_or(""));
        }
    }
    Ok(Parsed::Run(Args { config, command: c.name.to_string(), opts }))
}

/// Parse, dispatch, map errors to exit codes. Returns the process exit code.
pub fn main() -> i32 {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // A job's runner (jobs::scope), started by the agent: not a command.
    if let [cmd, dir, stem, fstab] = &args[..] {
        if cmd == "__job" {
            return crate::jobs::scope::runner(dir.as_ref(), stem, fstab.as_ref());
        }
    }
    #[cfg(feature = "guest")]
    if args.first().map(String::as_str) == Some(crate::guest::freeze::GUARD_ARG) {
        crate::guest::freeze::guard_exec(&args[1..]);
    }
    let parsed = match parse(&args) {
        Ok(Parsed::Print(text)) => {
            print!("{text}");
            return 0;
        }
        Ok(Parsed::Run(a)) => a,
        Err(e) => {
            eprintln!("{NAME}: error: {e:#}");
            return 2;
        }
    };
    match dispatch(parsed) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("{NAME}: error: {e:#}");
            1
        }
    }
}

fn setup_logging(cfg: &Config, to_file: bool) {
    let level = std::env::var("XCP_AGENT_LOG").unwrap_or_else(|_| cfg.log_level.clone());
    crate::logging::init(&level, if to_file { cfg.log_file.as_deref() } else { None });
    for w in &cfg.warnings {
        tracing::warn!("{w}");
    }
}

fn load_quiet(path: &Path) -> Result<Config> {
    config::load_or_default(path)
}

fn dispatch(cli: Args) -> Result<i32> {
    let json = cli.flag("json");
    match cli.command.as_str() {
        "run" => {
            let cfg = config::load(&cli.config)?;
            setup_logging(&cfg, true);
            crate::daemon::run(&cli.config, cfg)?;
            Ok(0)
        }
        "once" => {
            let cfg = config::load(&cli.config)?;
            setup_logging(&cfg, true);
            crate::daemon::once(cfg)?;
            Ok(0)
        }
        "identity" => {
            let cfg = load_quiet(&cli.config)?;
            setup_logging(&cfg, false);
            let id = crate::identity::current();
            if json {
                println!("{}", serde_json::to_string_pretty(&id)?);
            } else {
                println!("vm_uuid     {} (from {})", id.vm_uuid, id.source);
                for s in &id.sources {
                    let v = s.value.clone().unwrap_or_else(|| format!("- ({})", s.error.as_deref().unwrap_or("")));
                    println!("  {:<14} {v}", s.source);
                }
                if let Some(d) = id.domid {
                    println!("domid       {d}");
                }
                println!("hostname    {}", id.hostname);
                println!("os          {}", if id.os.pretty_name.is_empty() { &id.os.name } else { &id.os.pretty_name });
                println!("kernel      {}", id.kernel);
                println!("hypervisor  {}", id.hypervisor);
                for w in &id.warnings {
                    println!("warning     {w}");
                }
            }
            Ok(0)
        }
        "metrics" => {
            let cfg = load_quiet(&cli.config)?;
            setup_logging(&cfg, false);
            let mut s = crate::metrics::Sampler::default();
            std::thread::sleep(std::time::Duration::from_millis(250));
            let m = s.sample();
            let net = crate::metrics::network();
            if json {
                println!("{}", serde_json::to_string_pretty(&serde_json::json!({"metrics": m, "network": net}))?);
            } else {
                let v = serde_json::to_value(&m)?;
                for (k, val) in v.as_object().into_iter().flatten() {
                    println!("{k:<22} {val}");
                }
                for i in net {
                    println!("{:<10} {:<17} {} {}", i.name, i.mac, i.ipv4.join(","), i.ipv6.join(","));
                }
            }
            Ok(0)
        }
        "inventory" => {
            let cfg = load_quiet(&cli.config)?;
            setup_logging(&cfg, false);
            crate::disk::print_inventory(&crate::guest::fsreport::inventory()?, json)?;
            Ok(0)
        }
        "exec" => {
            let job = PathBuf::from(cli.value("job").unwrap_or("-"));
            let fstab = cli.value("fstab").map(PathBuf::from);
            let dry_run = cli.flag("dry-run");
            let cfg = load_quiet(&cli.config)?;
            setup_logging(&cfg, false);
            let text = if job == Path::new("-") {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                    .context("cannot read the job from stdin")?;
                s
            } else {
                std::fs::read_to_string(&job).with_context(|| format!("cannot read job file {}", job.display()))?
            };
            let r = crate::daemon::exec_job(&cfg, &text, &job.display().to_string(), dry_run, fstab.as_deref());
            println!("{}", serde_json::to_string_pretty(&r)?);
            // Reboot/Shutdown: the result is out, now act (once).
            crate::guest::power::after_delivery(&cfg.state_dir, 0, std::thread::sleep);
            Ok(r.status.exit_code())
        }
        "check-config" => {
            let cfg = config::load(&cli.config)?;
            for w in &cfg.warnings {
                println!("warning: {w}");
            }
            config::check_files(&cfg)?;
            match &cfg.server_url {
                Some(u) => println!("{}: OK (server {u})", cli.config.display()),
                None => {
                    println!(
                        "{}: valid, but {}",
                        cli.config.display(),
                        cfg.require_server().expect_err("no server_url")
                    );
                    return Ok(1);
                }
            }
            Ok(0)
        }
        other => unreachable!("command {other} is in COMMANDS but not dispatched"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(a: &[&str]) -> Result<Parsed> {
        parse(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn parses_commands_options_and_global_config_anywhere() {
        let Parsed::Run(a) = p(&["exec", "--job", "j.json", "--dry-run", "--config=/x.json"]).unwrap() else {
            panic!()
        };
        assert_eq!(a.command, "exec");
        assert_eq!(a.config, PathBuf::from("/x.json"));
        assert_eq!(a.value("job"), Some("j.json"));
        assert!(a.flag("dry-run") && !a.flag("json"));
        let Parsed::Run(a) = p(&["--config", "/y", "identity", "--json"]).unwrap() else { panic!() };
        assert_eq!((a.command.as_str(), a.flag("json")), ("identity", true));
        assert_eq!(a.config, PathBuf::from("/y"));
    }

    #[test]
    fn help_and_version() {
        let Parsed::Print(h) = p(&["--help"]).unwrap() else { panic!() };
        for c in COMMANDS {
            assert!(h.contains(c.name), "{h}");
        }
        let Parsed::Print(h) = p(&["exec", "--help"]).unwrap() else { panic!() };
        assert!(h.contains("--job <FILE>") && h.contains("--dry-run"), "{h}");
        let Parsed::Print(v) = p(&["--version"]).unwrap() else { panic!() };
        assert_eq!(v, format!("xcp-vm-agent {}\n", crate::VERSION));
    }

    #[test]
    fn errors_name_the_problem() {
        let e = |a: &[&str]| p(a).unwrap_err().to_string();
        assert!(e(&[]).contains("no command"));
        assert!(e(&["frobnicate"]).contains("unknown command \"frobnicate\""));
        assert!(e(&["identity", "--jsn"]).contains("unknown option --jsn for `identity`"));
        assert!(e(&["exec"]).contains("needs --job <FILE>"));
        assert!(e(&["exec", "--job"]).contains("--job needs a value"));
        assert!(e(&["run", "extra"]).contains("unexpected argument \"extra\""));
        assert!(e(&["once", "--json"]).contains("unknown option --json for `once`"));
    }
}
