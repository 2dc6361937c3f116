//! The command line: its definition (also used by `xtask` to generate the
//! man page and shell completions) and the dispatch of each subcommand.
use anyhow::{Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use std::path::{Path, PathBuf};

use crate::config::{self, Config};

#[derive(Parser, Debug)]
#[command(
    name = "xcp-vm-agent",
    version = crate::VERSION,
    about = "In-guest agent for XCP-ng and KVM virtual machines",
    long_about = "In-guest agent for XCP-ng and KVM virtual machines. It pulls jobs from a management \
                  server over HTTPS (no inbound ports), runs them as root (ExtendPartition, InitializeDisk, \
                  RunScript) and reports the results, with the VM's identity, metrics, addresses and disks."
)]
pub struct Cli {
    /// Configuration file.
    #[arg(long, global = true, value_name = "PATH", default_value = config::DEFAULT_PATH)]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Run the daemon: check in, run jobs, report, until SIGTERM.
    Run,
    /// Check in once, run what arrived, deliver the results, exit.
    Once,
    /// Show the VM's identity (UUID and every source), host, OS, kernel, hypervisor.
    Identity {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the metrics sent with each check-in, and the network interfaces.
    Metrics {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show every disk, its partitions, filesystems, mount points and room to grow.
    Inventory {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run one job from a JSON file ({"id", "operation", "params"}) without a
    /// server and print the result as JSON. Exit 0: succeeded or no_change,
    /// 1: failed, 3: refused.
    Exec {
        /// Job file; `-` reads standard input.
        #[arg(long, value_name = "FILE")]
        job: PathBuf,
        /// Print the plan (every command it would run) and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// fstab to edit instead of the configured one (tests).
        #[arg(long, value_name = "PATH")]
        fstab: Option<PathBuf>,
    },
    /// Validate the configuration file and the files it names.
    CheckConfig,
}

/// The clap definition, for man pages and completions.
pub fn command() -> clap::Command {
    Cli::command()
}

/// Parse, dispatch, map errors to exit codes. Returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("xcp-vm-agent: error: {e:#}");
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

fn dispatch(cli: Cli) -> Result<i32> {
    match cli.command {
        Cmd::Run => {
            let cfg = config::load(&cli.config)?;
            setup_logging(&cfg, true);
            crate::daemon::run(&cli.config, cfg)?;
            Ok(0)
        }
        Cmd::Once => {
            let cfg = config::load(&cli.config)?;
            setup_logging(&cfg, true);
            crate::daemon::once(cfg)?;
            Ok(0)
        }
        Cmd::Identity { json } => {
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
        Cmd::Metrics { json } => {
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
                for (k, val) in v.as_object().unwrap() {
                    println!("{k:<22} {val}");
                }
                for i in net {
                    println!("{:<10} {:<17} {} {}", i.name, i.mac, i.ipv4.join(","), i.ipv6.join(","));
                }
            }
            Ok(0)
        }
        Cmd::Inventory { json } => {
            let cfg = load_quiet(&cli.config)?;
            setup_logging(&cfg, false);
            crate::disk::print_inventory(json)?;
            Ok(0)
        }
        Cmd::Exec { job, dry_run, fstab } => {
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
            Ok(r.status.exit_code())
        }
        Cmd::CheckConfig => {
            let cfg = config::load(&cli.config)?;
            for w in &cfg.warnings {
                println!("warning: {w}");
            }
            config::check_files(&cfg)?;
            match &cfg.server_url {
                Some(u) => println!("{}: OK (server {u})", cli.config.display()),
                None => {
                    println!("{}: valid, but {}", cli.config.display(), cfg.require_server().unwrap_err());
                    return Ok(1);
                }
            }
            Ok(0)
        }
    }
}
