//! The chaos suite: each case runs the real binaries on a private RabbitMQ
//! node and Postgres cluster, keeps a steady stream of orders coming (some
//! repeating an idempotency key), injects one fault, lets the system settle,
//! and checks the invariants: every accepted order has exactly one final
//! status; stock was reserved once per processed order and never went
//! negative; one notification and one audit record per event; nothing left
//! in queues or outbox; dead letters only where the case expects them; and
//! the money adds up (captured total = processed orders' total, nothing
//! captured twice, no authorisation left open).
//!
//! The cases that do not test RabbitMQ itself also run with the orders'
//! messages and the order events in Postgres (`WORK_QUEUE=postgres`,
//! `EVENT_BUS=postgres`, see [`Transport`]): `chaos::cases::postgres::*`.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    processes::Service,
    servers::{PrivatePostgres, PrivateRabbit},
};

mod broker;
mod cases;
mod cluster;
mod leftovers;

/// How the orders' messages and the order events travel between the
/// services.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// RabbitMQ's work queues and events fanout (the default).
    Rabbitmq,
    /// Postgres: the `jobs` table and the `events` log (`WORK_QUEUE=postgres`,
    /// `EVENT_BUS=postgres`); the services still connect to RabbitMQ. A
    /// processor's lease on its jobs is 5 s, so that the jobs of one killed,
    /// or cut off from Postgres, are claimed again well within a case.
    Postgres,
}

