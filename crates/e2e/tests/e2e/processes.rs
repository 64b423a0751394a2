//! Running the real service binaries as child processes.

use std::{
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
        Self::start_on(free_port(), binary_name, name, env, log_dir)
    }

    /// [`Self::start`] on `port` (a service others were told the port of,
    /// started again); its log is appended to.
    pub fn start_on(
        port: u16,
        binary_name: &str,
        name: &str,
        env: &[(&str, String)],
        log_dir: &std::path::Path,
    ) -> Self {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_dir.join(format!("{name}.log")))
            .expect("a log file");
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

/// Start the stand-in payment provider on `port` with `env`, its books in
/// `database_url` (created if missing).
pub fn start_provider(
    port: u16,
    env: &[(&str, String)],
    database_url: &str,
    log_dir: &std::path::Path,
) -> Service {
    let mut env = env.to_vec();
    env.push(("DATABASE_URL", database_url.to_owned()));
    Service::start_on(port, "payment-provider", "payment-provider", &env, log_dir)
}

/// The five services (three order-processors) and the stand-in payment
/// provider on fresh databases and topology, ready, logging JSON to
/// `log_dir`.
pub struct Stack {
    pub api: Service,
    pub provider: Service,
    pub workers: Vec<Service>,
    pub log_dir: std::path::PathBuf,
    pub pool: sqlx::PgPool,
    /// The payment provider's books.
    pub books: sqlx::PgPool,
    pub database_url: String,
    /// What every service was started with (`HTTP_PORT` and `INSTANCE_ID`
    /// aside).
    pub env: Vec<(&'static str, String)>,
    pub _topology: test_support::TopologyGuard,
}

impl Stack {
    /// Start them on a fresh database with `extra` settings on top of (and
    /// over) the defaults.
    pub async fn start(extra: &[(&'static str, String)]) -> Self {
        let (database_url, pool) = test_support::fresh_database().await;
        Self::start_on(database_url, pool, extra).await
    }

    /// Start them on `database_url` (`pool` connects to it).
    pub async fn start_on(
        database_url: String,
        pool: sqlx::PgPool,
        extra: &[(&'static str, String)],
    ) -> Self {
        let prefix = test_support::unique_prefix();
        let topology = test_support::TopologyGuard(messaging::Topology::new(prefix.clone()));
        let log_dir = std::env::temp_dir().join(format!("orderflow-e2e-{prefix}"));
        std::fs::create_dir_all(&log_dir).unwrap();
        let mut env = vec![
            ("AMQP_URL", test_support::amqp_url()),
            ("RABBITMQ_MANAGEMENT_URL", test_support::management_url()),
            ("DATABASE_URL", database_url.clone()),
            ("TOPOLOGY_PREFIX", prefix),
            (
                "TOPOLOGY_QUEUE_EXPIRES_MS",
                test_support::QUEUE_EXPIRES_MS.to_string(),
            ),
            ("DB_MAX_CONNECTIONS", "4".into()),
            ("PREFETCH", "5".into()),
            ("PAYMENT_LATENCY_MS", "20".into()),
            ("LOG_FORMAT", "json".into()),
            ("RUST_LOG", "info".into()),
        ];
        // Later entries win.
        env.extend(extra.iter().cloned());
        let books_url = test_support::empty_database().await;
        let provider = start_provider(free_port(), &env, &books_url, &log_dir);
        env.push(("PAYMENT_PROVIDER_URL", provider.url("")));
        let with_instance = |id: &str| {
            let mut env = env.clone();
            env.push(("INSTANCE_ID", id.to_owned()));
            env
        };
        let api = Service::start("order-api", "order-api", &env, &log_dir);
        let mut workers: Vec<Service> = (1..=3)
            .map(|i| {
                let id = format!("processor-{i}");
                Service::start("order-processor", &id, &with_instance(&id), &log_dir)
            })
            .collect();
        workers.push(Service::start(
            "notification-service",
            "notification-service",
            &env,
            &log_dir,
        ));
        workers.push(Service::start(
            "logging-service",
            "logging-service",
            &env,
            &log_dir,
        ));
        workers.push(Service::start("order-stats", "order-stats", &env, &log_dir));
        wait_ready(std::iter::once(&api).chain([&provider]).chain(&workers)).await;
        println!("services ready; logs in {}", log_dir.display());
        Self {
            api,
            provider,
            workers,
            log_dir,
            pool,
            books: sqlx::PgPool::connect_lazy(&books_url).expect("a database URL"),
            database_url,
            env,
            _topology: topology,
        }
    }

    /// Everything every service has logged so far, by service name.
    pub fn logs(&self) -> Vec<(String, String)> {
        std::iter::once(&self.api)
            .chain([&self.provider])
            .chain(&self.workers)
            .map(|service| {
                let log =
                    std::fs::read_to_string(self.log_dir.join(format!("{}.log", service.name)))
                        .unwrap_or_default();
                (service.name.clone(), log)
            })
            .collect()
    }
}
