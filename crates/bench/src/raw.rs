//! The raw bounds: what the bare broker and database manage on this machine
//! with no service logic in between. The benchmark reports the services
//! against these numbers, so a regression in our code is not mistaken for a
//! slow machine.
//!
//! Its statements are not compile-checked: they work on databases and
//! tables it creates as it runs (names made per run), which no migration
//! describes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use axum::{
    Json, Router,
    body::Bytes,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::post,
};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable},
};
use sqlx::{PgPool, postgres::PgPoolOptions};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Per-consumer prefetch of the raw consumer: large enough to keep the
/// consumer busy, small enough to be a realistic service setting.
const PREFETCH: u16 = 100;
/// The raw consumer gives up if the queue stays silent this long while
/// messages are still owed: a stuck broker must fail the run, not hang it.
const CONSUMER_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// What a raw loop achieved.
#[derive(Debug)]
pub struct Throughput {
    /// How many operations completed (messages consumed, rows inserted).
    pub operations: u64,
    /// Wall-clock time the operations took.
    pub elapsed: Duration,
    /// Per-operation latency in microseconds.
    pub latency: Histogram<u64>,
}

impl Throughput {
    /// Operations per second over `elapsed` (0 when nothing was timed).
    pub fn per_second(&self) -> f64 {
        let seconds = self.elapsed.as_secs_f64();
        if seconds > 0.0 {
            self.operations as f64 / seconds
        } else {
            0.0
        }
    }
}

fn new_histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::<u64>::new(3).context("failed to create a latency histogram")
}

/// Records `latency` in microseconds. `saturating_record` alone would be wrong
/// here: it clamps to the histogram's *current* range and never grows it, and a
/// `Histogram::new(3)` starts at ~2 ms. So grow first; saturate only if that
/// fails (values beyond i64::MAX / 2 µs).
fn record(histogram: &mut Histogram<u64>, latency: Duration) {
    let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
    if histogram.record(micros).is_err() {
        histogram.saturating_record(micros);
    }
}

/// Publish `messages` copies of `payload` to a fresh durable QUORUM queue named
/// `queue` (declared with `x-queue-type=quorum`, deleted at the end, also when
/// the loop fails) through the default exchange, persistent (delivery_mode 2),
/// with publisher confirms. One consumer on a SEPARATE connection consumes with
/// manual ack (per-consumer `basic_qos` prefetch 100) and acks each message.
///
/// The loop is done when every message has been consumed and acked.
/// `in_flight == 1`: publish, await that confirm, publish the next.
/// `in_flight > 1`: `in_flight` concurrent publisher tasks share ONE confirm
/// channel, each awaiting its own confirm (pipelined). A nack, or a message
/// returned as unroutable, is an error.
///
/// Latency = publish → its confirm. Elapsed = first publish → last ack.
pub async fn amqp_confirm_loop(
    amqp_url: &str,
    queue: &str,
    payload: &[u8],
    messages: u64,
    in_flight: usize,
) -> anyhow::Result<Throughput> {
    if in_flight == 0 {
        bail!("in_flight must be at least 1");
    }
    let publisher = Connection::connect(amqp_url, ConnectionProperties::default())
        .await
        .context("failed to connect the raw publisher to RabbitMQ")?;
    let result = match declare_fresh_queue(&publisher, queue).await {
        Ok(channel) => {
            let result = confirm_loop(amqp_url, channel, queue, payload, messages, in_flight).await;
            let deleted = delete_queue(amqp_url, &publisher, queue).await;
            result.and_then(|throughput| deleted.map(|()| throughput))
        }
        Err(e) => Err(e),
    };
    // Closing can only fail if the connection is already gone: nothing to do.
    let _ = publisher.close(200, "raw bound done".into()).await;
    result
}

/// Declares `queue` and returns the channel it was declared on, refusing a
/// queue that already holds messages or consumers (the count would be wrong).
async fn declare_fresh_queue(connection: &Connection, queue: &str) -> anyhow::Result<Channel> {
    let channel = connection
        .create_channel()
        .await
        .context("failed to open the raw publisher channel")?;
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    let declared = channel
        .queue_declare(queue.into(), QueueDeclareOptions::durable(), arguments)
        .await
        .with_context(|| format!("failed to declare quorum queue {queue}"))?;
    if declared.message_count() != 0 || declared.consumer_count() != 0 {
        bail!(
            "queue {queue} is not fresh: {} messages, {} consumers",
            declared.message_count(),
            declared.consumer_count()
        );
    }
    Ok(channel)
}

