//! `dlm hold`: run a command while holding a lock.
//!
//! Acquires through a [`dlm::client::LockGuard`] (which renews the lease),
//! runs the command with the grant in its environment, kills it if the
//! lease is lost, releases when it exits and passes its exit status on.
//! Owns the child process and the signals around it; nothing else.
//!
//! Signals: SIGTERM and SIGHUP (a supervisor stopping `dlm hold`, a closed
//! terminal) are passed on to the command, and `dlm hold` waits for it to
//! exit and then releases, as on any exit: it never dies on them and leaves
//! the command running on without the lease being renewed. Before the
//! command runs they stop the connect or the acquire instead (exit 128 +
//! the signal); a lock granted meanwhile runs out with its lease.
//!
//! Process groups: run from a terminal's foreground (interactive), the
//! command shares `dlm hold`'s process group, so that it can read the
//! terminal and Ctrl-C reaches it and everything it started; `dlm hold`
//! survives that Ctrl-C and waits (before the command runs, Ctrl-C ends
//! `dlm hold`). Otherwise (a supervisor, a script, a service) the command
//! gets a process group of its own: SIGTERM, SIGHUP and SIGINT are passed
//! on to that whole group, a lost lease kills the whole group, and when the
//! command exits, whatever it left running in its group is killed before
//! the release, since it would run on without the lock (`sh -c 'job; …'`
//! killed by a signal leaves `job` behind). A process that leaves the group
//! (`setsid`) escapes this. Not covered: a signal while releasing at the
//! end.
//!
//! Nesting: the command gets the hold's client id (`DLM_CLIENT_ID`, so that
//! `dlm append` in it appends under the held grant) and, as
//! `DLM_HOLD_CLIENT_ID`, a note that the id is a hold's. A `dlm hold` inside
//! it that would use that id only by inheritance (no `--client-id` of its
//! own) does not: an acquire by the holder's id is handed the holder's grant,
//! so nested holds of one lock in parallel branches of the command would not
//! exclude each other, and the first to finish would release the grant under
//! the others. It takes an id of its own instead, unless it asks for the very
//! lock the enclosing hold has (`DLM_LOCK`) and that grant is still held
//! (one renewal says so; the environment may be stale): then the command
//! already runs under it, and the nested hold runs its command in its place
//! (it `exec`s it), neither acquiring nor releasing. (Only the directly
//! enclosing hold is known: a hold of a lock held further out waits for it.)

use std::ffi::OsString;
use std::process::ExitStatus;

use futures_util::FutureExt as _;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;

use super::{connect, options, say, Failure, HoldArgs, EXIT_FAILED, EXIT_LOST, EXIT_OK};

