//! Reboot and Shutdown, exactly once.
//!
//! The job itself only records the request (`power-pending.json` in the
//! state directory, written atomically) and answers `succeeded` with the
//! plan. The daemon calls [`after_delivery`] after delivering results: when
//! the spool is empty (this job's result is stored by the server), it waits
//! `delay_seconds`, removes the request durably, and only then asks the init
//! system. So the result is recorded and delivered before anything happens,
//! and a request is acted on at most once: the job id is in the seen list
//! before it runs (a redelivered job does not run again) and the request is
//! gone before the init system is asked (a restart, or the boot after the
//! reboot, finds nothing to do: no reboot loop). `xcp-vm-agent exec` acts
//! right after printing the result.
//!
//! The init system: systemd (`systemctl reboot|poweroff`), OpenRC's own init
//! (`openrc-shutdown`), SysV and OpenRC on sysvinit (`shutdown`); when the
//! command cannot run or fails, the kernel's last resort (`sync`,
//! `reboot(2)`). `XCP_AGENT_POWER_HOOK` (tests only) names a program run
//! with the command line instead, at the very last step.
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;

use crate::context::JobContext;
use crate::logging::now_unix;
use crate::protocol::JobResult;

pub const HOOK_ENV: &str = "XCP_AGENT_POWER_HOOK";
const PENDING: &str = "power-pending.json";
const MAX_DELAY: u64 = 3600;

const DEFAULT_DELAY: u64 = 5;

/// The init system in use and the command asking it for `action`
/// ("reboot" or "poweroff"); `None` for the kernel's last resort.
pub fn plan(action: &str) -> (&'static str, Option<Vec<String>>) {
    let v = |a: &[&str]| Some(a.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    let reboot = action == "reboot";
    if Path::new("/run/systemd/system").is_dir() {
        return ("systemd", v(&["systemctl", action]));
    }
    let pid1 = std::fs::read_to_string("/proc/1/comm").unwrap_or_default();
    if pid1.trim() == "openrc-init" {
        return ("openrc", v(&["openrc-shutdown", if reboot { "-r" } else { "-p" }, "now"]));
    }
    if ["/sbin/shutdown", "/usr/sbin/shutdown"].iter().any(|p| Path::new(p).exists()) {
        let name = if Path::new("/run/openrc").exists() { "openrc" } else { "sysv" };
        return (name, if reboot { v(&["shutdown", "-r", "now"]) } else { v(&["shutdown", "-h", "-P", "now"]) });
    }
    ("kernel", None)
}

/// Reboot (`action` "reboot") and Shutdown ("poweroff").
pub fn run(ctx: &JobContext, params: &serde_json::Value, action: &str) -> JobResult {
    let op = if action == "reboot" { "Reboot" } else { "Shutdown" };
    let delay = match super::params(op, params, &["delay_seconds"]).and_then(|m| super::opt_u64(op, m, "delay_seconds"))
    {
        Ok(d) => d.unwrap_or(DEFAULT_DELAY),
        Err(r) => return r,
    };
    if delay > MAX_DELAY {
        return JobResult::refused(format!("delay_seconds must be at most {MAX_DELAY} (got {delay})"));
    }
    let (init, cmd) = plan(action);
    let cmd_text = cmd.as_ref().map(|c| c.join(" ")).unwrap_or_else(|| format!("sync; reboot(2) {action}"));
    let details = json!({"action": action, "init_system": init, "command": cmd_text, "delay_seconds": delay});
    if ctx.runner.dry_run() {
        ctx.runner.note(format!(
            "once this result is delivered: wait {delay} s, remove the request (never acted on twice), {cmd_text} \
             (if that fails: sync, reboot(2))"
        ));
        return JobResult::succeeded(format!("would {action} through {init}")).with_details(details);
    }
    let path = ctx.state_dir.join(PENDING);
    if let Ok(t) = std::fs::read_to_string(&path) {
        return JobResult::no_change(format!("a request is already pending: {}", t.trim())).with_details(details);
    }
    let pending = json!({"action": action, "delay_seconds": delay, "requested_at": now_unix()});
    let written = std::fs::create_dir_all(&ctx.state_dir)
        .map_err(anyhow::Error::from)
        .and_then(|_| crate::state::write_atomic(&path, pending.to_string().as_bytes()));
    if let Err(e) = written {
        return JobResult::failed(format!("{e:#}"));
    }
    JobResult::succeeded(format!("{action} through {init} ({cmd_text}) {} s after this result is delivered", delay))
        .with_details(details)
}

/// Act on a pending request once every result is delivered (`undelivered`
/// is what is still in the spool). `sleep` waits the delay (the daemon
/// wakes early on shutdown). Returns whether the init system was asked.
pub fn after_delivery(state_dir: &Path, undelivered: usize, sleep: impl Fn(Duration)) -> bool {
    let path = state_dir.join(PENDING);
    let Ok(text) = std::fs::read_to_string(&path) else { return false };
    if undelivered > 0 {
        return false;
    }
    let pending: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    let action = if pending["action"] == "reboot" { "reboot" } else { "poweroff" };
    sleep(Duration::from_secs(pending["delay_seconds"].as_u64().unwrap_or(0)));
    // Gone for good before the init system hears of it: at most once. (An
    // unreadable request is dropped the same way, and not acted on.)
    let removed = std::fs::remove_file(&path).and_then(|_| std::fs::File::open(state_dir).and_then(|d| d.sync_all()));
    if removed.is_err() || !pending["action"].is_string() {
        tracing::error!("power request {}: not acted on ({removed:?})", path.display());
        return false;
    }
    ask(action);
    true
}

fn ask(action: &str) {
    let (init, cmd) = plan(action);
    let hook = std::env::var(HOOK_ENV).ok();
    let c = cmd.unwrap_or_else(|| vec!["reboot(2)".into(), action.into()]);
    tracing::warn!("{action}: asking {init}: {} {}", hook.as_deref().unwrap_or(""), c.join(" "));
    if let Some(h) = hook {
        let _ = crate::runner::exec(&h, &c);
        return;
    }
    if init != "kernel" {
        if let Ok(o) = crate::runner::exec(&c[0], &c[1..]).map(|o| o.code == 0) {
            if o {
                return;
            }
        }
    }
    let cmd = if action == "reboot" { nix::libc::RB_AUTOBOOT } else { nix::libc::RB_POWER_OFF };
    // SAFETY: plain system calls; reboot(2) does not return on success.
    unsafe {
        nix::libc::sync();
        nix::libc::reboot(cmd);
    }
}
