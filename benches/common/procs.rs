//! Servers as child processes: loopback only, output to a log file, killed
//! when their guard drops, and — through `PR_SET_PDEATHSIG` — when the bench
//! process dies for any reason, so no server outlives a run.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A running child process; dropping it kills it (SIGKILL) and reaps it.
pub struct ChildGuard {
    pub name: String,
    child: Child,
}

impl ChildGuard {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Stops the process now.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `command` with stdout and stderr appended to `log` (stdout piped
/// instead when `pipe_stdout`), dying with the bench process.
///
/// # Errors
/// When the program can not be started.
pub fn spawn(
    name: &str,
    mut command: Command,
    log: &Path,
    pipe_stdout: bool,
) -> std::io::Result<ChildGuard> {
    let out = File::options().create(true).append(true).open(log)?;
    let err = out.try_clone()?;
    command
        .stdin(Stdio::null())
        .stdout(if pipe_stdout {
            Stdio::piped()
        } else {
            Stdio::from(out)
        })
        .stderr(Stdio::from(err));
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn()?;
    Ok(ChildGuard {
        name: name.to_owned(),
        child,
    })
}

/// Reads the child's stdout until a line contains `needle`, for at most
/// `timeout`; returns that line. The rest of stdout is drained in the
/// background so the child never blocks on a full pipe.
///
/// # Errors
/// When the line does not come in time or stdout closes first.
pub fn wait_for_line(
    guard: &mut ChildGuard,
    needle: &str,
    timeout: Duration,
) -> std::io::Result<String> {
    let stdout = guard
        .child
        .stdout
        .take()
        .ok_or_else(|| std::io::Error::other("stdout is not piped"))?;
    let (tx, rx) = mpsc::channel();
    let needle = needle.to_owned();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let mut sent = false;
        // Bounded: ends when the child closes stdout (it is killed at the latest
        // when its guard drops).
        while let Some(Ok(line)) = lines.next() {
            if !sent && line.contains(&needle) {
                let _ = tx.send(line);
                sent = true;
            }
        }
    });
    rx.recv_timeout(timeout).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("{} did not print its ready line in time", guard.name),
        )
    })
}

/// A port on 127.0.0.1 that was free a moment ago.
///
/// # Errors
/// When no socket can be bound.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Waits until something accepts TCP connections on 127.0.0.1:`port`, for at
/// most `timeout`.
///
/// # Errors
/// On timeout.
pub fn wait_for_port(port: u16, timeout: Duration) -> std::io::Result<()> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("nothing listens on 127.0.0.1:{port}"),
    ))
}

/// The path of an installed program, if it is on PATH.
pub fn which(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}