/// The whole system on private servers.
pub struct System {
    /// How orders and events travel.
    pub transport: Transport,
    /// The broker, or the first node of a cluster.
    pub rabbit: PrivateRabbit,
    /// The other nodes of a cluster.
    pub peers: Vec<PrivateRabbit>,
    pub postgres: PrivatePostgres,
    pub pool: PgPool,
    /// The payment provider's books (its own database).
    pub books: PgPool,
    pub api: Option<Service>,
    /// The stand-in payment provider.
    pub provider: Option<Service>,
    /// The port the processors reach the provider on.
    pub provider_port: u16,
    pub processors: Vec<Service>,
    pub subscribers: Vec<Service>,
    env: Vec<(&'static str, String)>,
    log_dir: PathBuf,
    stock_before: HashMap<String, i64>,
    /// A client key, made once order-api has migrated.
    key: String,
}

impl System {
    pub async fn start(extra: &[(&'static str, &str)]) -> Self {
        Self::with(Transport::Rabbitmq, extra).await
    }

    /// The system with orders and events travelling by `transport`.
    pub async fn with(transport: Transport, extra: &[(&'static str, &str)]) -> Self {
        Self::start_on(vec![PrivateRabbit::start().await], transport, extra).await
    }

    /// The system on a cluster of three nodes; the services list all three
    /// and ask for heartbeats every 5 s, so that a frozen node is noticed.
    pub async fn start_cluster(extra: &[(&'static str, &str)]) -> Self {
        Self::start_on(PrivateRabbit::cluster(3).await, Transport::Rabbitmq, extra).await
    }

    async fn start_on(
        mut nodes: Vec<PrivateRabbit>,
        transport: Transport,
        extra: &[(&'static str, &str)],
    ) -> Self {
        let rabbit = nodes.remove(0);
        let peers = nodes;
        println!(
            "broker: RabbitMQ {}{}{}",
            rabbit.version(),
            if peers.is_empty() {
                String::new()
            } else {
                format!(", a cluster of {} nodes", peers.len() + 1)
            },
            match transport {
                Transport::Rabbitmq => "",
                Transport::Postgres => "; orders' messages and events in Postgres",
            }
        );
        let (amqp_url, management_url) = if peers.is_empty() {
            (rabbit.url(), rabbit.management_url())
        } else {
            let all: Vec<&PrivateRabbit> = std::iter::once(&rabbit).chain(&peers).collect();
            (
                all.iter()
                    .map(|n| format!("{}?heartbeat=5", n.url()))
                    .collect::<Vec<_>>()
                    .join(","),
                all.iter()
                    .map(|n| n.management_url())
                    .collect::<Vec<_>>()
                    .join(","),
            )
        };
        let postgres = PrivatePostgres::start().await;
        let log_dir =
            std::env::temp_dir().join(format!("orderflow-chaos-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&log_dir).unwrap();
        let mut env = vec![
            ("AMQP_URL", amqp_url),
            ("RABBITMQ_MANAGEMENT_URL", management_url),
            ("DATABASE_URL", postgres.url("orderflow")),
            ("DB_ACQUIRE_TIMEOUT_MS", "1000".into()),
            ("PREFETCH", "10".into()),
            ("PAYMENT_LATENCY_MS", "20".into()),
            ("RETRY_INITIAL_DELAY_MS", "200".into()),
            ("RETRY_MAX_DELAY_MS", "2000".into()),
            ("RETRY_MAX_ATTEMPTS", "30".into()),
            ("OUTBOX_RELAY_INTERVAL_MS", "300".into()),
            ("RUST_LOG", "info".into()),
            // The load is steady and known; the limit has its own tests.
            ("RATE_LIMIT_PER_SECOND", "100000".into()),
            ("RATE_LIMIT_BURST", "100000".into()),
        ];
        if transport == Transport::Postgres {
            env.extend([
                ("WORK_QUEUE", "postgres".into()),
                ("EVENT_BUS", "postgres".into()),
                ("JOB_LEASE_MS", "5000".into()),
            ]);
        }
        env.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
        let postgres_books_url = postgres.url("payment_provider");
        let provider_port = crate::processes::free_port();
        env.push((
            "PAYMENT_PROVIDER_URL",
            format!("http://127.0.0.1:{provider_port}"),
        ));
        let mut system = Self {
            transport,
            rabbit,
            peers,
            postgres,
            pool: PgPool::connect_lazy("postgres://unused").unwrap(),
            books: PgPool::connect_lazy(&postgres_books_url).unwrap(),
            api: None,
            provider: None,
            provider_port,
            processors: Vec::new(),
            subscribers: Vec::new(),
            env,
            log_dir,
            stock_before: HashMap::new(),
            key: String::new(),
        };
        system.provider = Some(system.start_provider());
        // order-api first: it creates the database and applies migrations.
        system.api = Some(system.service("order-api", "order-api"));
        system.wait_ready().await;
        system.key =
            crate::processes::api_key(&system.postgres.url("orderflow"), "chaos-shop", "client");
        system.pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(3)
            .connect(&system.postgres.url("orderflow"))
            .await
            .unwrap();
        system.start_workers();
        system.wait_ready().await;
        system.stock_before = sqlx::query!("SELECT sku, stock FROM inventory")
            .fetch_all(&system.pool)
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.sku, i64::from(r.stock)))
            .collect();
        system
    }

    pub fn service(&self, binary: &str, name: &str) -> Service {
        let mut env = self.env.clone();
        env.push(("INSTANCE_ID", name.to_owned()));
        crate::processes::start(binary, name, &env, &self.log_dir)
    }

    /// Start the payment provider on the port the processors were given,
    /// its books in its own database.
    pub fn start_provider(&self) -> Service {
        crate::processes::start_provider(
            self.provider_port,
            &self.env,
            &self.postgres.url("payment_provider"),
            &self.log_dir,
        )
    }

    /// Stop the payment provider (SIGTERM) and start it again on its port,
    /// with the system's settings as they are now; wait until it is ready.
    pub async fn restart_provider(&mut self) {
        if let Some(provider) = self.provider.take() {
            assert!(
                crate::processes::stop(provider).await.success(),
                "the provider stops cleanly"
            );
        }
        self.provider = Some(self.start_provider());
        self.wait_ready().await;
    }

    /// Make every provider call take `ms` from now on (the provider's demo
    /// fault; needs `DEMO_FAILURES`).
    pub async fn provider_latency(&self, ms: u64) {
        let provider = self.provider.as_ref().expect("the provider runs");
        let response = reqwest::Client::new()
            .put(provider.url("/faults/latency"))
            .json(&json!({ "latency_ms": ms }))
            .send()
            .await
            .expect("the provider answers");
        assert!(response.status().is_success(), "latency set: {response:?}");
    }

    pub fn start_workers(&mut self) {
        self.processors = (1..=3)
            .map(|i| self.service("order-processor", &format!("processor-{i}")))
            .collect();
        self.subscribers = vec![
            self.service("notification-service", "notification-service"),
            self.service("logging-service", "logging-service"),
        ];
    }

    /// What a service has logged so far.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.log_dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// An HTTP client sending the system's client key; a request not
    /// answered within 5 s counts as a transport error.
    pub fn client(&self) -> reqwest::Client {
        crate::processes::keyed_client(&self.key, Duration::from_secs(5))
    }

    pub fn api_url(&self) -> String {
        self.api
            .as_ref()
            .expect("order-api is running")
            .url("/orders")
    }

    pub async fn wait_ready(&self) {
        let services = self
            .api
            .iter()
            .chain(&self.provider)
            .chain(&self.processors)
            .chain(&self.subscribers);
        crate::processes::wait_ready(services).await;
    }

    /// SIGTERM every service and check each exits 0.
    pub async fn stop_all(&mut self) {
        let services: Vec<Service> = self
            .processors
            .drain(..)
            .chain(self.subscribers.drain(..))
            .chain(self.api.take())
            .chain(self.provider.take())
            .collect();
        for service in services {
            let name = service.name.clone();
            let status = crate::processes::stop(service).await;
            assert!(status.success(), "{name} exited with {status} on SIGTERM");
        }
    }

    /// What the case's messages name it: `case`, and where orders and
    /// events travelled when not on RabbitMQ.
    pub fn case(&self, case: &str) -> String {
        match self.transport {
            Transport::Rabbitmq => case.to_owned(),
            Transport::Postgres => format!("{case} (work and events in Postgres)"),
        }
    }

    /// Every node, the first one first.
    pub fn nodes(&self) -> impl Iterator<Item = &PrivateRabbit> {
        std::iter::once(&self.rabbit).chain(&self.peers)
    }

    /// What the management API at `path` (below `/api/`) says, asked of
    /// each node in turn: the first answer `wanted` takes (a stopped or
    /// frozen node is skipped).
    pub async fn management_api(
        &self,
        path: &str,
        wanted: impl Fn(&Value) -> bool,
    ) -> Option<Value> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        for node in self.nodes() {
            let url = format!("{}/api/{path}", node.management_url());
            let Ok(response) = client.get(url).send().await else {
                continue;
            };
            if let Ok(answer) = response.json::<Value>().await
                && wanted(&answer)
            {
                return Some(answer);
            }
        }
        None
    }

    /// A connection to the first node that takes one.
    pub async fn amqp(&self) -> lapin::Connection {
        for node in self.nodes() {
            if let Ok(connection) =
                lapin::Connection::connect(&node.url(), Default::default()).await
            {
                return connection;
            }
        }
        panic!("no private broker node takes a connection")
    }

    fn setting(&self, name: &str) -> u64 {
        let value = self.env_value(name);
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value} is not a number"))
    }

    /// The topology the services declared: the unprefixed one, with the
    /// retry queues of their retry settings.
    pub fn topology(&self) -> messaging::Topology {
        let retry = messaging::consumer::RetryPolicy {
            max_attempts: u32::try_from(self.setting("RETRY_MAX_ATTEMPTS")).unwrap(),
            initial_delay: Duration::from_millis(self.setting("RETRY_INITIAL_DELAY_MS")),
            max_delay: Duration::from_millis(self.setting("RETRY_MAX_DELAY_MS")),
            max_wait: Duration::ZERO,
        };
        messaging::Topology::new("").with_retry_delays(retry.delays())
    }

    /// The broker whose dead-letter queue holds dead letters: none when
    /// orders and events travel through Postgres (no service declares the
    /// queues then; the dead letters are the dead jobs).
    pub fn dead_letter_broker(&self) -> Option<messaging::Broker> {
        (self.transport == Transport::Rabbitmq).then(|| self.broker())
    }

    /// A broker handle on the private node (every node of a cluster).
    pub fn broker(&self) -> messaging::Broker {
        let settings = messaging::AmqpSettings {
            amqp_url: self.env_value("AMQP_URL"),
            topology_prefix: String::new(),
            topology_queue_expires_ms: None,
            rabbitmq_management_url: Some(self.env_value("RABBITMQ_MANAGEMENT_URL")),
        };
        settings
            .broker_for(self.topology())
            .expect("the private nodes' URLs")
    }

    fn env_value(&self, name: &str) -> String {
        self.env
            .iter()
            .rev()
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value.clone())
            .unwrap_or_else(|| panic!("{name} is set for the chaos services"))
    }
}

impl Drop for System {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.log_dir);
        } else {
            eprintln!("service logs kept in {}", self.log_dir.display());
        }
    }
}

/// Order `i` of the load; every tenth request repeats the key and body of
/// the request five before it (a client retry).
fn order(i: usize) -> Value {
    let items = match i % 31 {
        0 => json!([{"sku": "LIMITED-EDITION", "quantity": 1}]),
        n => json!([{"sku": "WIDGET", "quantity": 1 + n % 3}, {"sku": "GADGET", "quantity": 1}]),
    };
    json!({
        "customer_id": format!("c-{}", i % 13),
        "email": format!("customer{i}@example.com"),
        "items": items,
        "express": i.is_multiple_of(7),
    })
}

/// What the load generator saw.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub accepted: HashSet<Uuid>,
    pub statuses: HashMap<u16, usize>,
    pub replays: usize,
    pub transport_errors: usize,
    pub slowest_503: Duration,
    /// When each accepted POST was sent, and how long its answer took.
    pub accepted_latencies: Vec<(Instant, Duration)>,
}

pub struct Load {
    stop: CancellationToken,
    handle: JoinHandle<LoadReport>,
}

impl Load {
    /// Post about `per_second` orders a second to `url` until stopped.
    pub fn start(url: String, client: reqwest::Client, per_second: u64) -> Self {
        let stop = CancellationToken::new();
        let token = stop.clone();
        let handle = tokio::spawn(async move {
            let mut report = LoadReport::default();
            let mut tick = tokio::time::interval(Duration::from_millis(1000 / per_second));
            let mut i = 0usize;
            while !token.is_cancelled() {
                tick.tick().await;
                i += 1;
                let n = if i.is_multiple_of(10) { i - 5 } else { i };
                let started = Instant::now();
                let response = client
                    .post(&url)
                    .header("Idempotency-Key", format!("load-{n}"))
                    .json(&order(n))
                    .send()
                    .await;
                let Ok(response) = response else {
                    report.transport_errors += 1;
                    continue;
                };
                let status = response.status().as_u16();
                *report.statuses.entry(status).or_default() += 1;
                if status == 503 {
                    report.slowest_503 = report.slowest_503.max(started.elapsed());
                }
                if response.headers().contains_key("idempotent-replayed") {
                    report.replays += 1;
                }
                if status == 202 {
                    report.accepted_latencies.push((started, started.elapsed()));
                }
                if status == 202
                    && let Ok(body) = response.json::<Value>().await
                    && let Some(id) = body["id"].as_str().and_then(|s| s.parse().ok())
                {
                    report.accepted.insert(id);
                }
            }
            report
        });
        Self { stop, handle }
    }

