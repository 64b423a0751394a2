//! Running the real service binaries as child processes.

use std::{
    fs::File,
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU16, Ordering},
    time::Duration,
};

/// Where cargo put the binaries: next to the `deps/` folder this test runs from.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --bins` before the end-to-end tests",
        path.display()
    );
    path
}

/// A port that is free now and that no other call in this process got:
/// taken from below the kernel's ephemeral range (32768 and up), so an
/// outgoing connection can't grab it between this check and the service's
/// bind, from a window that depends on the process id, so parallel test
/// processes don't pick the same ones.
pub fn free_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 500) as u16 * 24;
    let _ = NEXT.compare_exchange(0, base, Ordering::SeqCst, Ordering::SeqCst);
    loop {
        let port = NEXT.fetch_add(1, Ordering::SeqCst);
        assert!(port < 32_768, "ran out of test ports");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A running service; killed if the test ends without stopping it.
pub struct Service {
    pub name: String,
    pub port: u16,
    child: Child,
}

impl Service {
    /// Start `binary` with `env` on a free `HTTP_PORT`, logging to `log_dir`.
    pub fn start(
        binary_name: &str,
        name: &str,
        env: &[(&str, String)],
        log_dir: &std::path::Path,
    ) -> Self {
        let port = free_port();
        let log = File::create(log_dir.join(format!("{name}.log"))).expect("a log file");
        let child = Command::new(binary(binary_name))
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("HTTP_PORT", port.to_string())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("starting {binary_name}: {e}"));
        Self {
            name: name.to_owned(),
            port,
            child,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Ask the service to stop (SIGTERM) and wait; its exit status.
    pub async fn stop(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        for _ in 0..200 {
            if let Some(status) = self.child.try_wait().expect("waiting") {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{} did not stop within 10s of SIGTERM", self.name);
    }
}

impl Service {
    /// Kill the process outright (SIGKILL): a crash.
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

/// Wait until something accepts TCP connections on `port`.
pub async fn wait_for_port(port: u16, limit: Duration) {
    test_support::eventually(
        limit,
        &format!("port {port} to accept connections"),
        || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(|_| ())
        },
    )
    .await;
}

/// Wait until every service answers `/readyz` with success.
pub async fn wait_ready<'a>(services: impl IntoIterator<Item = &'a Service>) {
    let client = reqwest::Client::new();
    for service in services {
        test_support::eventually(
            Duration::from_secs(60),
            &format!("{} to be ready", service.name),
            || async {
                let ready = client.get(service.url("/readyz")).send().await.ok()?;
                ready.status().is_success().then_some(())
            },
        )
        .await;
    }
}

/// A new API key of `client` with `scope`, made as a person would: with the
/// `api-keys` binary against `database_url`.
pub fn api_key(database_url: &str, client: &str, scope: &str) -> String {
    let output = Command::new(binary("api-keys"))
        .args(["create", "--client", client, "--scope", scope, "--quiet"])
        .env("DATABASE_URL", database_url)
        .env_remove("API_KEY")
        .output()
        .expect("running api-keys");
    assert!(
        output.status.success(),
        "api-keys create failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .expect("a key is ASCII")
        .trim()
        .to_owned()
}

/// An HTTP client that sends `key` as its bearer token and gives up on a
/// request after `timeout`.
pub fn keyed_client(key: &str, timeout: Duration) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {key}")
            .parse()
            .expect("a key is a header value"),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .timeout(timeout)
        .build()
        .expect("an HTTP client")
}
