//! The agent's command line as a clap `Command`, built from the agent's own
//! table (`xcp_vm_agent::cli::COMMANDS`), for the man page and the shell
//! completions. The agent parses its arguments without clap (size), so this
//! is the only place clap sees them; a test checks the two agree.
use clap::{Arg, ArgAction, Command};
use xcp_vm_agent::cli::{Opt, ABOUT, COMMANDS, GLOBAL, LONG_ABOUT, NAME};

fn arg(o: &Opt, global: bool) -> Arg {
    let a = Arg::new(o.long).long(o.long).help(o.help).global(global);
    match o.value {
        Some(v) => a.value_name(v).required(o.required).action(ArgAction::Set),
        None => a.action(ArgAction::SetTrue),
    }
}

pub fn agent_command(version: &'static str) -> Command {
    let mut c = Command::new(NAME).version(version).about(ABOUT).long_about(LONG_ABOUT).subcommand_required(true);
    for o in GLOBAL {
        c = c.arg(arg(o, true));
    }
    for s in COMMANDS {
        let mut sc = Command::new(s.name).about(s.about);
        for o in s.opts {
            sc = sc.arg(arg(o, false));
        }
        c = c.subcommand(sc);
    }
    c
}

#[cfg(test)]
mod tests {
    #[test]
    fn clap_view_is_valid_and_complete() {
        let mut c = super::agent_command("0");
        c.build();
        for s in xcp_vm_agent::cli::COMMANDS {
            let sc = c.find_subcommand(s.name).unwrap();
            let mut longs: Vec<&str> = sc.get_arguments().filter_map(|a| a.get_long()).collect();
            longs.sort();
            let mut want: Vec<&str> = s.opts.iter().map(|o| o.long).chain(["config", "help"]).collect();
            want.sort();
            assert_eq!(longs, want, "{}", s.name);
        }
    }
}
