//! Black-box tests of the `dlm` command line: every client command runs as
//! its own process against a real `dlm server` on loopback, with a temporary
//! grant-file directory per test. Nothing here sleeps to wait for an event:
//! tests wait for a child process to exit, or poll `dlm status` until the
//! server shows what they wait for, and every such wait is bounded. Every
//! scenario with a server runs over every transport (`over_every_wire!` at
//! the bottom), with that transport's flags on every command.

// Only the core is barred from spawning threads (clippy.toml); tests may.
#![allow(clippy::disallowed_methods)]

#[macro_use]
mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{dlm_bin, ServerProcess, Wire};

/// Exit statuses of the client commands (see `dlm --help`).
const EXIT_FAILED: i32 = 1;
const EXIT_USAGE: i32 = 2;
const EXIT_BUSY: i32 = 3;
const EXIT_LOST: i32 = 4;
const EXIT_UNAVAILABLE: i32 = 5;

/// The longest any single CLI process may take before the test fails.
const PROCESS_LIMIT: Duration = Duration::from_secs(60);

/// Environment variables the CLI reads; cleared so that the caller's
/// environment cannot change what a test does.
const CLI_ENV: &[&str] = &[
    "DLM_SERVER",
    "DLM_TRANSPORT",
    "DLM_TLS",
    "DLM_CA",
    "DLM_CERT",
    "DLM_KEY",
    "DLM_CLIENT_ID",
    "DLM_RETRY_BUDGET_MS",
    "DLM_STATE_DIR",
    "DLM_LOCK",
    "DLM_TOKEN",
    "DLM_FENCING_TOKEN",
    "DLM_HOLD_CLIENT_ID",
    "XDG_STATE_HOME",
    "RUST_LOG",
];

/// What a finished CLI process left behind.
#[derive(Debug)]
struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Outcome {
    /// Panics unless the process exited with `code`.
    #[track_caller]
    fn expect_code(self, code: i32) -> Outcome {
        assert_eq!(self.code, Some(code), "unexpected exit status: {self:#?}");
        self
    }

    /// Panics unless the process succeeded.
    #[track_caller]
    fn ok(self) -> Outcome {
        self.expect_code(0)
    }

    /// Panics unless stderr is exactly one line, `dlm: …`; returns it.
    #[track_caller]
    fn one_line_reason(&self) -> &str {
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "expected one line on stderr: {self:#?}");
        assert!(lines[0].starts_with("dlm: "), "{self:#?}");
        assert!(lines[0].len() > "dlm: ".len(), "{self:#?}");
        lines[0]
    }

    /// The fencing number of `acquired lock "…" fence N`.
    #[track_caller]
    fn fence(&self) -> u64 {
        self.stdout
            .trim()
            .strip_prefix("acquired lock ")
            .and_then(|rest| rest.rsplit_once(" fence "))
            .and_then(|(_, fence)| fence.parse().ok())
            .unwrap_or_else(|| panic!("no fencing number in {self:#?}"))
    }
}

/// A CLI process still running; killed if dropped before it finishes.
struct Running {
    child: Option<Child>,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
    what: String,
}