/// Deletes `queue`, on a new channel of `connection` (the loop's channel may
/// have been closed by an error), or on a new connection if that fails too.
async fn delete_queue(amqp_url: &str, connection: &Connection, queue: &str) -> anyhow::Result<()> {
    let on_existing = async {
        let channel = connection.create_channel().await?;
        channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await?;
        channel.close(200, "queue deleted".into()).await
    };
    if on_existing.await.is_ok() {
        return Ok(());
    }
    let fresh = Connection::connect(amqp_url, ConnectionProperties::default())
        .await
        .with_context(|| format!("failed to reconnect to delete queue {queue}"))?;
    let deleted = async {
        let channel = fresh.create_channel().await?;
        channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await
    }
    .await;
    let _ = fresh.close(200, "queue deleted".into()).await;
    deleted
        .map(|_| ())
        .with_context(|| format!("failed to delete queue {queue}"))
}

async fn confirm_loop(
    amqp_url: &str,
    channel: Channel,
    queue: &str,
    payload: &[u8],
    messages: u64,
    in_flight: usize,
) -> anyhow::Result<Throughput> {
    let consumer_connection = Connection::connect(amqp_url, ConnectionProperties::default())
        .await
        .context("failed to connect the raw consumer to RabbitMQ")?;
    let consumer = spawn_consumer(&consumer_connection, queue, messages).await;
    let result = match consumer {
        Ok(consumer) => {
            publish_and_drain(channel, queue, payload, messages, in_flight, consumer).await
        }
        Err(e) => Err(e),
    };
    let _ = consumer_connection
        .close(200, "raw bound done".into())
        .await;
    result
}

/// Starts the consumer; its task resolves to the instant of the last ack.
async fn spawn_consumer(
    connection: &Connection,
    queue: &str,
    messages: u64,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<Instant>>> {
    let channel = connection
        .create_channel()
        .await
        .context("failed to open the raw consumer channel")?;
    // Per-consumer (global: false): global QoS is refused by quorum queues on 3.10.
    channel
        .basic_qos(PREFETCH, BasicQosOptions { global: false })
        .await
        .context("failed to set the raw consumer's prefetch")?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "bench-raw-consumer".into(),
            BasicConsumeOptions::default(), // manual ack: no_ack is false
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("failed to consume from {queue}"))?;
    Ok(tokio::spawn(async move {
        let mut last_ack = Instant::now();
        for acked in 0..messages {
            let delivery = tokio::time::timeout(CONSUMER_IDLE_TIMEOUT, consumer.next())
                .await
                .with_context(|| {
                    format!("no delivery for {CONSUMER_IDLE_TIMEOUT:?} after {acked} acks")
                })?
                .with_context(|| format!("the consumer stream ended after {acked} acks"))?
                .context("the consumer received an error instead of a delivery")?;
            let sent = delivery
                .ack(BasicAckOptions::default())
                .await
                .context("failed to ack a delivery")?;
            if !sent {
                bail!("ack of delivery {} was not sent", delivery.delivery_tag);
            }
            last_ack = Instant::now();
        }
        Ok(last_ack)
    }))
}

async fn publish_and_drain(
    channel: Channel,
    queue: &str,
    payload: &[u8],
    messages: u64,
    in_flight: usize,
    consumer: tokio::task::JoinHandle<anyhow::Result<Instant>>,
) -> anyhow::Result<Throughput> {
    let abort_consumer = consumer.abort_handle();
    let published = async {
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .context("failed to enable publisher confirms")?;
        let publisher = Publisher {
            channel,
            queue: queue.to_owned(),
            payload: Arc::from(payload),
            next: Arc::new(AtomicU64::new(0)),
            messages,
        };
        let start = Instant::now();
        let latency = if in_flight == 1 {
            publisher.run().await?
        } else {
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..in_flight {
                tasks.spawn(publisher.clone().run());
            }
            let mut latency = new_histogram()?;
            while let Some(task) = tasks.join_next().await {
                let task_latency = task.context("a publisher task panicked")??;
                latency
                    .add(&task_latency)
                    .context("failed to merge latency histograms")?;
            }
            latency
        };
        anyhow::Ok((start, latency))
    }
    .await;
    let (start, latency) = match published {
        Ok(published) => published,
        Err(e) => {
            abort_consumer.abort();
            return Err(e);
        }
    };
    let last_ack = consumer.await.context("the consumer task panicked")??;
    Ok(Throughput {
        operations: messages,
        elapsed: last_ack.saturating_duration_since(start),
        latency,
    })
}

