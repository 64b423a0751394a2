//! Running the real service binaries as child processes, as
//! [`test_support::process`] runs them: where the test build put them, what
//! the tests tell them, and the whole stack at once.

use std::{path::PathBuf, process::Command, time::Duration};

pub use test_support::process::{Service, free_port};

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

/// How long a service may take to stop after SIGTERM.
pub const STOP_WITHIN: Duration = Duration::from_secs(10);

/// Start the binary `binary_name` as `name` with `env` on a free
/// `HTTP_PORT`, logging to `log_dir`.
pub fn start(
    binary_name: &str,
    name: &str,
    env: &[(&str, String)],
    log_dir: &std::path::Path,
) -> Service {
    start_on(free_port(), binary_name, name, env, log_dir)
}

/// [`start`] on `port` (a service others were told the port of, started
/// again); its log is appended to.
pub fn start_on(
    port: u16,
    binary_name: &str,
    name: &str,
    env: &[(&str, String)],
    log_dir: &std::path::Path,
) -> Service {
    let env = env.iter().map(|(key, value)| (*key, value.as_str()));
    let log = log_dir.join(format!("{name}.log"));
    Service::start(&binary(binary_name), name, port, env, &log)
        .unwrap_or_else(|e| panic!("starting {binary_name}: {e}"))
}

/// Ask `service` to stop (SIGTERM) and wait; its exit status.
pub async fn stop(service: Service) -> std::process::ExitStatus {
    service
        .stop(STOP_WITHIN)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
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
    start_on(port, "payment-provider", "payment-provider", &env, log_dir)
}

/// What every service of a test is started with: the shared servers, the
/// test's database and its topology (named by `prefix`, throwaway).
pub fn shared_env(database_url: &str, prefix: String) -> Vec<(&'static str, String)> {
    vec![
        ("AMQP_URL", test_support::amqp_url()),
        ("RABBITMQ_MANAGEMENT_URL", test_support::management_url()),
        ("DATABASE_URL", database_url.to_owned()),
        ("TOPOLOGY_PREFIX", prefix),
        (
            "TOPOLOGY_QUEUE_EXPIRES_MS",
            test_support::QUEUE_EXPIRES_MS.to_string(),
        ),
    ]
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
        let mut env = shared_env(&database_url, prefix);
        env.extend([
            ("DB_MAX_CONNECTIONS", "4".into()),
            ("PREFETCH", "5".into()),
            ("PAYMENT_LATENCY_MS", "20".into()),
            ("LOG_FORMAT", "json".into()),
            ("RUST_LOG", "info".into()),
        ]);
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
        let api = start("order-api", "order-api", &env, &log_dir);
        let mut workers: Vec<Service> = (1..=3)
            .map(|i| {
                let id = format!("processor-{i}");
                start("order-processor", &id, &with_instance(&id), &log_dir)
            })
            .collect();
        workers.push(start(
            "notification-service",
            "notification-service",
            &env,
            &log_dir,
        ));
        workers.push(start("logging-service", "logging-service", &env, &log_dir));
        workers.push(start("order-stats", "order-stats", &env, &log_dir));
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

/// Server-sent events read from `response`, each as its name and its data,
/// until the stream ends.
pub async fn server_events(
    mut response: reqwest::Response,
    mut each: impl FnMut(&str, serde_json::Value),
) {
    let mut buffer = String::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let message: String = buffer.drain(..end + 2).collect();
            let name = message
                .lines()
                .find_map(|l| l.strip_prefix("event: "))
                .unwrap_or("message");
            let data: String = message
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .collect();
            if let Ok(data) = serde_json::from_str(&data) {
                each(name, data);
            }
        }
    }
}
