//! order-stats against the real Postgres and RabbitMQ: the read model built
//! live equals the one rebuilt from the beginning of the log, and a reader
//! killed in the middle of a rebuild counts every event once after restart.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use clap::Parser;
use lapin::BasicProperties;
use messaging::{
    Topology,
    contracts::{Lane, OrderEvent, OrderLine, Outcome, PaymentOutcome, SCHEMA_VERSION},
};
use order_stats::{configuration::Settings, startup::Application};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const SKUS: [&str; 4] = ["WIDGET", "GADGET", "GIZMO", "DOOHICKEY"];

/// The settings of an order-stats reading `prefix`'s log into `database_url`.
fn settings(database_url: &str, prefix: &str, extra: &[&str]) -> Settings {
    let mut args = vec!["order-stats", "--http-port", "0", "--batch-size", "10"];
    args.extend_from_slice(extra);
    let mut settings = Settings::parse_from(args);
    settings.service.database.database_url = database_url.to_owned();
    settings.service.amqp.amqp_url = test_support::amqp_url();
    settings.service.amqp.rabbitmq_management_url = Some(test_support::management_url());
    settings.service.amqp.topology_prefix = prefix.to_owned();
    settings.service.amqp.topology_queue_expires_ms = Some(test_support::QUEUE_EXPIRES_MS);
    settings
}

/// A unique prefix, its topology, and the guard that deletes it after.
fn test_topology() -> (String, Topology, test_support::TopologyGuard) {
    test_support::init_tracing();
    let prefix = test_support::unique_prefix();
    let topology = Topology::new(prefix.clone());
    (
        prefix,
        topology.clone(),
        test_support::TopologyGuard(topology),
    )
}