/// Runs `dlm hold`; returns the exit status.
pub async fn hold(args: HoldArgs) -> i32 {
    let lock = args.lock.lock.clone().unwrap_or_default();
    let program = args.command[0].to_string_lossy().into_owned();
    // First of all, so that from here on these signals never just end dlm.
    let mut terminations = Terminations::new();
    let stopped = |signal: i32| {
        say(format_args!(
            "dlm: stopped by signal {signal} before lock {lock:?} was acquired; {program} did not run"
        ));
        128 + signal
    };
    // Two holds of one lock must exclude each other: with one shared id,
    // the second would be handed the first one's grant.
    let mut connect_args = args.connect.clone();
    if let Some(enclosing) = Enclosing::from_env() {
        if connect_args.client_id == Some(enclosing.client_id) && !client_id_given(&args) {
            if enclosing.lock == lock && enclosing.is_live(&connect_args).await {
                return run_in_place(&args, &program);
            }
            connect_args.client_id = None;
        }
    }
    let connect_args = connect_args.with_own_client_id();
    let connected = tokio::select! {
        connected = connect(&connect_args, true) => connected,
        signal = terminations.next() => return stopped(signal),
    };
    let client = match connected {
        Ok(client) => client,
        Err(failure) => return fail(failure),
    };
    let acquired = tokio::select! {
        acquired = client.lock(&lock, options(args.wait_ms, args.lease_ms)) => acquired,
        signal = terminations.next() => return stopped(signal),
    };
    let guard = match acquired {
        Ok(guard) => guard,
        Err(e) => return fail(Failure::client(&e, &lock)),
    };
    let own_group = !in_terminal_foreground();
    // Survive Ctrl-C and wait for CMD, so that the lock is released after
    // CMD is done: in the terminal's foreground, the terminal sent it to CMD
    // as well; otherwise CMD is told here. Caught from before CMD starts: a
    // Ctrl-C between its start and here would have ended dlm and left CMD
    // running without the lease renewed.
    let mut interrupts = signal(SignalKind::interrupt()).ok();
    // A Ctrl-C since the lock was granted, before CMD exists: CMD is not
    // started (in the terminal's foreground it would have had it too).
    let caught = interrupts
        .as_mut()
        .is_some_and(|signal| matches!(signal.recv().now_or_never(), Some(Some(()))));
    if caught {
        say(format_args!(
            "dlm: interrupted before {program} started; releasing lock {lock:?}"
        ));
        if let Err(e) = guard.release().await {
            say(format_args!("dlm: {}", Failure::client(&e, &lock).message));
        }
        return 128 + libc::SIGINT;
    }
    let mut command = tokio::process::Command::new(&args.command[0]);
    command
        .args(&args.command[1..])
        .env("DLM_LOCK", &lock)
        .env("DLM_TOKEN", guard.token())
        .env("DLM_FENCING_TOKEN", guard.fence().to_string())
        .envs(connect_args.env())
        .env(HOLD_CLIENT_ID, connect_args.client_id().to_string());
    if own_group {
        command.process_group(0);
    }
    let spawned = command.spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            let code = cannot_run(&program, &e);
            if let Err(e) = guard.release().await {
                say(format_args!("dlm: {}", Failure::client(&e, &lock).message));
            }
            return code;
        }
    };
    let target = Target {
        pid: child.id().and_then(|pid| i32::try_from(pid).ok()),
        group: own_group,
    };
    let mut lost = guard.lease_lost();
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            () = became_true(&mut lost) => {
                say(format_args!("dlm: the lease of lock {lock:?} was lost; stopping {program}"));
                target.signal(libc::SIGKILL);
                let _ = child.wait().await;
                target.kill_leftovers();
                return EXIT_LOST;
            }
            () = interrupted(&mut interrupts) => {
                if own_group {
                    target.signal(libc::SIGINT);
                }
            }
            signal = terminations.next() => target.signal(signal),
        }
    };
    target.kill_leftovers();
    let code = match status {
        Ok(status) => exit_code(status),
        Err(e) => {
            say(format_args!("dlm: lost track of {program}: {e}"));
            EXIT_FAILED
        }
    };
    match guard.release().await {
        Ok(()) => code,
        Err(e) => {
            let failure = Failure::client(&e, &lock);
            say(format_args!(
                "dlm: releasing after {program} exited: {}",
                failure.message
            ));
            if code == EXIT_OK {
                failure.code
            } else {
                code
            }
        }
    }
}

/// Set for a hold's command: the client id in `DLM_CLIENT_ID` is the
/// hold's.
const HOLD_CLIENT_ID: &str = "DLM_HOLD_CLIENT_ID";

/// The `dlm hold` whose command this process runs in, as its environment
/// tells.
struct Enclosing {
    client_id: i32,
    lock: String,
    token: String,
}

impl Enclosing {
    fn from_env() -> Option<Enclosing> {
        let client_id = std::env::var(HOLD_CLIENT_ID).ok()?.parse().ok()?;
        let lock = std::env::var("DLM_LOCK").ok()?;
        let token = std::env::var("DLM_TOKEN").ok()?;
        (!token.is_empty()).then_some(Enclosing {
            client_id,
            lock,
            token,
        })
    }

    /// Whether its grant is still held, on the servers this hold talks to:
    /// renewed (which it may be at any time). The environment may be stale
    /// (a job started inside a hold that outlived it, or variables set by
    /// hand), and a hold must never run its command without the lock.
    async fn is_live(&self, connect_args: &super::ConnectArgs) -> bool {
        let Ok(client) = super::connect(connect_args, false).await else {
            return false;
        };
        let renewed = client.renew_token(&self.lock, &self.token, None).await;
        client.close_connections().await;
        renewed.is_ok()
    }
}