impl Running {
    fn spawn(mut command: Command) -> Running {
        let what = format!("{command:?}");
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
        let drain = |mut pipe: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut bytes = Vec::new();
                let _ = pipe.read_to_end(&mut bytes);
                String::from_utf8_lossy(&bytes).into_owned()
            })
        };
        let stdout = drain(Box::new(child.stdout.take().expect("stdout")));
        let stderr = drain(Box::new(child.stderr.take().expect("stderr")));
        Running {
            child: Some(child),
            stdout: Some(stdout),
            stderr: Some(stderr),
            what,
        }
    }

    /// Sends `signal` to the process.
    fn signal(&self, signal: i32) {
        common::send_signal(self.child.as_ref().expect("not finished yet"), signal);
    }

    /// Whether the process has exited.
    fn has_exited(&mut self) -> bool {
        let child = self.child.as_mut().expect("not finished yet");
        child.try_wait().expect("try_wait").is_some()
    }

    /// Waits (at most `limit`) for the process to exit; kills it and fails
    /// the test if it does not.
    #[track_caller]
    fn finish(mut self, limit: Duration) -> Outcome {
        let mut child = self.child.take().expect("not finished yet");
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{} did not exit within {limit:?}", self.what);
            }
            // Bounded polling of the child's exit, not a synchronisation sleep.
            std::thread::sleep(Duration::from_millis(5));
        };
        let stdout = self.stdout.take().expect("stdout").join().expect("stdout");
        let stderr = self.stderr.take().expect("stderr").join().expect("stderr");
        Outcome {
            code: status.code(),
            stdout,
            stderr,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `dlm` commands against one server with one grant-file directory
/// (given to every command as `DLM_STATE_DIR`).
struct Cli {
    /// `--server ADDR` and the transport flags.
    flags: Vec<String>,
    state: tempfile::TempDir,
}

impl Cli {
    /// Commands for `server` over its transport.
    fn new(server: &ServerProcess) -> Cli {
        Cli {
            flags: server.cli_flags(),
            state: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// Commands for plain gRPC at `addr`.
    fn at(addr: &str) -> Cli {
        Cli {
            flags: vec!["--server".to_owned(), addr.to_owned()],
            state: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// The grant-file directory.
    fn state_dir(&self) -> &Path {
        self.state.path()
    }

    /// `dlm SUBCOMMAND --server ADDR [TRANSPORT FLAGS] ARGS…` with a clean
    /// environment.
    fn command(&self, subcommand: &str, args: &[&str]) -> Command {
        let mut command = Command::new(dlm_bin());
        for var in CLI_ENV {
            command.env_remove(var);
        }
        command
            .env("DLM_STATE_DIR", self.state_dir())
            .arg(subcommand)
            .args(&self.flags)
            .args(args);
        command
    }

    /// Runs a command to completion.
    #[track_caller]
    fn run(&self, subcommand: &str, args: &[&str]) -> Outcome {
        self.spawn(subcommand, args).finish(PROCESS_LIMIT)
    }

    /// Starts a command in the background.
    fn spawn(&self, subcommand: &str, args: &[&str]) -> Running {
        Running::spawn(self.command(subcommand, args))
    }

    /// `dlm hold --client-id 3 --lock LOCK -- sh -c SCRIPT sh FILE` in the
    /// background: the script gets FILE as `$1`.
    fn hold_sh(&self, lock: &str, script: &str, file: &Path) -> Running {
        let file = file.to_str().expect("utf-8 path");
        let args = [
            "--client-id",
            "3",
            "--lock",
            lock,
            "--",
            "sh",
            "-c",
            script,
            "sh",
            file,
        ];
        self.spawn("hold", &args)
    }

    /// `dlm cat FILE`, which must succeed.
    #[track_caller]
    fn cat(&self, file: &str) -> String {
        self.run("cat", &[file]).ok().stdout
    }

    /// Rows of `dlm status`, split into columns.
    #[track_caller]
    fn status_rows(&self) -> Vec<Vec<String>> {
        self.run("status", &[])
            .ok()
            .stdout
            .lines()
            .map(|line| line.split_whitespace().map(str::to_owned).collect())
            .collect()
    }

    /// The status row of `lock`: `[name, holder, fence, lease, staged, waiters]`
    /// (the waiters joined back into one column), if the lock is listed.
    #[track_caller]
    fn lock_row(&self, lock: &str) -> Option<[String; 6]> {
        let name = format!("{lock:?}");
        self.status_rows()
            .into_iter()
            .find(|row| row.first() == Some(&name))
            .map(|row| {
                assert!(row.len() >= 6, "short status row {row:?}");
                [
                    row[0].clone(),
                    row[1].clone(),
                    row[2].clone(),
                    row[3].clone(),
                    row[4].clone(),
                    row[5..].join(" "),
                ]
            })
    }

    /// Polls `dlm status` until `lock`'s waiters read exactly `waiters`
    /// (e.g. "2"); bounded.
    #[track_caller]
    fn until_waiters(&self, lock: &str, waiters: &str) -> [String; 6] {
        let deadline = Instant::now() + PROCESS_LIMIT;
        loop {
            if let Some(row) = self.lock_row(lock) {
                if row[5] == waiters {
                    return row;
                }
            }
            assert!(
                Instant::now() < deadline,
                "lock {lock:?} never showed waiters {waiters:?}"
            );
        }
    }

    /// Path of the grant file of the default lock for `client` in `dir`.
    fn grant_file(dir: &Path, client: i32) -> PathBuf {
        dir.join(format!("client-{client}.lock-.grant"))
    }
}

/// An address on which nothing listens: a loopback port bound and freed
/// again at once (never connected, so immediately closed).
fn closed_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("local addr").to_string();
    drop(listener);
    addr
}

fn acquire_two_appends_and_release_as_separate_processes_read_aa(wire: Wire) {
    let server = ServerProcess::start_over(wire, &[]);
    let cli = Cli::new(&server);
    // This test names the grant directory with --state-dir instead of the
    // environment; the environment's directory must stay untouched.
    let flag_dir = tempfile::tempdir().expect("temp dir");
    let dir = flag_dir.path().to_str().expect("utf-8 path");
    let with_dir = |args: &[&str]| -> Vec<String> {
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        all.extend(["--state-dir".to_owned(), dir.to_owned()]);
        all
    };
    let run = |subcommand: &str, args: &[&str]| {
        let args = with_dir(args);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cli.run(subcommand, &args)
    };

    let acquired = run("acquire", &["--client-id", "1"]).ok();
    assert_eq!(
        acquired.stdout,
        format!("acquired lock \"\" fence {}\n", acquired.fence())
    );
    assert!(Cli::grant_file(flag_dir.path(), 1).exists());
    assert!(!Cli::grant_file(cli.state_dir(), 1).exists());

    run("append", &["--client-id", "1", "file_0", "A"]).ok();
    run("append", &["--client-id", "1", "file_0", "A"]).ok();
    assert_eq!(
        cli.cat("file_0"),
        "",
        "nothing is visible before the release"
    );
    assert_eq!(server.file("file_0"), "");

    let released = run("release", &["--client-id", "1"]).ok();
    assert_eq!(released.stdout, "released lock \"\"\n");
    assert!(
        !Cli::grant_file(flag_dir.path(), 1).exists(),
        "the release removes the grant file"
    );
    assert_eq!(cli.cat("file_0"), "AA");
    assert_eq!(server.file("file_0"), "AA");
}

fn kill9_with_the_lock_free_keeps_the_contents(wire: Wire) {
    let mut server = ServerProcess::start_over(wire, &[]);
    let cli = Cli::new(&server);
    let first = cli.run("acquire", &[]).ok().fence();
    cli.run("append", &["file_0", "A"]).ok();
    cli.run("append", &["file_0", "A"]).ok();
    cli.run("release", &[]).ok();
    assert_eq!(cli.cat("file_0"), "AA");

    server.kill9();
    server.restart();
    assert_eq!(
        cli.cat("file_0"),
        "AA",
        "committed contents survive kill -9"
    );

    let second = cli.run("acquire", &[]).ok().fence();
    assert!(
        second > first,
        "fencing numbers survive the restart: {first} then {second}"
    );
    cli.run("append", &["file_0", "1"]).ok();
    cli.run("release", &[]).ok();
    assert_eq!(cli.cat("file_0"), "AA1");
    assert_eq!(server.file("file_0"), "AA1");
}

fn kill9_with_the_lock_held_keeps_the_grant_file_usable(wire: Wire) {
    let mut server = ServerProcess::start_over(wire, &[]);
    let cli = Cli::new(&server);
    let fence = cli.run("acquire", &["--client-id", "1"]).ok().fence();
    cli.run("append", &["--client-id", "1", "file_3", "X"]).ok();

    server.kill9();
    server.restart();

    // The holder's grant file still works after the restart.
    let renewed = cli.run("renew", &["--client-id", "1"]).ok();
    assert!(
        renewed.stdout.starts_with("renewed lock \"\" lease "),
        "{renewed:#?}"
    );
    cli.run("append", &["--client-id", "1", "file_3", "Y"]).ok();
    // Another client finds the lock held.
    let busy = cli
        .run("acquire", &["--client-id", "2", "--wait-ms", "0"])
        .expect_code(EXIT_BUSY);
    assert!(busy.one_line_reason().contains("held"), "{busy:#?}");
    assert!(!Cli::grant_file(cli.state_dir(), 2).exists());
    assert_eq!(
        cli.cat("file_3"),
        "",
        "the staged appends are not visible yet"
    );

    cli.run("release", &["--client-id", "1"]).ok();
    assert_eq!(
        cli.cat("file_3"),
        "XY",
        "the append staged before the crash is committed, once"
    );
    let next = cli
        .run("acquire", &["--client-id", "2", "--wait-ms", "0"])
        .ok()
        .fence();
    assert!(next > fence, "{fence} then {next}");
    cli.run("release", &["--client-id", "2"]).ok();
}

fn a_stalled_holder_loses_its_appends_bbaa(wire: Wire) {
    let server = ServerProcess::start_over(wire, &[]);
    let cli = Cli::new(&server);
    // Client 1 takes the lock with a short lease, appends A, and then stalls
    // (nothing renews a grant file's lease).
    let fence1 = cli
        .run("acquire", &["--client-id", "1", "--lease-ms", "1500"])
        .ok()
        .fence();
    cli.run("append", &["--client-id", "1", "file_0", "A"]).ok();

    // Client 2 waits for the lock; it gets it only once client 1's lease ran out.
    let fence2 = cli.run("acquire", &["--client-id", "2"]).ok().fence();
    assert!(fence2 > fence1, "{fence1} then {fence2}");
    cli.run("append", &["--client-id", "2", "file_0", "B"]).ok();
    cli.run("append", &["--client-id", "2", "file_0", "B"]).ok();
    cli.run("release", &["--client-id", "2"]).ok();
    assert_eq!(cli.cat("file_0"), "BB", "client 1's A was dropped");

    // Client 1's grant file is stale now: refused with "grant gone".
    let append = cli
        .run("append", &["--client-id", "1", "file_0", "late"])
        .expect_code(EXIT_LOST);
    append.one_line_reason();
    let release = cli
        .run("release", &["--client-id", "1"])
        .expect_code(EXIT_LOST);
    release.one_line_reason();
    assert!(
        !Cli::grant_file(cli.state_dir(), 1).exists(),
        "a release refused as stale forgets the grant file"
    );

    // Client 1 starts over.
    let fence3 = cli.run("acquire", &["--client-id", "1"]).ok().fence();
    assert!(fence3 > fence2, "{fence2} then {fence3}");
    cli.run("append", &["--client-id", "1", "file_0", "A"]).ok();
    cli.run("append", &["--client-id", "1", "file_0", "A"]).ok();
    cli.run("release", &["--client-id", "1"]).ok();
    assert_eq!(cli.cat("file_0"), "BBAA");
    assert_eq!(server.file("file_0"), "BBAA");
}

fn hold_runs_a_command_under_a_lock_and_passes_its_exit_status(wire: Wire) {
    let server = ServerProcess::start_over(wire, &[]);
    let cli = Cli::new(&server);
    let held = cli
        .run(
            "hold",
            &[
                "--client-id",
                "3",
                "--lock",
                "x",
                "--",
                "sh",
                "-c",
                "echo $DLM_FENCING_TOKEN; exit 7",
            ],
        )
        .expect_code(7);
    let fence: u64 = held
        .stdout
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no fencing number: {held:#?}"));
    assert!(fence >= 1, "{held:#?}");
    assert_eq!(held.stderr, "", "{held:#?}");

    // Released when the command exited.
    if let Some(row) = cli.lock_row("x") {
        assert_eq!(row[1], "-", "lock x is still held: {row:?}");
    }
    let last = cli
        .status_rows()
        .into_iter()
        .find(|row| row.starts_with(&["last".to_owned(), "fencing".to_owned()]))
        .expect("last fencing number line");
    assert_eq!(
        last.last().map(String::as_str),
        Some(fence.to_string().as_str())
    );
    // Another client gets x at once.
    cli.run(
        "acquire",
        &["--client-id", "4", "--lock", "x", "--wait-ms", "0"],
    )
    .ok();
    cli.run("release", &["--client-id", "4", "--lock", "x"])
        .ok();
}

/// Waits (bounded polling, not a synchronisation sleep) until the command
/// under `held` has made `file` (whole: made by a rename), and returns its
/// content.
fn until_file(held: &mut Running, file: &Path) -> String {
    let deadline = Instant::now() + PROCESS_LIMIT;
    loop {
        if let Ok(text) = std::fs::read_to_string(file) {
            return text;
        }
        assert!(!held.has_exited(), "dlm hold exited early");
        assert!(Instant::now() < deadline, "the command never started");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn hold_passes_sigterm_on_to_its_command_and_releases_after_it(wire: Wire) {
    let server = ServerProcess::start_over(wire, &[]);
    let cli = Cli::new(&server);
    let marks = tempfile::tempdir().expect("temp dir");
    let ready = marks.path().join("ready");
    // The command catches SIGTERM, says so and exits 7; it tells the test
    // that its trap is set by creating a file.
    let script = r#"trap 'kill $! 2>/dev/null; echo got-term; exit 7' TERM
touch "$1"
sleep 60 &
wait"#;
    let mut held = cli.hold_sh("t", script, &ready);
    until_file(&mut held, &ready);
    held.signal(libc::SIGTERM);
    let out = held.finish(PROCESS_LIMIT).expect_code(7);
    assert_eq!(out.stdout.trim(), "got-term", "{out:#?}");
    // dlm waited for the command, then released.
    if let Some(row) = cli.lock_row("t") {
        assert_eq!(row[1], "-", "lock t is still held: {row:?}");
    }
}

fn hold_stopped_by_sigterm_leaves_nothing_of_its_command_running(wire: Wire) {
    let server = ServerProcess::start_over(wire, &[]);
    let cli = Cli::new(&server);
    let marks = tempfile::tempdir().expect("temp dir");
    let pid_file = marks.path().join("pid");
    // A shell with no trap dies on SIGTERM; its background job would run on
    // without the lock unless the whole process group is told.
    let script = r#"sleep 1000 >/dev/null 2>&1 &
echo $! > "$1.tmp" && mv "$1.tmp" "$1"
wait"#;
    let mut held = cli.hold_sh("g", script, &pid_file);
    let job: i32 = until_file(&mut held, &pid_file)
        .trim()
        .parse()
        .expect("a pid in the file");
    held.signal(libc::SIGTERM);
    held.finish(PROCESS_LIMIT).expect_code(128 + libc::SIGTERM);
    // The background job is gone (or a zombie waiting for its reaper): it
    // got the signal with its group.
    let alive = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                let state = stat.rsplit_once(") ")?.1.chars().next()?;
                Some(state != 'Z' && state != 'X')
            })
            .unwrap_or(false)
    };
    let deadline = Instant::now() + PROCESS_LIMIT;
    while alive(job) {
        assert!(
            Instant::now() < deadline,
            "the command's background job {job} still runs after dlm hold released"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    if let Some(row) = cli.lock_row("g") {
        assert_eq!(row[1], "-", "lock g is still held: {row:?}");
    }
}

fn a_closed_stdout_does_not_turn_a_done_acquire_into_a_crash(wire: Wire) {
    use std::os::unix::io::FromRawFd;
    let server = ServerProcess::start_over(wire, &[]);
    let cli = Cli::new(&server);
    // A pipe whose reading end is closed: every write to it fails (EPIPE).
    let mut fds = [0; 2];
    // SAFETY: pipe(2) fills two descriptors, which are owned from here on.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both descriptors were just made and are owned by nobody else.
    let (reader, writer) = unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    drop(reader);
    let status = cli
        .command("acquire", &["--client-id", "5", "--lock", "p"])
        .stdin(std::process::Stdio::null())
        .stdout(writer)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("dlm runs");
    assert_eq!(status.code(), Some(0), "the lock was acquired: {status:?}");
    let row = cli.lock_row("p").expect("p is held");
    assert_eq!(row[1], "5", "{row:?}");
    cli.run("release", &["--client-id", "5", "--lock", "p"])
        .ok();
}

fn hold_stopped_by_sigterm_while_waiting_never_runs_its_command(wire: Wire) {
    let server = ServerProcess::start_over(wire, &[]);
    let cli = Cli::new(&server);
    cli.run("acquire", &["--client-id", "1", "--lock", "w"])
        .ok();
    let waiting = cli.spawn(
        "hold",
        &["--client-id", "2", "--lock", "w", "--", "echo", "ran"],
    );
    cli.until_waiters("w", "2");
    waiting.signal(libc::SIGTERM);
    let out = waiting
        .finish(PROCESS_LIMIT)
        .expect_code(128 + libc::SIGTERM);
    assert_eq!(out.stdout, "", "{out:#?}");
    assert!(out.one_line_reason().contains("signal"), "{out:#?}");
    cli.run("release", &["--client-id", "1", "--lock", "w"])
        .ok();
}

fn hold_of_the_default_lock_lets_a_nested_append_use_its_token(wire: Wire) {
    let server = ServerProcess::start_over(wire, &[]);
    let cli = Cli::new(&server);
    // No grant file exists for client 5: the nested append can only succeed
    // through DLM_TOKEN (and DLM_SERVER, DLM_CLIENT_ID) from `dlm hold`.
    let script = r#"test -n "$DLM_TOKEN" || exit 90
"$0" append file_7 held || exit 91
echo "inside:[$("$0" cat file_7)]""#;
    let held = cli
        .run(
            "hold",
            &["--client-id", "5", "--", "sh", "-c", script, dlm_bin()],
        )
        .ok();
    assert_eq!(
        held.stdout, "inside:[]\n",
        "the append is staged while held: {held:#?}"
    );
    assert_eq!(cli.cat("file_7"), "held", "visible once hold released");
    assert!(!Cli::grant_file(cli.state_dir(), 5).exists());
    let holder = cli
        .lock_row("")
        .map_or_else(|| "-".to_owned(), |row| row[1].clone());
    assert_eq!(holder, "-", "the default lock was released");
}

/// An acquire whose grant directory cannot be used (here a file) fails
/// before it asks for the lock: another process of client 1 would
/// otherwise get the first one's grant back and be unable to keep it (and
/// must not end the first process's holding either way).
fn a_grant_that_cannot_be_kept_is_not_given_back(wire: Wire) {
    let server = ServerProcess::start_over(wire, &[]);
    let cli = Cli::new(&server);
    let first = cli.run("acquire", &["--client-id", "1"]).ok();
    let not_a_dir = cli.state_dir().join("not-a-directory");
    std::fs::write(&not_a_dir, "x").unwrap();
    let not_a_dir = not_a_dir.to_str().expect("utf-8 path");
    let second = cli
        .run("acquire", &["--client-id", "1", "--state-dir", not_a_dir])
        .expect_code(1);
    assert!(
        second.stderr.contains("nothing acquired") && !second.stderr.contains("--token"),
        "{second:#?}"
    );
    let row = cli.lock_row("").expect("still held");
    assert_eq!(row[2], first.fence().to_string(), "{row:?}");
    // Nor by a client that did not hold it: the lock is not taken.
    cli.run("release", &["--client-id", "1"]).ok();
    cli.run("acquire", &["--client-id", "2", "--state-dir", not_a_dir])
        .expect_code(1);
    let holder = cli
        .lock_row("")
        .map_or_else(|| "-".to_owned(), |row| row[1].clone());
    assert_eq!(holder, "-", "not acquired");
}

/// `dlm hold` without a client id takes one of its own: a second hold of
/// the same lock (here nested in the first, its DLM_CLIENT_ID removed) finds
/// the lock held, instead of being handed the first one's grant as another
/// process of the same client would be.
fn two_holds_without_a_client_id_exclude_each_other(wire: Wire) {
    let server = ServerProcess::start_over(wire, &[]);
    let cli = Cli::new(&server);
    let script = r#"unset DLM_CLIENT_ID
"$0" hold --lock h --wait-ms 0 -- true
echo "inner:$?""#;
    let held = cli
        .run(
            "hold",
            &["--lock", "h", "--", "sh", "-c", script, dlm_bin()],
        )
        .ok();
    assert_eq!(held.stdout, "inner:3\n", "{held:#?}");
    assert!(cli.lock_row("h").is_none(), "released at the end");
}

/// A hold nested in a hold's command does not act under the client id it
/// inherited (DLM_CLIENT_ID): of another lock, it takes an id of its own
/// (with the inherited one it would be handed a grant of that id, here
/// client 5's of `b`, and release it when done); of the enclosing hold's
/// own lock, it runs its command under the enclosing grant, which stays
/// held (once a renewal has shown that grant alive).
fn a_nested_hold_takes_its_own_id_unless_it_holds_the_enclosing_lock(wire: Wire) {
    let server = ServerProcess::start_over(wire, &[]);
    let cli = Cli::new(&server);
    let script = r#""$0" acquire --client-id 5 --lock b --wait-ms 0 > /dev/null || exit 90
"$0" hold --lock b --wait-ms 0 -- true
echo "b:$?"
"$0" release --client-id 5 --lock b > /dev/null || exit 91
"$0" hold --lock a --wait-ms 0 -- sh -c 'echo "a:$DLM_CLIENT_ID:$DLM_TOKEN"' || exit 92
echo "a:$DLM_CLIENT_ID:$DLM_TOKEN"
"$0" renew --lock a --token "$DLM_TOKEN" > /dev/null || exit 93"#;
    let held = cli
        .run(
            "hold",
            &[
                "--client-id",
                "5",
                "--lock",
                "a",
                "--",
                "sh",
                "-c",
                script,
                dlm_bin(),
            ],
        )
        .ok();
    let lines: Vec<&str> = held.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{held:#?}");
    assert_eq!(lines[0], format!("b:{EXIT_BUSY}"), "{held:#?}");
    assert!(lines[1].starts_with("a:5:"), "{held:#?}");
    assert_eq!(lines[1], lines[2], "the same grant: {held:#?}");
    assert!(cli.lock_row("a").is_none(), "released at the end");
    assert!(cli.lock_row("b").is_none(), "released by its acquirer");

    // An environment that says so without an enclosing hold alive (a job
    // that outlived its hold, variables set by hand) is not trusted: the
    // grant it names is not held, so the hold acquires for itself.
    let mut stale = cli.command(
        "hold",
        &[
            "--lock",
            "a",
            "--wait-ms",
            "0",
            "--",
            "sh",
            "-c",
            "echo $DLM_TOKEN",
        ],
    );
    stale
        .env("DLM_HOLD_CLIENT_ID", "5")
        .env("DLM_CLIENT_ID", "5")
        .env("DLM_LOCK", "a")
        .env("DLM_TOKEN", "stale");
    let held = Running::spawn(stale).finish(PROCESS_LIMIT).ok();
    let token = held.stdout.trim();
    assert!(!token.is_empty() && token != "stale", "{held:#?}");
    assert!(cli.lock_row("a").is_none(), "released at the end");
}

#[test]
fn an_unreachable_server_exits_5_with_one_line() {
    let cli = Cli::at(&closed_addr());
    let budget = ["--retry-budget-ms", "300"];
    let cases: [(&str, &[&str]); 6] = [
        ("status", &[]),
        ("cat", &["file_0"]),
        ("acquire", &[]),
        ("release", &["--token", "t"]),
        ("renew", &["--token", "t"]),
        ("append", &["--token", "t", "file_0", "x"]),
    ];
    for (subcommand, args) in cases {
        let args: Vec<&str> = budget.iter().chain(args).copied().collect();
        let failed = cli.run(subcommand, &args).expect_code(EXIT_UNAVAILABLE);
        let reason = failed.one_line_reason();
        assert!(
            reason.contains("no server answered"),
            "{subcommand}: {failed:#?}"
        );
        assert_eq!(failed.stdout, "", "{subcommand}: {failed:#?}");
    }
    assert!(
        !Cli::grant_file(cli.state_dir(), 1).exists(),
        "a failed acquire leaves no grant file"
    );
}

fn bad_requests_fail_with_one_line_and_change_nothing(wire: Wire) {
    let server = ServerProcess::start_over(wire, &[]);
    let cli = Cli::new(&server);

    // A release without a grant file (nothing acquired yet).
    let release = cli.run("release", &["--client-id", "1"]);
    assert_ne!(release.code, Some(0), "{release:#?}");
    assert!(
        release.one_line_reason().contains("no grant"),
        "{release:#?}"
    );
    // An append without a grant file.
    let append = cli.run("append", &["--client-id", "1", "file_0", "x"]);
    assert_ne!(append.code, Some(0), "{append:#?}");
    append.one_line_reason();

    cli.run("acquire", &["--client-id", "1"]).ok();
    for file in ["file_100", "../file_0", "file_-1", ""] {
        let bad = cli
            .run("append", &["--client-id", "1", file, "x"])
            .expect_code(EXIT_FAILED);
        bad.one_line_reason();
    }
    let bad_cat = cli.run("cat", &["file_100"]).expect_code(EXIT_FAILED);
    bad_cat.one_line_reason();
    // The grant is unharmed by the refusals.
    cli.run("append", &["--client-id", "1", "file_0", "ok"])
        .ok();
    cli.run("release", &["--client-id", "1"]).ok();
    assert_eq!(cli.cat("file_0"), "ok");

    // A release again, now that the grant file is gone.
    let again = cli.run("release", &["--client-id", "1"]);
    assert_ne!(again.code, Some(0), "{again:#?}");
    again.one_line_reason();
    // A stale token given by hand.
    let stale = cli
        .run("release", &["--client-id", "1", "--token", "no-such-token"])
        .expect_code(EXIT_LOST);
    stale.one_line_reason();
}

#[test]
fn usage_errors_exit_2() {
    let cli = Cli::at(&closed_addr());
    let cases: [(&str, &[&str]); 6] = [
        ("acquire", &["--no-such-flag"]),
        ("acquire", &["--wait-ms", "soon"]),
        ("append", &["file_0"]),
        ("cat", &[]),
        ("hold", &[]),
        ("release", &["--client-id", "one"]),
    ];
    for (subcommand, args) in cases {
        let failed = cli.run(subcommand, args).expect_code(EXIT_USAGE);
        assert!(
            !failed.stderr.is_empty(),
            "{subcommand} {args:?}: {failed:#?}"
        );
    }
    let mut unknown = Command::new(dlm_bin());
    unknown.arg("frobnicate");
    Running::spawn(unknown)
        .finish(PROCESS_LIMIT)
        .expect_code(EXIT_USAGE);
}

fn status_lists_the_holder_and_a_queued_waiter(wire: Wire) {
    let server = ServerProcess::start_over(wire, &[]);
    let cli = Cli::new(&server);
    assert_eq!(cli.lock_row("s"), None);
    let fence = cli
        .run("acquire", &["--client-id", "1", "--lock", "s"])
        .ok()
        .fence();

    let mut waiter = cli.spawn("acquire", &["--client-id", "2", "--lock", "s"]);
    let row = cli.until_waiters("s", "2");
    assert_eq!(row[1], "1", "holder: {row:?}");
    assert_eq!(row[2], fence.to_string(), "fence: {row:?}");
    assert!(row[3].ends_with('s'), "lease left: {row:?}");
    assert!(
        !waiter.has_exited(),
        "the waiter returned while the lock was held"
    );

    cli.run("release", &["--client-id", "1", "--lock", "s"])
        .ok();
    let granted = waiter.finish(PROCESS_LIMIT).ok();
    assert!(granted.fence() > fence, "{granted:#?}");
    let row = cli.lock_row("s").expect("s is held");
    assert_eq!((row[1].as_str(), row[5].as_str()), ("2", "-"), "{row:?}");
    cli.run("release", &["--client-id", "2", "--lock", "s"])
        .ok();
}

over_every_wire!(
    sync:
    acquire_two_appends_and_release_as_separate_processes_read_aa,
    kill9_with_the_lock_free_keeps_the_contents,
    kill9_with_the_lock_held_keeps_the_grant_file_usable,
    a_stalled_holder_loses_its_appends_bbaa,
    hold_runs_a_command_under_a_lock_and_passes_its_exit_status,
    hold_of_the_default_lock_lets_a_nested_append_use_its_token,
    two_holds_without_a_client_id_exclude_each_other,
    a_nested_hold_takes_its_own_id_unless_it_holds_the_enclosing_lock,
    a_grant_that_cannot_be_kept_is_not_given_back,
    hold_passes_sigterm_on_to_its_command_and_releases_after_it,
    hold_stopped_by_sigterm_leaves_nothing_of_its_command_running,
    a_closed_stdout_does_not_turn_a_done_acquire_into_a_crash,
    hold_stopped_by_sigterm_while_waiting_never_runs_its_command,
    bad_requests_fail_with_one_line_and_change_nothing,
    status_lists_the_holder_and_a_queued_waiter,
);
