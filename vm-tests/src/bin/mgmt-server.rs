//! `mgmt-server`: the reference management server for xcp-vm-agent.
//! Argument parsing and dispatch only; the server lives in `vm_tests::server`.
use std::path::PathBuf;
use vm_tests::server::{self, ServeOptions};

const HELP: &str = "\
mgmt-server: reference management server for xcp-vm-agent (protocol v1)

Usage:
  mgmt-server init-pki DIR [--san NAME]...
                                 write a fresh test PKI into DIR
  mgmt-server agent-cert --pki DIR --vm-uuid UUID --out DIR
                                 issue a client certificate for one VM
  mgmt-server serve [OPTIONS]    run the server
  mgmt-server help | --help      this text; `mgmt-server COMMAND --help` for a command
";

const INIT_PKI_HELP: &str = "\
mgmt-server init-pki DIR [--san NAME]...

Writes a fresh certificate authority and certificates into DIR (created if
missing, existing files replaced):
  ca.pem, ca-key.pem                  the CA
  server-cert.pem, server-key.pem     server certificate for localhost and 127.0.0.1
                                      (and each --san NAME: a DNS name or IP address,
                                      e.g. the name a VM guest uses for this host)
  agent-cert.pem, agent-key.pem       a client certificate shared by all agents: it
                                      names no VM, so it may speak for any VM. For
                                      tests and the demo; give each real VM its own
                                      (mgmt-server agent-cert)
  other-ca.pem, other-agent-cert.pem, other-agent-key.pem
                                      an unrelated CA and a client certificate it
                                      signed (for wrong-CA tests)
Private keys are written with mode 0600.
";

const AGENT_CERT_HELP: &str = "\
mgmt-server agent-cert --pki DIR --vm-uuid UUID --out DIR

Issues a client certificate for the VM UUID, signed by the CA in --pki (made
by `mgmt-server init-pki`), carrying the URI subject alternative name
urn:uuid:UUID. The server holds a connection with such a certificate to that
VM: it may check in, fetch jobs and report results for UUID only (HTTP 403
otherwise). Writes into --out (created if missing):
  agent-cert.pem, agent-key.pem       the certificate and its key (mode 0600)
  ca.pem                              the CA, for the agent's server_cert
";

const SERVE_HELP: &str = "\
mgmt-server serve --pki DIR --state DIR [OPTIONS]

Serves protocol v1 (HTTPS, /api/v1/checkin and /api/v1/results) and the admin
API (plain HTTP, loopback only, /admin/v1/...). See docs/protocol.md.

Options:
  --listen ADDR          agent API address (default 127.0.0.1:8443; port 0 picks one)
  --admin-listen ADDR    admin API address, loopback only (default 127.0.0.1:8080)
  --pki DIR              directory made by `mgmt-server init-pki` (required)
  --state DIR            where agents, jobs and results are kept (required)
  --no-client-auth       do not ask agents for client certificates (by default
                         they are required whenever DIR has agent-cert.pem)
  --max-wait SECONDS     longest a check-in is held (long-poll), default 300
  --ready-file PATH      also write the `listening ...` line to PATH once bound
  -h, --help             this text

Once both listeners are bound it prints one line on stdout:
  listening https://127.0.0.1:PORT admin http://127.0.0.1:PORT2
and then logs one line per request on stderr.
";

