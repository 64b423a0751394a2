//! Running orderflow's service binaries as child processes: the one way the
//! end-to-end tests and the benchmark start, stop and kill them. Where the
//! binaries are, and what they are told, is the caller's.

use std::{
    ffi::OsStr,
    fs::OpenOptions,
    io,
    net::TcpListener,
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU16, Ordering},
    time::{Duration, Instant},
};

/// A port that is free now and that no other call in this process got:
/// taken from below the kernel's ephemeral range (32768 and up), so an
/// outgoing connection can't grab it between this check and the service's
/// bind, from a window that depends on the process id, so parallel
/// processes don't pick the same ones.
pub fn free_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 500) as u16 * 24;
    let _ = NEXT.compare_exchange(0, base, Ordering::SeqCst, Ordering::SeqCst);
    loop {
        let port = NEXT.fetch_add(1, Ordering::SeqCst);
        assert!(port < 32_768, "ran out of ports below the ephemeral range");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A running service binary; killed if dropped while it runs.
pub struct Service {
    pub name: String,
    pub port: u16,
    child: Child,
}

impl Service {
    /// Start `binary` as `name` with `env`, its `HTTP_PORT` set to `port`,
    /// its output appended to `log`.
    pub fn start<K, V>(
        binary: &Path,
        name: &str,
        port: u16,
        env: impl IntoIterator<Item = (K, V)>,
        log: &Path,
    ) -> io::Result<Self>
    where
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        let output = OpenOptions::new().create(true).append(true).open(log)?;
        let child = Command::new(binary)
            .envs(env)
            .env("HTTP_PORT", port.to_string())
            .stdin(Stdio::null())
            .stdout(output.try_clone()?)
            .stderr(output)
            .spawn()
            .map_err(|error| {
                io::Error::new(
                    error.kind(),
                    format!("starting {}: {error}", binary.display()),
                )
            })?;
        Ok(Self {
            name: name.to_owned(),
            port,
            child,
        })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `path` on its HTTP port.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Ask it to stop (SIGTERM, which lets it drain) and wait up to
    /// `limit`: its exit status; an error, and the process killed, if it
    /// was still running then.
    pub async fn stop(mut self, limit: Duration) -> io::Result<ExitStatus> {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{} did not stop within {limit:?} of SIGTERM", self.name),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kill it outright (SIGKILL): a crash. Returns once it is gone.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
