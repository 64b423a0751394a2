//! Waiting for a database connection: never a failed attempt, never a dead
//! letter, but not forever either.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use messaging::{
    Publisher, Topology,
    amqp::Envelope,
    consumer::{self, ConsumerSpec, Disposition, Each, Handler, RetryPolicy},
    contracts::{Lane, OrderPlaced},
};
use order_processor::{consumer::Orders, handler::Processor};
use platform::outbox::Relay;
use sqlx::{PgPool, postgres::PgPoolOptions};
use tokio_util::sync::CancellationToken;

use crate::helpers::{accepted_order, count, status, stock};

/// A consumer of the standard lane whose processor has a pool of one
/// connection, which the test holds.
struct Starved {
    pool: PgPool,
    /// The processor's only connection, until the test lets go of it.
    held: Option<sqlx::pool::PoolConnection<sqlx::Postgres>>,
    amqp: lapin::Connection,
    topology: Topology,
    publisher: Publisher,
    /// Handler answers that said "wait for a connection".
    waits: Arc<AtomicU32>,
    /// The most failed attempts any delivery carried when it was handled.
    most_attempts: Arc<AtomicU32>,
    shutdown: CancellationToken,
    _topology: test_support::TopologyGuard,
}

impl Drop for Starved {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn starved_consumer(retry: RetryPolicy) -> Starved {
    test_support::init_tracing();
    let (url, pool) = test_support::fresh_database().await;
    let starved = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_millis(200))
        .connect(&url)
        .await
        .unwrap();
    let held = starved.acquire().await.unwrap();
    let amqp = test_support::amqp().await;
    let topology = Topology::new(test_support::unique_prefix())
        .with_queue_expiry_ms(Some(test_support::QUEUE_EXPIRES_MS))
        .with_retry_delays(retry.delays());
    topology
        .declare(&amqp, &test_support::management())
        .await
        .expect("declaring the test topology");
    let publisher = test_support::publisher(&topology);
    let processor = Processor {
        pool: starved.clone(),
        topology: topology.clone(),
        event_bus: Default::default(),
        payments: crate::helpers::provider(1_000_000, false).await.client(),
        instance_id: "starved-processor".into(),
    };
    let relay = Relay::new(starved, publisher.clone());
    let (waits, most_attempts): (Arc<AtomicU32>, Arc<AtomicU32>) = Default::default();
    let shutdown = CancellationToken::new();
    let spec = ConsumerSpec {
        queue: topology.work_queue(Lane::Standard),
        tag: "starved".into(),
        service: "order-processor".into(),
        // Ten handlers at once on one connection.
        prefetch: 10,
        batch_size: 5,
        retry,
    };
    let channel = amqp.create_channel().await.unwrap();
    let (consumed, waited, attempted) = (
        topology.clone(),
        Arc::clone(&waits),
        Arc::clone(&most_attempts),
    );
    let (publishing, stop) = (publisher.clone(), shutdown.clone());
    tokio::spawn(async move {
        let handler = |delivery: lapin::message::Delivery| {
            let orders = Orders {
                processor: &processor,
                relay: &relay,
            };
            let (waited, attempted) = (&waited, &attempted);
            async move {
                attempted.fetch_max(
                    consumer::previous_attempts(&delivery.properties),
                    Ordering::SeqCst,
                );
                let disposition = orders.handle(delivery).await;
                if matches!(disposition, Disposition::Wait { .. }) {
                    waited.fetch_add(1, Ordering::SeqCst);
                }
                disposition
            }
        };
        consumer::run(&channel, &consumed, &publishing, spec, stop, Each(handler)).await
    });
    Starved {
        pool,
        held: Some(held),
        amqp,
        _topology: test_support::TopologyGuard(topology.clone()),
        topology,
        publisher,
        waits,
        most_attempts,
        shutdown,
    }
}

async fn publish(starved: &Starved, order: &OrderPlaced) {
    let envelope = Envelope {
        message_id: order.message_id,
        correlation_id: "starved".into(),
        order_id: order.order_id,
    };
    starved
        .publisher
        .publish(
            &starved.topology.orders_exchange(),
            order.lane.as_str(),
            &serde_json::to_vec(order).unwrap(),
            envelope.properties(),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn orders_waiting_for_the_only_connection_are_processed_once_it_is_free_with_no_attempt_counted()
 {
    let mut starved = starved_consumer(RetryPolicy {
        max_attempts: 2,
        initial_delay: Duration::from_millis(100),
        max_delay: Duration::from_millis(400),
        max_wait: Duration::from_secs(120),
    })
    .await;
    let stock_before = stock(&starved.pool, "WIDGET").await;
    let mut orders = Vec::new();
    for _ in 0..6 {
        let order = accepted_order(&starved.pool, &[("WIDGET", 1)]).await;
        publish(&starved, &order).await;
        orders.push(order);
    }

    // Far more pool timeouts than the two attempts a message has.
    test_support::eventually(
        Duration::from_secs(60),
        "every order to have waited for a connection three times",
        || async { (starved.waits.load(Ordering::SeqCst) >= 18).then_some(()) },
    )
    .await;
    for order in &orders {
        assert_eq!(status(&starved.pool, order.order_id).await.0, "accepted");
    }
    starved.held = None;

    for order in &orders {
        test_support::eventually(
            Duration::from_secs(60),
            "the order to be processed once the connection is free",
            || async {
                (status(&starved.pool, order.order_id).await.0 == "processed").then_some(())
            },
        )
        .await;
    }
    assert_eq!(
        starved.most_attempts.load(Ordering::SeqCst),
        0,
        "no delivery carried a failed attempt"
    );
    assert_eq!(
        stock_before - stock(&starved.pool, "WIDGET").await,
        6,
        "stock reserved once per order"
    );
    let decided = count!(
        &starved.pool,
        r#"SELECT count(*) AS "n!" FROM order_status_history WHERE status = 'processed'"#
    );
    assert_eq!(decided, 6, "each order decided once");
    let mut queues = vec![
        (starved.topology.dead_letters(), "dead letters"),
        (starved.topology.work_queue(Lane::Standard), "orders left"),
    ];
    queues.extend(
        starved
            .topology
            .retry_queues()
            .into_iter()
            .map(|q| (q, "retries")),
    );
    for (queue, what) in queues {
        assert_eq!(
            test_support::queue_depth(&starved.amqp, &queue).await,
            0,
            "{what}"
        );
    }
}

#[tokio::test]
async fn a_message_that_waits_longer_than_the_limit_counts_attempts_until_it_is_dead_lettered() {
    let starved = starved_consumer(RetryPolicy {
        max_attempts: 2,
        initial_delay: Duration::from_millis(100),
        max_delay: Duration::from_millis(100),
        max_wait: Duration::from_millis(500),
    })
    .await;
    let order = accepted_order(&starved.pool, &[("WIDGET", 1)]).await;

    publish(&starved, &order).await;

    let dead = test_support::next_message(
        &starved.amqp,
        &starved.topology.dead_letters(),
        Duration::from_secs(60),
    )
    .await;
    let reason = test_support::header(&dead, consumer::REASON_HEADER).unwrap();
    assert!(
        reason.starts_with("gave up after 2 attempts: still waiting after"),
        "{reason}"
    );
    assert!(reason.contains("pool timed out"), "{reason}");
    assert_eq!(consumer::previous_attempts(&dead.properties), 2);
    assert!(starved.waits.load(Ordering::SeqCst) >= 2);
    assert_eq!(
        status(&starved.pool, order.order_id).await.0,
        "accepted",
        "no final status (this test's handler, a closure around `Orders`, holds no order)"
    );
}