/// One publisher's view of the shared confirm channel; clones share the
/// message counter, so `messages` are published in total, not per task.
#[derive(Clone)]
struct Publisher {
    channel: Channel,
    queue: String,
    payload: Arc<[u8]>,
    next: Arc<AtomicU64>,
    messages: u64,
}

impl Publisher {
    async fn run(self) -> anyhow::Result<Histogram<u64>> {
        let mut latency = new_histogram()?;
        let properties = BasicProperties::default().with_delivery_mode(2);
        // mandatory: a message that reaches no queue comes back with its Ack.
        let options = BasicPublishOptions {
            mandatory: true,
            immediate: false,
        };
        while self.next.fetch_add(1, Ordering::Relaxed) < self.messages {
            let sent = Instant::now();
            let confirmation = self
                .channel
                .basic_publish(
                    "".into(),
                    self.queue.as_str().into(),
                    options,
                    &self.payload,
                    properties.clone(),
                )
                .await
                .context("failed to publish")?
                .await
                .context("failed to receive a publisher confirm")?;
            record(&mut latency, sent.elapsed());
            if !confirmation.is_ack() {
                bail!("the broker did not ack a publish: {confirmation:?}");
            }
            if let Some(returned) = confirmation.take_message() {
                bail!(
                    "the broker returned a publish: {} {}",
                    returned.reply_code,
                    returned.reply_text
                );
            }
        }
        Ok(latency)
    }
}

/// `concurrency` connections each commit single-row INSERTs (autocommit, one
/// row per statement, bound parameters: a uuid and a jsonb `payload`) as fast as
/// they can for `duration`, into table `table`, created (regular logged table,
/// uuid primary key) at the start and dropped at the end, also when an insert
/// fails. `pool` must allow at least `concurrency` connections.
///
/// Latency = one insert's round trip. Elapsed = first insert → last commit.
pub async fn postgres_inserts(
    pool: &PgPool,
    table: &str,
    payload: &serde_json::Value,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<Throughput> {
    if concurrency == 0 {
        bail!("concurrency must be at least 1");
    }
    check_identifier(table)?;
    sqlx::query(&format!(
        "CREATE TABLE {table} (id uuid PRIMARY KEY, payload jsonb NOT NULL)"
    ))
    .execute(pool)
    .await
    .with_context(|| format!("failed to create table {table}"))?;
    let result = insert_for(pool, table, payload, concurrency, duration).await;
    let dropped = sqlx::query(&format!("DROP TABLE IF EXISTS {table}"))
        .execute(pool)
        .await
        .with_context(|| format!("failed to drop table {table}"));
    result.and_then(|throughput| dropped.map(|_| throughput))
}

/// Table names are spliced into SQL, so only plain identifiers are allowed.
fn check_identifier(name: &str) -> anyhow::Result<()> {
    let mut chars = name.chars();
    let plain = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 63;
    if !plain {
        bail!("{name:?} is not a plain lowercase SQL identifier");
    }
    Ok(())
}

async fn insert_for(
    pool: &PgPool,
    table: &str,
    payload: &serde_json::Value,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<Throughput> {
    // Connect everything first so the timed part measures inserts only.
    let mut connections = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        connections.push(
            pool.acquire().await.context(
                "failed to acquire a connection (is the pool smaller than concurrency?)",
            )?,
        );
    }
    let statement: Arc<str> = format!("INSERT INTO {table} (id, payload) VALUES ($1, $2)").into();
    let payload = Arc::new(payload.clone());
    let start = Instant::now();
    let deadline = start + duration;
    let mut workers = tokio::task::JoinSet::new();
    for mut connection in connections {
        let statement = Arc::clone(&statement);
        let payload = Arc::clone(&payload);
        workers.spawn(async move {
            let mut latency = new_histogram()?;
            let mut operations = 0u64;
            while Instant::now() < deadline {
                let sent = Instant::now();
                sqlx::query(&statement)
                    .bind(Uuid::new_v4())
                    .bind(payload.as_ref())
                    .execute(&mut *connection)
                    .await
                    .context("failed to insert a row")?;
                record(&mut latency, sent.elapsed());
                operations += 1;
            }
            anyhow::Ok((operations, latency))
        });
    }
    let mut operations = 0;
    let mut latency = new_histogram()?;
    while let Some(worker) = workers.join_next().await {
        let (worker_operations, worker_latency) = worker.context("an insert worker panicked")??;
        operations += worker_operations;
        latency
            .add(&worker_latency)
            .context("failed to merge latency histograms")?;
    }
    Ok(Throughput {
        operations,
        elapsed: start.elapsed(),
        latency,
    })
}

/// A bare axum HTTP server: `POST /orders` parses the JSON body into a
/// `serde_json::Value` (400 on bad JSON, whatever the content type), does ONE
/// `INSERT INTO bare_orders (id, body) VALUES ($1, $2)` through a pool of
/// `pool_size` connections (table created IF NOT EXISTS at start), and answers
/// 202 with `{"order_id": "<uuid>", "status": "accepted"}`. It is the reference
/// "bare handler with one sqlx INSERT". Serves on `listener` until `shutdown`
/// is cancelled.
pub async fn serve_bare_axum(
    listener: tokio::net::TcpListener,
    database_url: &str,
    pool_size: u32,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let pool = PgPoolOptions::new()
        .max_connections(pool_size)
        .acquire_timeout(Duration::from_secs(5))
        .connect(database_url)
        .await
        .context("failed to connect the bare server's pool to Postgres")?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS bare_orders (id uuid PRIMARY KEY, body jsonb NOT NULL)",
    )
    .execute(&pool)
    .await
    .context("failed to create table bare_orders")?;
    let app = Router::new()
        .route("/orders", post(create_bare_order))
        .with_state(pool.clone());
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .context("the bare axum server failed");
    pool.close().await;
    served
}