struct Running {
    port: u16,
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    async fn start(settings: Settings) -> Self {
        let app = Application::build(settings).await.unwrap();
        let port = app.port();
        let stop = CancellationToken::new();
        let task = tokio::spawn(app.run_until_stopped(stop.clone()));
        Self { port, stop, task }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// `n` events over the last few minutes, with every SKU, two currencies and
/// both outcomes.
fn events(n: usize) -> Vec<OrderEvent> {
    let now = Utc::now();
    (0..n)
        .map(|i| {
            let processed = i % 5 != 0;
            let minutes_ago = i64::try_from((n - i) / 40).unwrap();
            OrderEvent {
                schema_version: SCHEMA_VERSION,
                message_id: Uuid::new_v4(),
                occurred_at: now - TimeDelta::minutes(minutes_ago),
                outcome: if processed {
                    Outcome::Processed
                } else {
                    Outcome::Rejected {
                        reason: "out_of_stock".into(),
                    }
                },
                order_id: Uuid::new_v4(),
                customer_id: format!("c-{i}"),
                email: "ada@example.com".into(),
                total_cents: 100 + i64::try_from(i).unwrap(),
                currency: if i % 3 == 0 { "USD" } else { "EUR" }.into(),
                lane: Lane::Standard,
                processed_by: "processor-test".into(),
                callback_url: None,
                payment: Some(if processed {
                    PaymentOutcome::Captured
                } else {
                    PaymentOutcome::Voided
                }),
                items: vec![
                    OrderLine {
                        sku: SKUS[i % 4].into(),
                        quantity: i32::try_from(i % 3 + 1).unwrap(),
                    },
                    OrderLine {
                        sku: SKUS[(i + 1) % 4].into(),
                        quantity: 1,
                    },
                ],
            }
        })
        .collect()
}

/// Publish `events` to the events exchange, confirmed; every tenth twice
/// (a publisher retry after a lost confirm) and, after the first half, one
/// entry that is not an event.
async fn publish(topology: &Topology, events: &[OrderEvent]) {
    let publisher = test_support::publisher(topology);
    let exchange = topology.events_exchange();
    for (i, event) in events.iter().enumerate() {
        let payload = serde_json::to_vec(event).unwrap();
        let properties =
            BasicProperties::default().with_message_id(event.message_id.to_string().into());
        let copies = if i % 10 == 0 { 2 } else { 1 };
        for _ in 0..copies {
            publisher
                .publish(&exchange, "", &payload, properties.clone())
                .await
                .unwrap();
        }
        if i == events.len() / 2 {
            publisher
                .publish(
                    &exchange,
                    "",
                    b"{\"order_id\": oops",
                    BasicProperties::default(),
                )
                .await
                .unwrap();
        }
    }
}

type Model = (
    Vec<(DateTime<Utc>, String, i64, i64, i64)>,
    Vec<(DateTime<Utc>, String, i64, i64, i64)>,
);

async fn model(pool: &PgPool) -> Model {
    let skus = sqlx::query!(
        "SELECT minute, sku, orders, units, rejected FROM sales_per_minute ORDER BY minute, sku",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .map(|row| (row.minute, row.sku, row.orders, row.units, row.rejected))
    .collect();
    let revenue = sqlx::query!(
        "SELECT minute, currency, orders, rejected, revenue_cents FROM revenue_per_minute ORDER BY minute, currency",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .map(|row| {
        (
            row.minute,
            row.currency,
            row.orders,
            row.rejected,
            row.revenue_cents,
        )
    })
    .collect();
    (skus, revenue)
}

/// The read model `events` should give, worked out here.
fn expected(events: &[OrderEvent]) -> Model {
    let minute = |t: DateTime<Utc>| t.duration_trunc(TimeDelta::minutes(1)).unwrap();
    let mut skus: BTreeMap<(DateTime<Utc>, String), (i64, i64, i64)> = BTreeMap::new();
    let mut revenue: BTreeMap<(DateTime<Utc>, String), (i64, i64, i64)> = BTreeMap::new();
    for event in events {
        let processed = matches!(event.outcome, Outcome::Processed);
        for line in &event.items {
            let row = skus
                .entry((minute(event.occurred_at), line.sku.clone()))
                .or_default();
            if processed {
                row.0 += 1;
                row.1 += i64::from(line.quantity);
            } else {
                row.2 += 1;
            }
        }
        let row = revenue
            .entry((minute(event.occurred_at), event.currency.clone()))
            .or_default();
        if processed {
            row.0 += 1;
            row.2 += event.total_cents;
        } else {
            row.1 += 1;
        }
    }
    (
        skus.into_iter()
            .map(|((m, s), (o, u, r))| (m, s, o, u, r))
            .collect(),
        revenue
            .into_iter()
            .map(|((m, c), (o, r, v))| (m, c, o, r, v))
            .collect(),
    )
}

/// Wait until the reader in `pool` has counted `events` events and skipped
/// one entry.
async fn counted(pool: &PgPool, events: usize) {
    let wanted = (i64::try_from(events).unwrap(), 1);
    test_support::eventually(Duration::from_secs(120), "every event counted", || async {
        let got: Option<(i64, i64)> =
            sqlx::query!("SELECT events, skipped FROM event_log_positions")
                .fetch_optional(pool)
                .await
                .unwrap()
                .map(|row| (row.events, row.skipped));
        (got == Some(wanted)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_rebuild_from_the_beginning_of_the_log_matches_the_model_built_live() {
    let (prefix, topology, _guard) = test_topology();
    let (live_url, live_pool) = test_support::fresh_database().await;
    let live = Running::start(settings(&live_url, &prefix, &[])).await;

    let events = events(300);
    publish(&topology, &events).await;
    counted(&live_pool, events.len()).await;
    let built_live = model(&live_pool).await;
    assert_eq!(
        built_live,
        expected(&events),
        "the live model counts each event once"
    );
    let skipped = sqlx::query!("SELECT stream_offset, reason FROM event_log_skipped")
        .fetch_one(&live_pool)
        .await
        .unwrap();
    assert_eq!(
        skipped.reason, "not an order event: Syntax error at line 1 column 14",
        "why, without quoting the entry"
    );

    // Over HTTP: the last minute's numbers, and a clear error for a bad window.
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{}/stats", live.port);
    let answer: serde_json::Value = client
        .get(format!("{url}?minutes=2"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["log"]["events"], 300, "{answer}");
    assert_eq!(answer["log"]["skipped"], 1, "{answer}");
    assert!(
        !answer["revenue"].as_array().unwrap().is_empty(),
        "{answer}"
    );
    for bad in ["0", "abc", "-1", "1441"] {
        let response = client
            .get(format!("{url}?minutes={bad}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "minutes={bad}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert!(
            body["error"].as_str().unwrap().contains("minutes"),
            "{body}"
        );
    }
    live.stop().await;

    // A new reader with an empty read model starts at the beginning.
    let (fresh_url, fresh_pool) = test_support::fresh_database().await;
    let started = Instant::now();
    let fresh = Running::start(settings(&fresh_url, &prefix, &[])).await;
    counted(&fresh_pool, events.len()).await;
    println!(
        "rebuilt the read model from the beginning of the log ({} entries) in {:?}",
        events.len() + 1,
        started.elapsed()
    );
    assert_eq!(
        model(&fresh_pool).await,
        built_live,
        "rebuilt into an empty database"
    );
    fresh.stop().await;

    // --from first empties the model in place and rebuilds it.
    sqlx::query!("UPDATE sales_per_minute SET units = units + 1000")
        .execute(&live_pool)
        .await
        .unwrap();
    let rebuilt = Running::start(settings(&live_url, &prefix, &["--from", "first"])).await;
    counted(&live_pool, events.len()).await;
    assert_eq!(
        model(&live_pool).await,
        built_live,
        "rebuilt with --from first"
    );
    rebuilt.stop().await;
}

/// The binary, started by hand so it can be killed with SIGKILL.
fn spawn(database_url: &str, prefix: &str) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_order-stats"))
        .env("DATABASE_URL", database_url)
        .env("AMQP_URL", test_support::amqp_url())
        .env("RABBITMQ_MANAGEMENT_URL", test_support::management_url())
        .env("TOPOLOGY_PREFIX", prefix)
        .env(
            "TOPOLOGY_QUEUE_EXPIRES_MS",
            test_support::QUEUE_EXPIRES_MS.to_string(),
        )
        .env("HTTP_PORT", "0")
        .env("BATCH_SIZE", "10")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("starting order-stats")
}

#[tokio::test]
async fn a_reader_killed_in_the_middle_of_a_rebuild_counts_every_event_once_after_restart() {
    let (prefix, topology, _guard) = test_topology();
    let (url, pool) = test_support::fresh_database().await;
    // The log fills before this reader ever runs: it rebuilds from the start.
    let declarer = Running::start(settings(
        &test_support::fresh_database().await.0,
        &prefix,
        &[],
    ))
    .await;
    declarer.stop().await;
    let events = events(400);
    publish(&topology, &events).await;

    // Hold the middle: a row the batch holding the middle event must write
    // is locked by a transaction of the test's, so the reader stops there
    // with the earlier batches committed.
    let middle = &events[events.len() / 2];
    let mut blocker = pool.begin().await.unwrap();
    sqlx::query!(
        "INSERT INTO revenue_per_minute (minute, currency) VALUES (date_trunc('minute', $1::timestamptz, 'UTC'), $2)",
        middle.occurred_at,
        middle.currency,
    )
    .execute(&mut *blocker)
    .await
    .unwrap();
    let mut reader = spawn(&url, &prefix);
    test_support::eventually(Duration::from_secs(120), "the reader to wait on the held row", || async {
        let waiting: i64 = sqlx::query_scalar!(
            r#"SELECT count(*) AS "n!" FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"#,
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        (waiting > 0).then_some(())
    })
    .await;
    let before: i64 = sqlx::query_scalar!("SELECT events FROM event_log_positions")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(
        before > 0 && before < 400,
        "killed mid-rebuild, at {before} of 400"
    );
    reader.kill().unwrap();
    reader.wait().unwrap();
    blocker.rollback().await.unwrap();
    println!("killed order-stats -9 after {before} of 400 events; starting it again");

    let mut restarted = spawn(&url, &prefix);
    counted(&pool, events.len()).await;
    assert_eq!(
        model(&pool).await,
        expected(&events),
        "every event counted once"
    );
    let seen: i64 = sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM event_log_seen"#)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(seen, 400);
    restarted.kill().unwrap();
    restarted.wait().unwrap();
}
