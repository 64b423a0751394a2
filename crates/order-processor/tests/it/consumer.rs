//! The real consumer: messages on the broker in, events on the broker out.

use std::time::Duration;

use clap::Parser;
use messaging::{
    Publisher, Topology,
    amqp::Envelope,
    consumer,
    contracts::{Lane, OrderEvent, OrderPlaced, Outcome},
};
use order_processor::{configuration::Settings, startup::Application};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::helpers::{accepted_order, accepted_order_of, status};

struct Running {
    pool: PgPool,
    topology: Topology,
    amqp: lapin::Connection,
    publisher: Publisher,
    port: u16,
    shutdown: CancellationToken,
    _topology: test_support::TopologyGuard,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start() -> Running {
    start_with(|_| {}).await
}

async fn start_with(configure: impl FnOnce(&mut Settings)) -> Running {
    test_support::init_tracing();
    let (url, pool) = test_support::fresh_database().await;
    let mut settings = Settings::parse_from(["order-processor"]);
    test_support::isolate(&mut settings.worker.service, url);
    settings.http_port = 0;
    // Demo customers (`flaky-2`, `doomed`) fail as they ask.
    settings.provider = crate::helpers::provider(1_000_000, true).await.settings();
    configure(&mut settings);
    let topology = settings.worker.topology();
    let app = Application::build(settings)
        .await
        .expect("starting the processor");
    let port = app.port();
    let shutdown = CancellationToken::new();
    tokio::spawn(app.run_until_stopped(shutdown.clone()));
    let amqp = test_support::amqp().await;
    let publisher = test_support::publisher(&topology);
    Running {
        pool,
        _topology: test_support::TopologyGuard(topology.clone()),
        topology,
        amqp,
        publisher,
        port,
        shutdown,
    }
}

async fn publish_order(running: &Running, order: &OrderPlaced, correlation_id: &str) {
    let envelope = Envelope {
        message_id: order.message_id,
        correlation_id: correlation_id.into(),
        order_id: order.order_id,
    };
    running
        .publisher
        .publish(
            &running.topology.orders_exchange(),
            order.lane.as_str(),
            &serde_json::to_vec(order).unwrap(),
            envelope.properties(),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn an_order_on_the_work_queue_is_processed_and_announced_on_the_fanout() {
    let running = start().await;
    let order = accepted_order(&running.pool, &[("GADGET", 1)]).await;

    // The correlation id order-api stored with the order, and sent.
    publish_order(&running, &order, "corr-1").await;

    // Both subscriber queues get the event; read one without a consumer.
    let queue = running.topology.subscriber_queue("logging-service");
    let delivery = test_support::next_message(&running.amqp, &queue, Duration::from_secs(10)).await;
    let event: OrderEvent = serde_json::from_slice(&delivery.data).unwrap();
    assert_eq!(event.order_id, order.order_id);
    assert_eq!(event.outcome, Outcome::Processed);
    assert_eq!(
        delivery
            .properties
            .correlation_id()
            .as_ref()
            .unwrap()
            .as_str(),
        "corr-1"
    );
    assert_eq!(status(&running.pool, order.order_id).await.0, "processed");
    let other = running.topology.subscriber_queue("notification-service");
    assert_eq!(test_support::queue_depth(&running.amqp, &other).await, 1);
}

#[tokio::test]
async fn a_poison_message_is_dead_lettered_with_its_reason_and_the_flow_goes_on() {
    let running = start().await;
    running
        .publisher
        .publish(
            &running.topology.orders_exchange(),
            "standard",
            b"{this is not an order",
            lapin::BasicProperties::default(),
        )
        .await
        .unwrap();
    let order = accepted_order(&running.pool, &[("WIDGET", 1)]).await;
    publish_order(&running, &order, "after-poison").await;

    let dead = test_support::next_message(
        &running.amqp,
        &running.topology.dead_letters(),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(dead.data, b"{this is not an order");
    let reason = test_support::header(&dead, consumer::REASON_HEADER).expect("a reason");
    assert!(reason.starts_with("not an OrderPlaced message"), "{reason}");
    assert_eq!(
        test_support::header(&dead, consumer::SERVICE_HEADER).as_deref(),
        Some("order-processor")
    );
    assert_eq!(
        test_support::header(&dead, consumer::QUEUE_HEADER),
        Some(running.topology.work_queue(Lane::Standard))
    );
    test_support::eventually(
        Duration::from_secs(10),
        "the good order to be processed",
        || async { (status(&running.pool, order.order_id).await.0 == "processed").then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn the_health_port_reports_ready() {
    let running = start().await;
    let response = reqwest::get(format!("http://127.0.0.1:{}/readyz", running.port))
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
}

#[tokio::test]
async fn a_transient_failure_is_retried_with_backoff_and_then_succeeds() {
    let running = start_with(|s| {
        s.worker.retry_initial_delay_ms = 100;
    })
    .await;
    let mut order = accepted_order(&running.pool, &[("WIDGET", 1)]).await;
    order.customer_id = "flaky-2".into();

    publish_order(&running, &order, "flaky").await;

    test_support::eventually(
        Duration::from_secs(15),
        "the order to succeed on its third attempt",
        || async { (status(&running.pool, order.order_id).await.0 == "processed").then_some(()) },
    )
    .await;
    assert_eq!(
        test_support::queue_depth(&running.amqp, &running.topology.dead_letters()).await,
        0
    );
}

#[tokio::test]
async fn a_message_failing_every_attempt_is_dead_lettered_with_why_and_how_often() {
    let running = start_with(|s| {
        s.worker.retry_max_attempts = 3;
        s.worker.retry_initial_delay_ms = 100;
    })
    .await;
    let order = accepted_order_of(&running.pool, "doomed", &[("WIDGET", 1)]).await;

    publish_order(&running, &order, "doomed").await;

    let dead = test_support::next_message(
        &running.amqp,
        &running.topology.dead_letters(),
        Duration::from_secs(15),
    )
    .await;
    let reason = test_support::header(&dead, consumer::REASON_HEADER).unwrap();
    assert!(
        reason.starts_with("gave up after 3 attempts: payment provider answered 503 to authorise"),
        "{reason}"
    );
    assert_eq!(consumer::previous_attempts(&dead.properties), 3);
    let (held, why) = status(&running.pool, order.order_id).await;
    assert_eq!(held, "held", "no final status, and the client sees why");
    assert_eq!(
        dead.properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(consumer::HELD_HEADER).cloned()),
        Some(lapin::types::AMQPValue::Boolean(true)),
        "the dead letter says its order is held"
    );
    assert_eq!(why.as_deref(), Some(reason.as_str()));
    let history: Vec<(String, Option<String>)> = sqlx::query!(
        "SELECT status, detail FROM order_status_history WHERE order_id = $1 ORDER BY id",
        order.order_id,
    )
    .fetch_all(&running.pool)
    .await
    .unwrap()
    .into_iter()
    .map(|row| (row.status, row.detail))
    .collect();
    assert_eq!(
        history.last(),
        Some(&("held".to_owned(), Some(reason.clone())))
    );
    let decoded: OrderPlaced = serde_json::from_slice(&dead.data).unwrap();
    assert_eq!(
        decoded.order_id, order.order_id,
        "the dead letter is the original message"
    );
}

#[tokio::test]
async fn metrics_show_decisions_prefetch_and_handling_time() {
    // An unset DB_MAX_CONNECTIONS sizes the pool for the whole prefetch.
    let running = start_with(|s| s.worker.service.database.db_max_connections = None).await;
    let order = accepted_order(&running.pool, &[("WIDGET", 1)]).await;
    publish_order(&running, &order, "metrics").await;
    test_support::eventually(
        Duration::from_secs(10),
        "the order to be processed",
        || async { (status(&running.pool, order.order_id).await.0 == "processed").then_some(()) },
    )
    .await;

    let text = reqwest::get(format!("http://127.0.0.1:{}/metrics", running.port))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();

    assert!(
        text.contains("orders_decided_total{outcome=\"processed\"}"),
        "{text}"
    );
    let queue = running.topology.work_queue(Lane::Standard);
    assert!(
        text.contains(&format!("consumer_prefetch{{queue=\"{queue}\"}} 10")),
        "{text}"
    );
    assert!(text.contains("message_handling_seconds_bucket"), "{text}");
}

#[tokio::test]
async fn a_pool_too_small_for_the_prefetch_lowers_the_prefetch_to_what_it_can_serve() {
    // Three connections, one kept for the relay and health checks: one
    // message at a time on each of the two lanes instead of ten, each on
    // its own (no batching).
    let running = start_with(|s| {
        s.worker.service.database.db_max_connections = Some(3);
        s.worker.prefetch = 10;
        s.worker.batch_size = 1;
    })
    .await;
    let order = accepted_order(&running.pool, &[("WIDGET", 1)]).await;
    publish_order(&running, &order, "small-pool").await;
    test_support::eventually(
        Duration::from_secs(10),
        "the order to be processed",
        || async { (status(&running.pool, order.order_id).await.0 == "processed").then_some(()) },
    )
    .await;

    let text = reqwest::get(format!("http://127.0.0.1:{}/metrics", running.port))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();

    for lane in [Lane::Express, Lane::Standard] {
        let queue = running.topology.work_queue(lane);
        assert!(
            text.contains(&format!("consumer_prefetch{{queue=\"{queue}\"}} 1\n")),
            "{text}"
        );
    }
}

#[tokio::test]
async fn the_final_outbox_flush_waits_for_a_delivery_still_committing() {
    test_support::init_tracing();
    let (url, pool) = test_support::fresh_database().await;
    let mut settings = Settings::parse_from(["order-processor"]);
    test_support::isolate(&mut settings.worker.service, url);
    settings.http_port = 0;
    settings.provider = crate::helpers::provider(1_000_000, false).await.settings();
    let topology = settings.worker.service.amqp.topology();
    let _guard = test_support::TopologyGuard(topology.clone());
    let app = Application::build(settings).await.unwrap();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(app.run_until_stopped(shutdown.clone()));
    let order = accepted_order(&pool, &[("GADGET", 1)]).await;

    // Hold the orders table, so the delivery waits inside its transaction.
    let mut lock = pool.begin().await.unwrap();
    sqlx::query!("LOCK TABLE orders IN EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let envelope = Envelope {
        message_id: order.message_id,
        correlation_id: "corr-flush".into(),
        order_id: order.order_id,
    };
    test_support::publisher(&topology)
        .publish(
            &topology.orders_exchange(),
            order.lane.as_str(),
            &serde_json::to_vec(&order).unwrap(),
            envelope.properties(),
        )
        .await
        .unwrap();
    test_support::eventually(
        Duration::from_secs(30),
        "the delivery waiting for the lock",
        || async {
            let waiting: i64 = sqlx::query_scalar!(
                r#"SELECT count(*) AS "n!" FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'"#,
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            (waiting > 0).then_some(())
        },
    )
    .await;

    shutdown.cancel();
    lock.commit().await.unwrap();
    running.await.unwrap().unwrap();

    assert_eq!(status(&pool, order.order_id).await.0, "processed");
    let unpublished: i64 =
        sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM outbox WHERE published_at IS NULL"#)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        unpublished, 0,
        "the event committed during shutdown was published and marked"
    );
}