async fn create_bare_order(State(pool): State<PgPool>, body: Bytes) -> Response {
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let order_id = Uuid::new_v4();
    let inserted = sqlx::query("INSERT INTO bare_orders (id, body) VALUES ($1, $2)")
        .bind(order_id)
        .bind(&body)
        .execute(&pool)
        .await;
    match inserted {
        Ok(_) => (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({ "order_id": order_id, "status": "accepted" })),
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error.message = %e, "bare insert failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
    const ADMIN_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

    fn report(name: &str, throughput: &Throughput) {
        let latency = &throughput.latency;
        eprintln!(
            "{name}: {} ops in {:?} = {:.0}/s; latency µs p50 {} p99 {} max {}",
            throughput.operations,
            throughput.elapsed,
            throughput.per_second(),
            latency.value_at_quantile(0.5),
            latency.value_at_quantile(0.99),
            latency.max(),
        );
    }

    #[test]
    fn recorded_latencies_above_two_milliseconds_are_not_clamped() {
        let mut histogram = new_histogram().unwrap();
        record(&mut histogram, Duration::from_millis(50));
        record(&mut histogram, Duration::from_micros(3));
        assert!(histogram.max() >= 49_950, "max was {}", histogram.max());
        assert_eq!(histogram.min(), 3);
        assert_eq!(histogram.len(), 2);
    }

    #[test]
    fn per_second_divides_operations_by_elapsed_and_is_zero_when_untimed() {
        let throughput = |elapsed| Throughput {
            operations: 500,
            elapsed,
            latency: new_histogram().unwrap(),
        };
        assert_eq!(throughput(Duration::from_millis(250)).per_second(), 2_000.0);
        assert_eq!(throughput(Duration::ZERO).per_second(), 0.0);
    }

    /// A database of its own for one test, dropped by `drop`.
    struct TestDatabase {
        admin: PgPool,
        name: String,
        url: String,
    }

    impl TestDatabase {
        async fn create() -> Self {
            let admin = PgPool::connect(ADMIN_DATABASE_URL).await.unwrap();
            let name = format!("bench_raw_{}", Uuid::new_v4().simple());
            sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(&admin)
                .await
                .unwrap();
            let url = format!("postgres://postgres@127.0.0.1:5432/{name}");
            Self { admin, name, url }
        }

        async fn drop(self) {
            sqlx::query(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .execute(&self.admin)
            .await
            .unwrap();
            self.admin.close().await;
        }
    }

    async fn confirm_loop_consumes_every_message(in_flight: usize) {
        let queue = format!("bench-raw-{}", Uuid::new_v4());
        let messages = 2_000;
        let throughput = amqp_confirm_loop(AMQP_URL, &queue, &[b'x'; 256], messages, in_flight)
            .await
            .unwrap();
        report(
            &format!("amqp confirm loop, in_flight {in_flight}"),
            &throughput,
        );
        assert_eq!(throughput.operations, messages);
        assert_eq!(throughput.latency.len(), messages);
        assert!(throughput.per_second() > 0.0);
        // The queue is gone: a passive declare on it must fail.
        let connection = Connection::connect(AMQP_URL, ConnectionProperties::default())
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let declared = channel
            .queue_declare(queue.as_str().into(), passive, FieldTable::default())
            .await;
        assert!(declared.is_err(), "queue {queue} was not deleted");
        let _ = connection.close(200, "test done".into()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn amqp_confirm_loop_consumes_every_message_one_at_a_time() {
        confirm_loop_consumes_every_message(1).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn amqp_confirm_loop_consumes_every_message_with_64_in_flight() {
        confirm_loop_consumes_every_message(64).await;
    }

    #[tokio::test]
    async fn amqp_confirm_loop_rejects_zero_in_flight() {
        let queue = format!("bench-raw-{}", Uuid::new_v4());
        assert!(
            amqp_confirm_loop(AMQP_URL, &queue, b"x", 1, 0)
                .await
                .is_err()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn postgres_inserts_commits_rows_for_the_whole_duration() {
        let database = TestDatabase::create().await;
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect(&database.url)
            .await
            .unwrap();
        let payload =
            serde_json::json!({ "customer_id": "c-1", "items": [{ "sku": "a", "quantity": 2 }] });
        let result =
            postgres_inserts(&pool, "raw_inserts", &payload, 4, Duration::from_secs(1)).await;
        let table_left =
            sqlx::query_scalar::<_, bool>("SELECT to_regclass('raw_inserts') IS NOT NULL")
                .fetch_one(&pool)
                .await;
        pool.close().await;
        database.drop().await;

        let throughput = result.unwrap();
        report("postgres inserts, concurrency 4", &throughput);
        assert!(throughput.operations > 0);
        assert_eq!(throughput.latency.len(), throughput.operations);
        assert!(throughput.elapsed >= Duration::from_secs(1));
        assert!(!table_left.unwrap(), "the table was not dropped");
    }

    #[tokio::test]
    async fn postgres_inserts_refuses_a_table_name_that_is_not_an_identifier() {
        let pool = PgPoolOptions::new()
            .connect_lazy(ADMIN_DATABASE_URL)
            .unwrap();
        let payload = serde_json::json!({});
        let result = postgres_inserts(&pool, "t; DROP TABLE x", &payload, 1, Duration::ZERO).await;
        assert!(result.is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn serve_bare_axum_accepts_an_order_and_rejects_bad_json() {
        let database = TestDatabase::create().await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn({
            let (url, shutdown) = (database.url.clone(), shutdown.clone());
            async move { serve_bare_axum(listener, &url, 4, shutdown).await }
        });
        let checked = async {
            let client = reqwest::Client::new();
            let url = format!("http://{address}/orders");
            // The server creates its table before serving; retry until it answers.
            let mut accepted = None;
            for _ in 0..50 {
                match client
                    .post(&url)
                    .json(&serde_json::json!({ "sku": "a" }))
                    .send()
                    .await
                {
                    Ok(response) => {
                        accepted = Some(response);
                        break;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
            let accepted = accepted.expect("the bare server never answered");
            assert_eq!(accepted.status(), reqwest::StatusCode::ACCEPTED);
            let body: serde_json::Value = accepted.json().await.unwrap();
            assert_eq!(body["status"], "accepted");
            let order_id: Uuid = body["order_id"].as_str().unwrap().parse().unwrap();

            let bad = client
                .post(&url)
                .header("content-type", "application/json")
                .body("{not json")
                .send()
                .await
                .unwrap();
            assert_eq!(bad.status(), reqwest::StatusCode::BAD_REQUEST);
            order_id
        };
        let order_id = checked.await;
        shutdown.cancel();
        server.await.unwrap().unwrap();

        let pool = PgPool::connect(&database.url).await.unwrap();
        let rows = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM bare_orders WHERE id = $1")
            .bind(order_id)
            .fetch_one(&pool)
            .await
            .unwrap();
        pool.close().await;
        database.drop().await;
        assert_eq!(rows, 1);
    }
}
