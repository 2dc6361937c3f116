//! The daemon's states and its one transition function, pure: no I/O, no
//! clock, so every transition is a unit test (below). `mod.rs` does what a
//! state does, turns the outcome into an [`Event`] and asks [`State::next`]
//! where to go. The picture is in docs/architecture.md ("The daemon").
//!
//! To add a state: a variant here, its transitions in [`State::next`] (a
//! pair not listed there is a bug: it fails a debug assertion, and a release
//! build stays where it is), its work in `Daemon::tick`, and a test.

/// Where the daemon is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// No `server_url` yet (a fresh package install): said once on entry,
    /// then wait for SIGHUP; never exit, so the service does not crash-loop.
    AwaitingConfig,
    /// A server is configured; build the agent (client certificates, the
    /// state directory's lock). On failure say why and retry every 60 s or
    /// on SIGHUP.
    Starting,
    /// Checking in; the last cycle succeeded (or none ran yet). The next
    /// cycle comes at once (jobs came) or after the rest of the interval.
    Running,
    /// The last cycle failed: the next one after a backoff delay. Entering
    /// it is logged once (a warning), leaving it once ("reachable again").
    Backoff,
    /// SIGTERM or SIGINT: the loop ends (the signal thread ends the process
    /// once no job of this process runs).
    Stopping,
}

/// What happened in a state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The configuration in force after a reload (applied or not: a failed
    /// reload keeps the old one); whether it names a server.
    Configured { has_server: bool },
    /// The agent was built.
    Started,
    /// Building the agent failed; no reload came while waiting to retry.
    StartFailed,
    /// A check-in cycle succeeded.
    CycleOk,
    /// A check-in cycle failed.
    CycleFailed,
    /// The shutdown flag is set.
    Shutdown,
}

impl State {
    /// The state the daemon begins in, for the configuration it was given.
    pub fn initial(has_server: bool) -> State {
        if has_server {
            State::Starting
        } else {
            State::AwaitingConfig
        }
    }

    /// The one transition function.
    pub fn next(self, ev: Event) -> State {
        use Event::*;
        use State::*;
        match (self, ev) {
            (_, Shutdown) | (Stopping, _) => Stopping,
            (AwaitingConfig | Starting, Configured { has_server }) => State::initial(has_server),
            (Starting, Started) => Running,
            (Starting, StartFailed) => Starting,
            (Running | Backoff, CycleOk) => Running,
            (Running | Backoff, CycleFailed) => Backoff,
            (s, e) => {
                debug_assert!(false, "no transition from {s:?} on {e:?}");
                s
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Event::*;
    use super::State::*;
    use super::*;

    /// Walk `events` from `from`; every state on the way.
    fn walk(from: State, events: &[Event]) -> Vec<State> {
        let mut s = from;
        events
            .iter()
            .map(|e| {
                s = s.next(*e);
                s
            })
            .collect()
    }

    #[test]
    fn happy_path_from_a_fresh_install() {
        let s = State::initial(false);
        assert_eq!(s, AwaitingConfig);
        assert_eq!(
            walk(
                s,
                &[
                    Configured { has_server: false }, // SIGHUP, still no server
                    Configured { has_server: true },
                    Started,
                    CycleOk,
                    CycleOk,
                    Shutdown
                ]
            ),
            [AwaitingConfig, Starting, Running, Running, Running, Stopping]
        );
    }

    #[test]
    fn a_configured_server_starts_at_once() {
        assert_eq!(State::initial(true), Starting);
        assert_eq!(Starting.next(Started), Running);
    }

    #[test]
    fn failures_back_off_and_recover() {
        assert_eq!(
            walk(Running, &[CycleFailed, CycleFailed, CycleOk, CycleFailed]),
            [Backoff, Backoff, Running, Backoff]
        );
    }

    #[test]
    fn a_start_that_fails_is_retried_and_a_reload_is_taken() {
        assert_eq!(
            walk(Starting, &[StartFailed, StartFailed, Configured { has_server: true }, Started]),
            [Starting, Starting, Starting, Running]
        );
        // A reload that takes the server away waits for one again.
        assert_eq!(Starting.next(Configured { has_server: false }), AwaitingConfig);
    }

    #[test]
    fn shutdown_wins_everywhere_and_stopping_is_final() {
        for s in [AwaitingConfig, Starting, Running, Backoff, Stopping] {
            assert_eq!(s.next(Shutdown), Stopping, "from {s:?}");
        }
        for e in [Configured { has_server: true }, Started, StartFailed, CycleOk, CycleFailed] {
            assert_eq!(Stopping.next(e), Stopping, "on {e:?}");
        }
    }

    #[test]
    #[should_panic(expected = "no transition from Running on Started")]
    fn an_unlisted_transition_is_a_bug() {
        let _ = Running.next(Started);
    }
}
