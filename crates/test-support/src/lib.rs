//! What every integration test needs to run against the real servers in
//! parallel without seeing another test's data: a fresh, migrated database,
//! a uniquely prefixed topology that the broker deletes when idle, and
//! polling with a deadline instead of sleeps; and the one way the
//! end-to-end tests and the benchmark run the service binaries
//! ([`process`]).

use std::{
    future::Future,
    sync::LazyLock,
    time::{Duration, Instant},
};

use lapin::{
    Connection, ConnectionProperties,
    options::{BasicAckOptions, BasicGetOptions},
};
use messaging::Topology;
use sqlx::{PgPool, Postgres, migrate::MigrateDatabase};
use uuid::Uuid;

pub mod events;
pub mod process;

/// `count!(pool, r#"SELECT count(*) AS "n!" FROM orders"#)`: the one number
/// a fixed statement returns, read with `pool`; a database error fails the
/// test. A macro, so that the statement is compile-checked in the crate that
/// writes it, like any other.
#[macro_export]
macro_rules! count {
    ($pool:expr, $sql:literal $(,)?) => {
        sqlx::query_scalar!($sql).fetch_one($pool).await.unwrap()
    };
}

/// Postgres server the tests create their databases on.
pub fn postgres_base_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// RabbitMQ the tests use.
pub fn amqp_url() -> String {
    std::env::var("TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// RabbitMQ's management API the tests use (policies, queue arguments).
pub fn management_url() -> String {
    std::env::var("TEST_MANAGEMENT_URL")
        .unwrap_or_else(|_| "http://guest:guest@127.0.0.1:15672".to_owned())
}

/// A client of the test broker's management API.
pub fn management() -> messaging::Management {
    messaging::Management::new(&management_url(), &amqp_url())
        .expect("TEST_MANAGEMENT_URL is a valid http URL")
}

/// A broker handle on the test broker declaring `topology`.
pub fn broker(topology: &Topology) -> messaging::Broker {
    messaging::Broker::new(amqp_url(), management(), topology.clone())
}

/// How long per-test queues live once idle: a backstop for tests that die
/// before their [`TopologyGuard`] deletes them. Quorum queues hold file
/// descriptors on the broker, so they must not pile up.
pub const QUEUE_EXPIRES_MS: u32 = 60 * 1000;

static TRACING: LazyLock<()> = LazyLock::new(|| {
    if std::env::var("TEST_LOG").is_ok() {
        messaging::telemetry::init("test", messaging::telemetry::LogFormat::Pretty);
    }
});

/// Turn on log output when `TEST_LOG` is set.
pub fn init_tracing() {
    LazyLock::force(&TRACING);
}

/// A new database named `orderflow_test_<uuid>`, migrated; its URL and a pool.
pub async fn fresh_database() -> (String, PgPool) {
    let url = empty_database().await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(5)
        .connect(&url)
        .await
        .expect("connecting to the test database");
    platform::db::MIGRATOR
        .run(&pool)
        .await
        .expect("migrating the test database");
    (url, pool)
}

/// A new, empty database named `orderflow_test_<uuid>` (for a service that
/// migrates its own, such as the stand-in payment provider); its URL.
pub async fn empty_database() -> String {
    let base = postgres_base_url();
    let (server, _) = base
        .rsplit_once('/')
        .expect("TEST_DATABASE_URL has a database name");
    let url = format!("{server}/orderflow_test_{}", Uuid::new_v4().simple());
    Postgres::create_database(&url)
        .await
        .unwrap_or_else(|e| panic!("cannot create a test database on {server}: {e}"));
    url
}

/// Point a service's settings at the test servers: the given database, a
/// unique topology prefix whose queues expire, a small pool.
pub fn isolate(settings: &mut platform::settings::ServiceSettings, database_url: String) {
    settings.database.database_url = database_url;
    settings.database.db_max_connections = Some(3);
    settings.amqp.amqp_url = amqp_url();
    settings.amqp.rabbitmq_management_url = Some(management_url());
    settings.amqp.topology_prefix = unique_prefix();
    settings.amqp.topology_queue_expires_ms = Some(QUEUE_EXPIRES_MS);
}

/// A unique topology prefix for one test.
pub fn unique_prefix() -> String {
    format!("test-{}", Uuid::new_v4().simple())
}

/// Connect to the test broker.
pub async fn amqp() -> Connection {
    Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("cannot reach RabbitMQ at {}: {e}", amqp_url()))
}

/// Deletes a test topology's queues and exchanges when dropped, so a test
/// suite leaves nothing behind on the shared broker.
pub struct TopologyGuard(pub Topology);

impl Drop for TopologyGuard {
    fn drop(&mut self) {
        let topology = self.0.clone();
        // Drop can't await, and may run inside the test's runtime: delete
        // from a thread with a runtime of its own.
        let deleted = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async move {
                let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
                    .await
                    .ok()?;
                topology.delete(&connection, &management()).await;
                let _ = connection.close(200, "test over".into()).await;
                Some(())
            })
        })
        .join();
        if !matches!(deleted, Ok(Some(()))) {
            eprintln!(
                "could not delete the test topology; its queues expire in {QUEUE_EXPIRES_MS} ms"
            );
        }
    }
}

/// A declared topology under `prefix` whose queues expire when idle.
pub async fn declare_topology(connection: &Connection, prefix: &str) -> Topology {
    let topology = Topology::new(prefix).with_queue_expiry_ms(Some(QUEUE_EXPIRES_MS));
    topology
        .declare(connection, &management())
        .await
        .expect("declaring the test topology");
    topology
}

/// Poll `check` until it returns `Some`, or panic with `what` after `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Take one message from `queue` (acking it), waiting up to `limit`.
pub async fn next_message(
    connection: &Connection,
    queue: &str,
    limit: Duration,
) -> lapin::message::Delivery {
    let channel = connection.create_channel().await.unwrap();
    eventually(limit, &format!("a message on {queue}"), || {
        let channel = channel.clone();
        async move {
            let got = channel
                .basic_get(queue.into(), BasicGetOptions::default())
                .await
                .expect("basic.get")?;
            got.delivery.ack(BasicAckOptions::default()).await.unwrap();
            Some(got.delivery)
        }
    })
    .await
}

/// Messages ready in `queue` right now.
pub async fn queue_depth(connection: &Connection, queue: &str) -> u32 {
    ready_messages(connection, queue)
        .await
        .unwrap_or_else(|| panic!("{queue} exists and can be read"))
}

/// Messages ready in `queue` right now, if it exists and can be read (on a
/// channel of its own, closed after).
pub async fn ready_messages(connection: &Connection, queue: &str) -> Option<u32> {
    let channel = connection.create_channel().await.ok()?;
    let counts = messaging::declaration::counts_on(&channel, queue)
        .await
        .ok();
    let _ = channel.close(200, "counted".into()).await;
    counts.map(|(ready, _)| ready)
}

/// A confirmed publisher on the test broker for `topology`.
pub fn publisher(topology: &Topology) -> messaging::Publisher {
    messaging::Publisher::new(broker(topology))
}

/// A string header of a delivery, if present.
pub fn header(delivery: &lapin::message::Delivery, name: &str) -> Option<String> {
    match delivery.properties.headers().as_ref()?.inner().get(name)? {
        lapin::types::AMQPValue::LongString(s) => Some(s.to_string()),
        other => Some(format!("{other:?}")),
    }
}
