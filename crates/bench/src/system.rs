//! A running orderflow for one measurement: the service binaries as child
//! processes on their own database and topology, torn down afterwards.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use lapin::{Connection, ConnectionProperties, options::QueueDeclareOptions};
use loadgen::LoadOptions;
use messaging::{contracts::Lane, topology::Topology};
use sqlx::{PgPool, postgres::PgPoolOptions};
use test_support::process::{Service, free_port};
use uuid::Uuid;

/// Where the services find their broker and database, and their binaries.
#[derive(Debug, Clone)]
pub struct Environment {
    pub bin_dir: PathBuf,
    pub log_dir: PathBuf,
    pub amqp_url: String,
    /// RabbitMQ's management API (default: beside `amqp_url`, port 15672).
    pub management_url: Option<String>,
    /// A Postgres URL without a database name, e.g. `postgres://postgres@127.0.0.1:5432`.
    pub postgres_url: String,
}

impl Environment {
    /// The broker's management API.
    pub fn management(&self) -> anyhow::Result<messaging::Management> {
        let url = match &self.management_url {
            Some(url) => url.clone(),
            None => messaging::Management::default_url_for(&self.amqp_url)?,
        };
        messaging::Management::new(&url, &self.amqp_url)
    }

    /// A URL for `database` on the benchmark's Postgres.
    pub fn database_url(&self, database: &str) -> String {
        format!("{}/{database}", self.postgres_url.trim_end_matches('/'))
    }

    /// Connect to the maintenance database `postgres`.
    pub async fn admin_pool(&self) -> anyhow::Result<PgPool> {
        PgPoolOptions::new()
            .max_connections(2)
            .connect(&self.database_url("postgres"))
            .await
            .with_context(|| format!("cannot reach Postgres at {}", self.database_url("postgres")))
    }
}

/// What carries the orders to the processors and their events to the
/// subscribers: both on RabbitMQ, or both on Postgres (`WORK_QUEUE` and
/// `EVENT_BUS`, set alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Rabbitmq,
    Postgres,
}

impl Transport {
    /// Both, in the order the runs and the tables set them side by side.
    pub const ALL: [Transport; 2] = [Transport::Rabbitmq, Transport::Postgres];

    /// The value of `WORK_QUEUE` and `EVENT_BUS`, and its name in results.json.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Rabbitmq => "rabbitmq",
            Transport::Postgres => "postgres",
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What to run.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub transport: Transport,
    pub processors: usize,
    pub payment_latency_ms: u64,
    /// Deliveries each processor consumer holds and works on at once.
    pub prefetch: u16,
    /// Start notification-service and logging-service.
    pub subscribers: bool,
}

/// Stop `service` with SIGTERM (it drains and flushes its outbox) and check
/// it exits cleanly within 15 s.
async fn stop(service: Service) -> anyhow::Result<()> {
    let name = service.name.clone();
    let status = service.stop(Duration::from_secs(15)).await?;
    if !status.success() {
        bail!("{name} exited with {status}");
    }
    Ok(())
}

/// Resident set size of process `pid` in bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// A whole orderflow on a fresh database and topology.
pub struct System {
    pub name: String,
    pub database: ScratchDatabase,
    /// The stand-in payment provider's books: a database of its own.
    pub provider_database: ScratchDatabase,
    /// Where the processors reach the provider.
    provider_url: String,
    pub topology: Topology,
    prefix: String,
    pub pool: PgPool,
    pub services: Vec<Service>,
    environment: Environment,
    shape: Shape,
    amqp: Connection,
    /// The client key the load is posted with.
    api_key: String,
    /// With the Postgres transport, the notifications counted so far.
    notifications: Option<NotificationCounter>,
}

