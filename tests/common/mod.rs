//! Helpers for the black-box tests: real `dlm server` processes on loopback.
//!
//! A [`ServerProcess`] is always killed when dropped, so no test leaves a
//! server behind. It binds `127.0.0.1:0` on first start and learns its port
//! from the server's first stdout line; restarts reuse that port so that
//! clients holding the address reconnect.

#![allow(dead_code, clippy::disallowed_methods)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Path of the `dlm` binary built for these tests.
pub fn dlm_bin() -> &'static str {
    env!("CARGO_BIN_EXE_dlm")
}

/// A `dlm server` child process with its data directory.
pub struct ServerProcess {
    child: Option<Child>,
    data_dir: PathBuf,
    addr: String,
    extra: Vec<String>,
    _tmp: Option<tempfile::TempDir>,
}

impl ServerProcess {
    /// Starts a server on a fresh temporary data directory.
    pub fn start(extra: &[&str]) -> ServerProcess {
        let tmp = tempfile::tempdir().expect("temp dir");
        let data_dir = tmp.path().join("data");
        let mut server = ServerProcess {
            child: None,
            data_dir,
            addr: "127.0.0.1:0".to_owned(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            _tmp: Some(tmp),
        };
        server.spawn().expect("server starts");
        server
    }

    /// Spawns the process; returns its stderr if it exits before serving.
    fn spawn(&mut self) -> Result<(), String> {
        let mut child = Command::new(dlm_bin())
            .arg("server")
            .arg("--listen")
            .arg(&self.addr)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        let Some(addr) = line
            .strip_prefix("dlm: serving gRPC on ")
            .and_then(|rest| rest.split(',').next())
        else {
            let status = child.wait().map_err(|e| e.to_string())?;
            let mut err = String::new();
            if let Some(mut stderr) = child.stderr.take() {
                use std::io::Read;
                let _ = stderr.read_to_string(&mut err);
            }
            return Err(format!("server exited ({status}): {err}"));
        };
        self.addr = addr.trim().to_owned();
        // Keep stderr drained so the server never blocks on a full pipe.
        if let Some(stderr) = child.stderr.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    eprintln!("[server] {line}");
                }
            });
        }
        self.child = Some(child);
        Ok(())
    }

    /// "127.0.0.1:PORT".
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// "http://127.0.0.1:PORT".
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The data directory (file_0 … file_99, state/).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Content of a data file as the disk has it.
    pub fn file(&self, name: &str) -> String {
        String::from_utf8_lossy(&std::fs::read(self.data_dir.join(name)).unwrap_or_default())
            .into_owned()
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same port and data directory.
    pub fn restart(&mut self) {
        self.kill9();
        self.try_restart().expect("server restarts");
    }

    /// Starts again; the error is the server's stderr when it refuses to start.
    pub fn try_restart(&mut self) -> Result<(), String> {
        self.kill9();
        let mut last = String::new();
        // The port may take a moment to be free again after SIGKILL.
        for _ in 0..50 {
            match self.spawn() {
                Ok(()) => return Ok(()),
                Err(e) if e.contains("cannot listen") => {
                    last = e;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}
