//! The one place external commands are run (growpart, mkfs, mount, systemctl...).
//!
//! Every command is logged with its full command line, runs with `LC_ALL=C`
//! and no stdin, and its stderr is kept for the error message. Arguments are
//! passed as a vector: nothing from a job is ever interpolated into a shell
//! line. A [`Runner`] in dry-run mode records the plan instead of running the
//! mutating commands (read-only probes still run, so the plan is accurate).
use std::ffi::{OsStr, OsString};
use std::process::{Command, Stdio};
use std::sync::{Mutex, PoisonError};

/// What a finished command gave back.
#[derive(Debug, Clone)]
pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// A command failed to start or exited non-zero where that was not allowed.
#[derive(Debug)]
pub struct CmdError {
    pub cmdline: String,
    pub code: Option<i32>,
    pub stderr: String,
}

impl std::fmt::Display for CmdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.code {
            Some(c) => write!(f, "`{}` exited with {}", self.cmdline, c)?,
            None => write!(f, "`{}` could not be started", self.cmdline)?,
        }
        let err = self.stderr.trim();
        if !err.is_empty() {
            write!(f, ": {err}")?;
        }
        Ok(())
    }
}
impl std::error::Error for CmdError {}

/// Runs external commands; optionally only records the ones that would change
/// something (`--dry-run`).
#[derive(Default)]
pub struct Runner {
    dry_run: bool,
    plan: Mutex<Vec<String>>,
}

/// Render a command line for logs and plans, quoting words that need it.
pub fn render<S: AsRef<OsStr>>(prog: &str, args: &[S]) -> String {
    let mut s = String::from(prog);
    for a in args {
        let a = a.as_ref().to_string_lossy();
        s.push(' ');
        if !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,@+%".contains(c)) {
            s.push_str(&a);
        } else {
            s.push('\'');
            s.push_str(&a.replace('\'', r"'\''"));
            s.push('\'');
        }
    }
    s
}

impl Runner {
    pub fn new(dry_run: bool) -> Self {
        Runner { dry_run, plan: Mutex::new(Vec::new()) }
    }

    pub fn dry_run(&self) -> bool {
        self.dry_run
    }