impl System {
    /// Create the database, start order-api (which migrates and declares),
    /// then the processors and subscribers, and wait until all are ready.
    pub async fn start(
        environment: &Environment,
        name: &str,
        shape: Shape,
    ) -> anyhow::Result<Self> {
        let id = Uuid::new_v4().simple().to_string();
        let prefix = format!("bench-{}", &id[..12]);
        let topology = Topology::new(prefix.clone());
        let amqp = Connection::connect(&environment.amqp_url, ConnectionProperties::default())
            .await
            .with_context(|| {
                format!(
                    "cannot reach RabbitMQ at {}",
                    messaging::amqp::redact(&environment.amqp_url)
                )
            })?;
        let database = ScratchDatabase::create(environment, "run").await?;
        let provider_database =
            ScratchDatabase::create(environment, PROVIDER_DATABASE_PURPOSE).await?;
        // Opened now and kept: while the services under test hold every
        // connection Postgres allows, the benchmark still counts.
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .min_connections(4)
            .connect(&database.url)
            .await
            .context("connecting to the benchmark database")?;
        let mut system = Self {
            name: name.to_string(),
            database,
            provider_database,
            provider_url: String::new(),
            topology,
            prefix,
            pool,
            services: Vec::new(),
            environment: environment.clone(),
            shape,
            amqp,
            api_key: String::new(),
            notifications: None,
        };
        // order-api first: it applies the migrations the others would race for.
        system.spawn("order-api", &[]).await?;
        system.api_key = system.make_api_key()?;
        if shape.transport == Transport::Postgres {
            system.notifications = Some(NotificationCounter::start(&system.database.url).await?);
        }
        let books = system.provider_database.url.clone();
        let provider = system
            .spawn("payment-provider", &[("DATABASE_URL", books.as_str())])
            .await?;
        system.provider_url = format!("http://127.0.0.1:{provider}");
        system.start_processors(shape.processors).await?;
        if shape.subscribers {
            system.spawn("notification-service", &[]).await?;
            system.spawn("logging-service", &[]).await?;
        }
        Ok(system)
    }

    /// order-api's base URL.
    pub fn api_url(&self) -> String {
        let api = self
            .services
            .iter()
            .find(|service| service.name == "order-api")
            .expect("order-api is always started first");
        format!("http://127.0.0.1:{}", api.port)
    }

    /// The client key the load is posted with.
    pub fn api_key(&self) -> &str {
        &self.api_key
    }

    /// `requests` orders at order-api with the benchmark's key, at most
    /// `concurrency` in flight.
    pub fn load(&self, requests: u64, concurrency: usize) -> LoadOptions {
        LoadOptions {
            api_key: Some(self.api_key.clone()),
            ..LoadOptions::new(self.api_url(), requests, concurrency)
        }
    }