    pub async fn finish(self) -> LoadReport {
        self.stop.cancel();
        self.handle.await.expect("the load generator")
    }
}

/// A count on the provider's books, whose statements the macros cannot check
/// here (see `check_money`).
async fn scalar(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// Let the system settle, then check every invariant; prints the counts.
pub async fn check_invariants(
    system: &System,
    case: &str,
    accepted: &HashSet<Uuid>,
    expected_dead: usize,
) {
    let pool = &system.pool;
    let case = &system.case(case);
    leftovers::settle(system, case, Duration::from_secs(120)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let orders = sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM orders"#)
        .fetch_one(pool)
        .await
        .unwrap();
    let ids: Vec<Uuid> = sqlx::query_scalar!("SELECT id FROM orders")
        .fetch_all(pool)
        .await
        .unwrap();
    let ids: HashSet<Uuid> = ids.into_iter().collect();
    let lost: Vec<&Uuid> = accepted.iter().filter(|id| !ids.contains(id)).collect();
    assert!(lost.is_empty(), "{case}: accepted orders lost: {lost:?}");
    let finals = sqlx::query_scalar!(
        r#"SELECT count(*) AS "n!" FROM (SELECT order_id FROM order_status_history
         WHERE status IN ('processed', 'rejected') GROUP BY order_id HAVING count(*) = 1) once"#,
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(
        finals, orders,
        "{case}: every order has exactly one final status"
    );
    let processed_messages = sqlx::query_scalar!(
        r#"SELECT count(*) AS "n!" FROM processed_messages WHERE consumer = 'order-processor'"#,
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(
        processed_messages, orders,
        "{case}: each order message processed once"
    );
    let reserved: HashMap<String, i64> = sqlx::query!(
        r#"SELECT line->>'sku' AS "sku!", sum((line->>'quantity')::bigint)::bigint AS "units!"
         FROM orders, jsonb_array_elements(items) AS line WHERE status = 'processed' GROUP BY 1"#,
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .map(|r| (r.sku, r.units))
    .collect();
    let stock: Vec<(String, i32)> = sqlx::query!("SELECT sku, stock FROM inventory")
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.sku, r.stock))
        .collect();
    for (sku, now) in &stock {
        assert!(*now >= 0, "{case}: {sku} went negative");
        let taken = system.stock_before[sku] - i64::from(*now);
        assert_eq!(
            taken,
            reserved.get(sku).copied().unwrap_or(0),
            "{case}: {sku} reserved once per processed order"
        );
    }
    let notifications =
        sqlx::query_scalar!(r#"SELECT count(DISTINCT order_id) AS "n!" FROM notifications"#)
            .fetch_one(pool)
            .await
            .unwrap();
    let notification_rows = sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM notifications"#)
        .fetch_one(pool)
        .await
        .unwrap();
    let audit = sqlx::query_scalar!(r#"SELECT count(DISTINCT order_id) AS "n!" FROM audit_log"#)
        .fetch_one(pool)
        .await
        .unwrap();
    let audit_rows = sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM audit_log"#)
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(
        (notifications, notification_rows),
        (orders, orders),
        "{case}: one notification per event"
    );
    assert_eq!(
        (audit, audit_rows),
        (orders, orders),
        "{case}: one audit record per event"
    );
    let money = check_money(pool, &system.books, case).await;
    // A kill between publishing a dead letter (or a retry) and acking the
    // original lets the original come back and be dead-lettered again: the
    // queue may hold two copies of one message, which replay once between
    // them (the consumer dedupes by message id). What must hold is which
    // messages are there. The dead jobs (work in Postgres) are listed too;
    // the settle loop saw no other job left.
    let letters = dead_letters::list(system.dead_letter_broker().as_ref(), pool)
        .await
        .unwrap();
    let dead: HashSet<&str> = letters.iter().map(|l| l.message_id.as_str()).collect();
    assert_eq!(
        dead.len(),
        expected_dead,
        "{case}: dead-lettered messages: {letters:?}"
    );
    let dead = if letters.len() == dead.len() {
        dead.len().to_string()
    } else {
        format!("{} ({} copies)", dead.len(), letters.len())
    };
    let processed =
        sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM orders WHERE status = 'processed'"#)
            .fetch_one(pool)
            .await
            .unwrap();
    println!(
        "{case} on RabbitMQ {}: accepted={} orders={orders} final={finals} processed={processed} rejected={} \
         processed_messages={processed_messages} notifications={notification_rows} audit={audit_rows} \
         stock_ok=true outbox_unpublished=0 queued=0 jobs_waiting=0 dead_letters={dead} {money}",
        system.rabbit.version(),
        accepted.len(),
        orders - processed,
    );
}

/// The money invariants, on the provider's books (`books`, its own
/// database) and orderflow's (`pool`): the captured total is the processed
/// orders' total, nothing was captured twice, no authorisation is left
/// neither captured nor voided, and each order's payment ended as its
/// status says. Returns the counts.
pub(crate) async fn check_money(pool: &PgPool, books: &PgPool, case: &str) -> String {
    // The provider's database: a crate's statements are checked against one database, orderflow's here.
    let captured_cents = scalar(
        books,
        "SELECT coalesce(sum(amount_cents), 0)::bigint FROM provider_ledger
         WHERE operation = 'capture' AND outcome = 'captured'",
    )
    .await;
    let processed_cents = sqlx::query_scalar!(
        r#"SELECT coalesce(sum(total_cents), 0)::bigint AS "cents!"
         FROM orders WHERE status = 'processed'"#,
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(
        captured_cents, processed_cents,
        "{case}: captured total = processed orders' total"
    );
    // The provider's database: a crate's statements are checked against one database, orderflow's here.
    let captured_twice = scalar(
        books,
        "SELECT count(*) FROM (SELECT reference FROM provider_ledger
         WHERE operation = 'capture' AND outcome = 'captured' GROUP BY reference HAVING count(*) > 1) twice",
    )
    .await;
    assert_eq!(captured_twice, 0, "{case}: nothing captured twice");
    // The provider's database: a crate's statements are checked against one database, orderflow's here.
    let open = scalar(
        books,
        "SELECT count(*) FROM provider_authorisations WHERE state = 'authorised'",
    )
    .await;
    assert_eq!(open, 0, "{case}: no authorisation left open");
    // The provider's database: a crate's statements are checked against one database, orderflow's here.
    let at_provider: HashMap<Uuid, String> =
        sqlx::query_as("SELECT reference, state FROM provider_authorisations")
            .fetch_all(books)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let ours: Vec<(Uuid, String, Option<String>)> = sqlx::query!(
        r#"SELECT o.id AS "id!", o.status AS "status!", p.state AS "state?"
         FROM orders o LEFT JOIN payments p ON p.order_id = o.id"#,
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .map(|r| (r.id, r.status, r.state))
    .collect();
    let mismatched: Vec<_> = ours
        .iter()
        .filter(|(id, status, payment)| {
            let provider = at_provider.get(id).map(String::as_str);
            !matches!(
                (status.as_str(), payment.as_deref(), provider),
                ("processed", Some("captured"), Some("captured"))
                    | ("rejected", Some("voided"), Some("voided"))
                    | ("rejected", Some("declined"), Some("declined"))
            )
        })
        .take(10)
        .map(|(id, status, payment)| (id, status, payment, at_provider.get(id)))
        .collect();
    assert!(
        mismatched.is_empty(),
        "{case}: every order's payment ended as its status says; these did not \
         (order, status, payment, provider): {mismatched:?}"
    );
    // The provider's database: a crate's statements are checked against one database, orderflow's here.
    let count = |operation: &'static str, outcome: &'static str| {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM provider_ledger WHERE operation = $1 AND outcome = $2",
        )
        .bind(operation)
        .bind(outcome)
        .fetch_one(books)
    };
    let authorised = count("authorise", "authorised").await.unwrap();
    let captures = count("capture", "captured").await.unwrap();
    let voids = count("void", "voided").await.unwrap();
    let declined = count("authorise", "declined").await.unwrap();
    // The provider's database: a crate's statements are checked against one database, orderflow's here.
    let unsettled = scalar(
        books,
        "SELECT count(*) FROM provider_ledger a WHERE operation = 'authorise' AND outcome = 'authorised'
         AND (SELECT count(*) FROM provider_ledger s WHERE s.reference = a.reference
              AND ((s.operation = 'capture' AND s.outcome = 'captured')
                OR (s.operation = 'void' AND s.outcome = 'voided'))) <> 1",
    )
    .await;
    assert_eq!(
        unsettled, 0,
        "{case}: every authorisation captured or voided, once"
    );
    format!(
        "authorised={authorised} captured={captures} ({captured_cents} cents = processed total) \
         voided={voids} declined={declined} captured_twice=0 open_authorisations=0"
    )
}