    /// The commands a dry run would have executed, in order.
    pub fn plan(&self) -> Vec<String> {
        self.plan.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Record a step of the plan that is not an external command (for
    /// example "write /etc/fstab").
    pub fn note(&self, step: impl Into<String>) {
        self.plan.lock().unwrap_or_else(PoisonError::into_inner).push(step.into());
    }

    /// Run a read-only probe: always executed, even in dry-run mode. Returns
    /// the output whatever the exit code.
    pub fn probe<S: AsRef<OsStr>>(&self, prog: &str, args: &[S]) -> Result<Output, CmdError> {
        exec(prog, args)
    }

    /// Run a command that changes the system; `ok_codes` lists the exit
    /// codes that are not failures. In dry-run mode it is only recorded and
    /// reported as exit code 0.
    pub fn run<S: AsRef<OsStr>>(&self, prog: &str, args: &[S], ok_codes: &[i32]) -> Result<Output, CmdError> {
        let line = render(prog, args);
        if self.dry_run {
            self.note(line);
            return Ok(Output { code: 0, stdout: String::new(), stderr: String::new() });
        }
        self.plan.lock().unwrap_or_else(PoisonError::into_inner).push(line.clone());
        let out = exec(prog, args)?;
        if ok_codes.contains(&out.code) {
            Ok(out)
        } else {
            Err(CmdError { cmdline: line, code: Some(out.code), stderr: pick_error_text(&out) })
        }
    }

    /// `run` with `input` written to the command's stdin (for tools that
    /// read a script there, like `sfdisk`). The plan shows the input.
    pub fn run_input<S: AsRef<OsStr>>(
        &self,
        prog: &str,
        args: &[S],
        input: &str,
        ok_codes: &[i32],
    ) -> Result<Output, CmdError> {
        let line = format!("{} <<< {:?}", render(prog, args), input);
        self.plan.lock().unwrap_or_else(PoisonError::into_inner).push(line.clone());
        if self.dry_run {
            return Ok(Output { code: 0, stdout: String::new(), stderr: String::new() });
        }
        let out = exec_input(prog, args, Some(input))?;
        if ok_codes.contains(&out.code) {
            Ok(out)
        } else {
            Err(CmdError { cmdline: line, code: Some(out.code), stderr: pick_error_text(&out) })
        }
    }

    /// `run` with only exit code 0 accepted.
    pub fn run_ok<S: AsRef<OsStr>>(&self, prog: &str, args: &[S]) -> Result<Output, CmdError> {
        self.run(prog, args, &[0])
    }
}

fn pick_error_text(out: &Output) -> String {
    if out.stderr.trim().is_empty() {
        out.stdout.clone()
    } else {
        out.stderr.clone()
    }
}

/// Execute `prog args...` with `LC_ALL=C`, stdin closed, output captured.
pub fn exec<S: AsRef<OsStr>>(prog: &str, args: &[S]) -> Result<Output, CmdError> {
    exec_input(prog, args, None)
}

/// [`exec`], optionally feeding `input` on stdin.
fn exec_input<S: AsRef<OsStr>>(prog: &str, args: &[S], input: Option<&str>) -> Result<Output, CmdError> {
    let line = render(prog, args);
    tracing::debug!(command = %line, "running");
    let args: Vec<OsString> = args.iter().map(|a| a.as_ref().to_os_string()).collect();
    let mut cmd = Command::new(prog);
    cmd.args(&args).env("LC_ALL", "C").env("LANG", "C").env("PATH", default_path());
    let err = |e: std::io::Error| CmdError { cmdline: line.clone(), code: None, stderr: e.to_string() };
    let out = match input {
        None => cmd.stdin(Stdio::null()).output().map_err(err)?,
        Some(text) => {
            let mut child =
                cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().map_err(err)?;
            if let Some(mut stdin) = child.stdin.take() {
                use std::io::Write;
                let _ = stdin.write_all(text.as_bytes());
            }
            child.wait_with_output().map_err(err)?
        }
    };
    let code = out.status.code().unwrap_or(-1);
    let o = Output {
        code,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    if code != 0 {
        tracing::debug!(command = %line, code, stderr = %o.stderr.trim(), "command exited non-zero");
    }
    Ok(o)
}

/// PATH for child tools: the inherited one plus the sbin directories, which a
/// minimal service environment may lack.
pub fn default_path() -> OsString {
    let mut p = std::env::var_os("PATH").unwrap_or_default();
    for d in ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"] {
        let has = std::env::split_paths(&p).any(|x| x == std::path::Path::new(d));
        if !has {
            if !p.is_empty() {
                p.push(":");
            }
            p.push(d);
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_quotes_words_that_need_it() {
        assert_eq!(render("mkfs.ext4", &["-L", "my data", "/dev/x"]), "mkfs.ext4 -L 'my data' /dev/x");
        assert_eq!(render("echo", &["it's"]), r"echo 'it'\''s'");
    }

    #[test]
    fn dry_run_records_and_does_not_execute() {
        let r = Runner::new(true);
        r.run_ok("false", &[] as &[&str]).unwrap();
        assert_eq!(r.plan(), vec!["false".to_string()]);
    }

    #[test]
    fn run_input_feeds_stdin() {
        let r = Runner::new(false);
        let o = r.run_input("cat", &[] as &[&str], "hello", &[0]).unwrap();
        assert_eq!(o.stdout, "hello");
        assert!(r.plan()[0].starts_with("cat <<< "));
    }

    #[test]
    fn failure_names_command_and_stderr() {
        let r = Runner::new(false);
        let e = r.run_ok("sh", &["-c", "echo boom >&2; exit 3"]).unwrap_err();
        let s = e.to_string();
        assert!(s.contains("exited with 3") && s.contains("boom"), "{s}");
    }
}