    /// A client key, made with the `api-keys` binary as a person would.
    fn make_api_key(&self) -> anyhow::Result<String> {
        let output = std::process::Command::new(self.environment.bin_dir.join("api-keys"))
            .args(["create", "--client", "bench", "--quiet"])
            .env("DATABASE_URL", &self.database.url)
            .output()
            .context("running api-keys")?;
        anyhow::ensure!(
            output.status.success(),
            "api-keys create failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(String::from_utf8(output.stdout)?.trim().to_owned())
    }

    /// Start `count` more order-processors and wait until they are ready.
    pub async fn start_processors(&mut self, count: usize) -> anyhow::Result<()> {
        let running = self
            .services
            .iter()
            .filter(|service| service.name.starts_with("order-processor"))
            .count();
        for n in running + 1..=running + count {
            let instance = format!("processor-{n}");
            let provider = self.provider_url.clone();
            self.spawn(
                "order-processor",
                &[
                    ("INSTANCE_ID", instance.as_str()),
                    ("PAYMENT_PROVIDER_URL", provider.as_str()),
                ],
            )
            .await?;
        }
        Ok(())
    }

    /// Start `binary` with `extra` settings over the system's, wait until it
    /// is ready; the port it listens on.
    async fn spawn(&mut self, binary: &str, extra: &[(&str, &str)]) -> anyhow::Result<u16> {
        let port = free_port();
        let label = extra
            .iter()
            .find(|(key, _)| *key == "INSTANCE_ID")
            .map_or(binary.to_string(), |(_, id)| format!("order-{id}"));
        let log_path = self
            .environment
            .log_dir
            .join(format!("{}-{label}.log", self.name));
        let path = self.environment.bin_dir.join(binary);
        let mut env: Vec<(&str, String)> = vec![
            ("AMQP_URL", self.environment.amqp_url.clone()),
            ("TOPOLOGY_PREFIX", self.prefix.clone()),
            // A safety net: if the benchmark dies, its queues go away anyway.
            ("TOPOLOGY_QUEUE_EXPIRES_MS", "600000".into()),
            ("DATABASE_URL", self.database.url.clone()),
            (
                "PAYMENT_LATENCY_MS",
                self.shape.payment_latency_ms.to_string(),
            ),
            ("PREFETCH", self.shape.prefetch.to_string()),
            ("WORK_QUEUE", self.shape.transport.to_string()),
            ("EVENT_BUS", self.shape.transport.to_string()),
            ("DEMO_FAILURES", "false".into()),
            // The benchmark measures throughput, not the per-key limit.
            ("RATE_LIMIT_PER_SECOND", "1000000".into()),
            ("RATE_LIMIT_BURST", "1000000".into()),
        ];
        env.extend(
            self.environment
                .management_url
                .iter()
                .map(|url| ("RABBITMQ_MANAGEMENT_URL", url.clone())),
        );
        env.extend(extra.iter().map(|(key, value)| (*key, (*value).to_owned())));
        let service = Service::start(&path, &label, port, env, &log_path).with_context(|| {
            format!(
                "starting {} (build it with cargo build --release --bins)",
                path.display()
            )
        })?;
        wait_ready(&service, &log_path).await?;
        self.services.push(service);
        Ok(port)
    }

    /// The processors' pids and RSS, and every other service's.
    pub fn rss(&self) -> Vec<(String, Option<u64>)> {
        self.services
            .iter()
            .map(|service| (service.name.clone(), rss_bytes(service.pid())))
            .collect()
    }

    /// Every running service's name and pid.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.services
            .iter()
            .map(|service| (service.name.clone(), service.pid()))
            .collect()
    }