/// Whether `--client-id` is on this hold's own command line (rather than
/// inherited through `DLM_CLIENT_ID`): among the arguments before CMD.
fn client_id_given(args: &HoldArgs) -> bool {
    let all: Vec<OsString> = std::env::args_os().collect();
    let own = all.len().saturating_sub(args.command.len());
    all.iter().take(own).skip(1).any(|arg| {
        let arg = arg.to_string_lossy();
        arg == "--client-id" || arg.starts_with("--client-id=")
    })
}

/// Runs CMD in this process's place, under the enclosing hold's grant of
/// the same lock (its environment is already CMD's); returns only if CMD
/// cannot be run (126, or 127 when it is not found).
fn run_in_place(args: &HoldArgs, program: &str) -> i32 {
    use std::os::unix::process::CommandExt as _;
    let error = std::process::Command::new(&args.command[0])
        .args(&args.command[1..])
        .exec();
    cannot_run(program, &error)
}

/// Says that CMD could not be started; the exit status for it, as a shell's:
/// 127 when it is not found, else 126.
fn cannot_run(program: &str, error: &std::io::Error) -> i32 {
    say(format_args!("dlm: cannot run {program}: {error}"));
    if error.kind() == std::io::ErrorKind::NotFound {
        127
    } else {
        126
    }
}

fn fail(failure: Failure) -> i32 {
    say(format_args!("dlm: {}", failure.message));
    failure.code
}

/// Resolves once `flag` is true; never if its sender goes away first.
async fn became_true(flag: &mut watch::Receiver<bool>) {
    if flag.wait_for(|value| *value).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// SIGTERM and SIGHUP, caught.
struct Terminations {
    streams: Vec<(i32, Signal)>,
}

impl Terminations {
    /// Catches SIGTERM and SIGHUP from now on (each one whose handler can be
    /// installed; one that cannot keeps its default action).
    fn new() -> Terminations {
        let streams = [
            (libc::SIGTERM, SignalKind::terminate()),
            (libc::SIGHUP, SignalKind::hangup()),
        ]
        .into_iter()
        .filter_map(|(number, kind)| Some((number, signal(kind).ok()?)))
        .collect();
        Terminations { streams }
    }

    /// The number of the next one caught.
    async fn next(&mut self) -> i32 {
        let polls = std::future::poll_fn(|cx| {
            for (number, stream) in &mut self.streams {
                if let std::task::Poll::Ready(Some(())) = stream.poll_recv(cx) {
                    return std::task::Poll::Ready(*number);
                }
            }
            std::task::Poll::Pending
        });
        polls.await
    }
}

/// True when this process is in the foreground of the terminal on its
/// standard input (run interactively from a shell).
fn in_terminal_foreground() -> bool {
    // SAFETY: isatty, tcgetpgrp and getpgrp take and return plain integers.
    unsafe { libc::isatty(0) == 1 && libc::tcgetpgrp(0) == libc::getpgrp() }
}

/// Where signals for the command go: its process, or its whole process
/// group (whose id is its pid) when it has one of its own.
struct Target {
    pid: Option<i32>,
    group: bool,
}

impl Target {
    /// Sends `signal` to the command, or to its whole group.
    fn signal(&self, signal: i32) {
        let Some(pid) = self.pid else { return };
        let to = if self.group { -pid } else { pid };
        // SAFETY: kill(2) takes plain integers. The pid is our child's; it
        // is signalled only before it is reaped, except as a group id,
        // which stays taken while any member of the group lives.
        unsafe {
            libc::kill(to, signal);
        }
    }

    /// After the command exited: kills what it left running in its own
    /// group (nothing to do when it shares ours).
    fn kill_leftovers(&self) {
        if self.group {
            self.signal(libc::SIGKILL);
        }
    }
}

/// Resolves on the next SIGINT; never if there is no handler.
async fn interrupted(interrupts: &mut Option<Signal>) {
    let ended = match interrupts {
        Some(signal) => signal.recv().await.is_none(),
        None => std::future::pending().await,
    };
    if ended {
        *interrupts = None;
    }
}

/// The shell's convention: the exit code, or 128 + the signal that ended it.
fn exit_code(status: ExitStatus) -> i32 {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = status.signal() {
            return 128 + signal;
        }
    }
    status.code().unwrap_or(EXIT_FAILED)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signalled_command_exits_with_128_plus_the_signal() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(exit_code(ExitStatus::from_raw(9)), 137);
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
    }
}