fn usage_error(msg: &str, help: &str) -> ! {
    eprint!("mgmt-server: {msg}\n\n{help}");
    std::process::exit(2);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cmd = args.first().map(String::as_str).unwrap_or("help");
    let rest = if args.is_empty() { &[][..] } else { &args[1..] };
    let r = match cmd {
        "help" | "--help" | "-h" => {
            print!("{HELP}");
            Ok(())
        }
        "--version" | "-V" => {
            println!("mgmt-server {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        "init-pki" => init_pki(rest),
        "serve" => serve(rest),
        "agent-cert" => agent_cert(rest),
        other => usage_error(&format!("unknown command {other:?}"), HELP),
    };
    if let Err(e) = r {
        eprintln!("mgmt-server {cmd}: error: {e:#}");
        std::process::exit(1);
    }
}

fn init_pki(args: &[String]) -> anyhow::Result<()> {
    if args.iter().any(|a| a == "-h" || a == "--help") {
        print!("{INIT_PKI_HELP}");
        return Ok(());
    }
    let mut dir: Option<PathBuf> = None;
    let mut sans: Vec<String> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--san" => match it.next() {
                Some(n) if !n.is_empty() && !n.starts_with('-') => sans.push(n.clone()),
                _ => usage_error("--san needs a name", INIT_PKI_HELP),
            },
            d if !d.starts_with('-') && dir.is_none() => dir = Some(PathBuf::from(d)),
            _ => usage_error(&format!("unexpected arguments {args:?}"), INIT_PKI_HELP),
        }
    }
    let Some(dir) = dir else { usage_error("init-pki needs a directory", INIT_PKI_HELP) };
    server::pki::init_pki_with_sans(&dir, &sans)?;
    println!("wrote a test PKI to {}", dir.display());
    Ok(())
}

fn agent_cert(args: &[String]) -> anyhow::Result<()> {
    let (mut pki, mut uuid, mut out) = (None, None, None);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (a.as_str(), None),
        };
        let mut value = || {
            inline.clone().or_else(|| it.next().cloned()).unwrap_or_else(|| {
                usage_error(&format!("{flag} needs a value"), AGENT_CERT_HELP);
            })
        };
        match flag {
            "-h" | "--help" => {
                print!("{AGENT_CERT_HELP}");
                return Ok(());
            }
            "--pki" => pki = Some(PathBuf::from(value())),
            "--vm-uuid" => uuid = Some(value()),
            "--out" => out = Some(PathBuf::from(value())),
            other => usage_error(&format!("unknown option {other:?}"), AGENT_CERT_HELP),
        }
    }
    let (Some(pki), Some(uuid), Some(out)) = (pki, uuid, out) else {
        usage_error("--pki, --vm-uuid and --out are required", AGENT_CERT_HELP)
    };
    server::pki::agent_cert(&pki, &uuid, &out)?;
    println!("wrote a client certificate for VM {} to {}", uuid.to_ascii_lowercase(), out.display());
    Ok(())
}

fn serve(args: &[String]) -> anyhow::Result<()> {
    let mut o = ServeOptions {
        listen: "127.0.0.1:8443".into(),
        admin_listen: "127.0.0.1:8080".into(),
        pki: PathBuf::new(),
        state: PathBuf::new(),
        client_auth: None,
        max_wait_seconds: server::DEFAULT_MAX_WAIT_SECONDS,
        ready_file: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (a.as_str(), None),
        };
        let mut value = |name: &str| -> String {
            inline.clone().or_else(|| it.next().cloned()).unwrap_or_else(|| {
                usage_error(&format!("{name} needs a value"), SERVE_HELP);
            })
        };
        match flag {
            "-h" | "--help" => {
                print!("{SERVE_HELP}");
                return Ok(());
            }
            "--listen" => o.listen = value(flag),
            "--admin-listen" => o.admin_listen = value(flag),
            "--pki" => o.pki = value(flag).into(),
            "--state" => o.state = value(flag).into(),
            "--ready-file" => o.ready_file = Some(value(flag).into()),
            "--no-client-auth" => o.client_auth = Some(false),
            "--max-wait" => {
                let v = value(flag);
                o.max_wait_seconds = v.parse().unwrap_or_else(|_| {
                    usage_error(&format!("--max-wait {v:?} is not a number of seconds"), SERVE_HELP)
                });
            }
            other => usage_error(&format!("unknown option {other:?}"), SERVE_HELP),
        }
    }
    if o.pki.as_os_str().is_empty() {
        usage_error("--pki DIR is required", SERVE_HELP);
    }
    if o.state.as_os_str().is_empty() {
        usage_error("--state DIR is required", SERVE_HELP);
    }
    server::serve(&o)
}