    /// Wait until every order's message is published (the outbox is
    /// empty).
    pub async fn wait_published(&self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let unpublished = sqlx::query_scalar!(
                r#"SELECT count(*) AS "unpublished!" FROM outbox WHERE published_at IS NULL"#
            )
            .fetch_one(&self.pool)
            .await?;
            if unpublished == 0 {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        anyhow::bail!("the outbox still held unpublished orders after {limit:?}")
    }

    /// Wait until no order is `accepted` any more, then whether `orders`
    /// orders are final; `false` if some were still waiting at `limit`.
    ///
    /// It looks twice a second: each look reads the orders table, Postgres
    /// CPU that the drain being measured is charged with. How long the
    /// drain took is read from the orders themselves
    /// ([`System::seconds_since`]), not from when this returns.
    pub async fn wait_final(&self, orders: u64, limit: Duration) -> anyhow::Result<bool> {
        let deadline = Instant::now() + limit;
        loop {
            let waiting = sqlx::query_scalar!(
                r#"SELECT count(*) AS "waiting!" FROM orders WHERE status = 'accepted'"#
            )
            .fetch_one(&self.pool)
            .await?;
            if waiting == 0 {
                break;
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let finals = sqlx::query_scalar!(
            r#"SELECT count(*) AS "finals!" FROM orders WHERE status IN ('processed', 'rejected')"#
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(u64::try_from(finals).unwrap_or(0) >= orders)
    }

    /// Whether each of `orders` orders got one final status and its message
    /// was handled once.
    pub async fn finals_once(&self, orders: u64) -> anyhow::Result<bool> {
        let counted = sqlx::query!(
            r#"SELECT (SELECT count(*) FROM order_status_history
                       WHERE status IN ('processed', 'rejected')) AS "finals!",
                      (SELECT count(*) FROM processed_messages
                       WHERE consumer = 'order-processor') AS "handled!""#
        )
        .fetch_one(&self.pool)
        .await?;
        let orders = i64::try_from(orders).unwrap_or(i64::MAX);
        Ok(counted.finals == orders && counted.handled == orders)
    }

    /// The database's clock, in seconds.
    pub async fn clock(&self) -> anyhow::Result<f64> {
        Ok(
            sqlx::query_scalar!(
                r#"SELECT extract(epoch FROM clock_timestamp())::float8 AS "now!""#
            )
            .fetch_one(&self.pool)
            .await?,
        )
    }

    /// Seconds from `start` (the database's [`System::clock`]) to the last
    /// change of an order.
    pub async fn seconds_since(&self, start: f64) -> anyhow::Result<f64> {
        let last = sqlx::query_scalar!(
            "SELECT extract(epoch FROM max(updated_at))::float8 AS last FROM orders"
        )
        .fetch_one(&self.pool)
        .await?
        .context("no order has changed")?;
        Ok(last - start)
    }

    /// What orderflow's database and the provider's have done so far, by
    /// Postgres's statistics (which an idle backend reports within 10 s of
    /// its last commit).
    pub async fn activity(&self) -> anyhow::Result<(Activity, Activity)> {
        Ok((
            Activity::of(&self.pool, &self.database.name).await?,
            Activity::of(&self.pool, &self.provider_database.name).await?,
        ))
    }

    /// Messages ready on `lane`'s work queue.
    pub async fn queue_depth(&self, lane: Lane) -> anyhow::Result<u32> {
        let channel = self.amqp.create_channel().await?;
        let queue = channel
            .queue_declare(
                self.topology.work_queue(lane).as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                Default::default(),
            )
            .await
            .context("reading the work queue's depth")?;
        let _ = channel.close(200, "depth read".into()).await;
        Ok(queue.message_count())
    }

    /// The orders waiting for a processor: the messages ready on both work
    /// queues, or the jobs rows not dead.
    pub async fn backlog(&self) -> anyhow::Result<u64> {
        match self.shape.transport {
            Transport::Rabbitmq => Ok(u64::from(self.queue_depth(Lane::Standard).await?)
                + u64::from(self.queue_depth(Lane::Express).await?)),
            Transport::Postgres => {
                let waiting = sqlx::query_scalar!(
                    r#"SELECT count(*) AS "waiting!" FROM jobs WHERE state <> 'dead'"#
                )
                .fetch_one(&self.pool)
                .await?;
                Ok(u64::try_from(waiting).unwrap_or(0))
            }
        }
    }

    /// The notifications sent so far on the jobs' channel and on the
    /// events' (with the Postgres transport).
    pub fn notifications(&self) -> Option<Notifications> {
        self.notifications.as_ref().map(NotificationCounter::read)
    }

    /// Orders in the database, and how many of them are final.
    pub async fn order_counts(&self) -> anyhow::Result<(i64, i64)> {
        let counted = sqlx::query!(
            r#"SELECT count(*) AS "orders!",
                      count(*) FILTER (WHERE status IN ('processed', 'rejected')) AS "finals!"
               FROM orders"#
        )
        .fetch_one(&self.pool)
        .await?;
        Ok((counted.orders, counted.finals))
    }

    /// Stop every service with SIGTERM, delete the topology and drop the
    /// database. Reports the first failure after cleaning up anyway.
    pub async fn stop(self) -> anyhow::Result<()> {
        if let Some(counter) = &self.notifications {
            counter.listening.abort();
        }
        let mut outcome = Ok(());
        // Processors before order-api, as in a rolling shutdown.
        for service in self.services.into_iter().rev() {
            if let Err(error) = stop(service).await {
                outcome = outcome.and(Err(error));
            }
        }
        if let Ok(management) = self.environment.management() {
            self.topology.delete(&self.amqp, &management).await;
        }
        let _ = self.amqp.close(200, "benchmark done".into()).await;
        self.pool.close().await;
        self.database.drop().await?;
        self.provider_database.drop().await?;
        outcome
    }
}

/// The purpose in the names of the payment provider's databases.
const PROVIDER_DATABASE_PURPOSE: &str = "provider";

/// What every provider database's name holds (see [`ScratchDatabase`]).
pub const PROVIDER_DATABASE_MARK: &str = "orderflow_bench_provider_";

/// A throwaway database: each system, raw loop and bare server gets one.
pub struct ScratchDatabase {
    name: String,
    pub url: String,
    environment: Environment,
}

impl ScratchDatabase {
    pub async fn create(environment: &Environment, purpose: &str) -> anyhow::Result<Self> {
        let name = format!(
            "orderflow_bench_{purpose}_{}",
            &Uuid::new_v4().simple().to_string()[..8]
        );
        let admin = environment.admin_pool().await?;
        // Built at run time: a database's name cannot be a bound parameter.
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await
            .context("creating a benchmark database")?;
        Ok(Self {
            url: environment.database_url(&name),
            name,
            environment: environment.clone(),
        })
    }

    pub async fn drop(self) -> anyhow::Result<()> {
        let admin = self.environment.admin_pool().await?;
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&admin)
        .await
        .context("dropping a benchmark database")?;
        Ok(())
    }
}

/// A port free right now on 127.0.0.1.
async fn wait_ready(service: &Service, log: &Path) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{}/readyz", service.port);
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(response) = client.get(&url).send().await
            && response.status().is_success()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!(
        "{} was not ready within 60 s; its log is {}",
        service.name,
        log.display()
    )
}

/// Counters of one database.
#[derive(Debug, Clone, Copy)]
pub struct Activity {
    pub commits: i64,
    /// Rows inserted, updated and deleted.
    pub rows_written: i64,
    /// Statements run, where the server keeps `pg_stat_statements` (it
    /// must be in `shared_preload_libraries`).
    pub statements: Option<i64>,
}

impl Activity {
    async fn of(pool: &PgPool, database: &str) -> anyhow::Result<Activity> {
        let written = sqlx::query!(
            r#"SELECT xact_commit AS "commits!",
                      tup_inserted + tup_updated + tup_deleted AS "rows_written!"
               FROM pg_stat_database WHERE datname = $1"#,
            database
        )
        .fetch_one(pool)
        .await?;
        let (commits, rows_written) = (written.commits, written.rows_written);
        // Without the library loaded the view exists but cannot be read;
        // not compile-checked, since the extension may be missing from the
        // database the statements are checked against.
        let _ = sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .execute(pool)
            .await;
        let statements = sqlx::query_scalar(
            "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = $1)",
        )
        .bind(database)
        .fetch_one(pool)
        .await
        .ok();
        Ok(Activity {
            commits,
            rows_written,
            statements,
        })
    }
}

/// Notifications sent on the Postgres transport's channels.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Notifications {
    /// On the jobs' channel: one per transaction of order-api's that wrote
    /// jobs (Postgres folds a transaction's identical ones), and per replay.
    pub jobs: u64,
    /// On the events' channel: one per statement that appended events.
    pub events: u64,
}

impl Notifications {
    /// What was sent after `earlier`.
    pub fn since(self, earlier: Notifications) -> Notifications {
        Notifications {
            jobs: self.jobs - earlier.jobs,
            events: self.events - earlier.events,
        }
    }
}

/// A connection listening on both channels, as a processor and a
/// subscriber do, counting what arrives.
struct NotificationCounter {
    counted: std::sync::Arc<std::sync::Mutex<Notifications>>,
    listening: tokio::task::JoinHandle<()>,
}

impl NotificationCounter {
    async fn start(database_url: &str) -> anyhow::Result<Self> {
        let mut listener = sqlx::postgres::PgListener::connect(database_url).await?;
        listener
            .listen_all([platform::jobs::CHANNEL, platform::event_log::CHANNEL])
            .await?;
        let counted = std::sync::Arc::new(std::sync::Mutex::new(Notifications::default()));
        let listening = tokio::spawn({
            let counted = counted.clone();
            async move {
                while let Ok(notification) = listener.recv().await {
                    let mut counted = counted.lock().expect("the counter is never poisoned");
                    if notification.channel() == platform::jobs::CHANNEL {
                        counted.jobs += 1;
                    } else {
                        counted.events += 1;
                    }
                }
            }
        });
        Ok(Self { counted, listening })
    }

    fn read(&self) -> Notifications {
        *self.counted.lock().expect("the counter is never poisoned")
    }
}
