//! Listing and replaying against the real broker.

use std::time::Duration;

use dead_letters::{Selection, list_queue as list, replay};
use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, LongString},
};
use messaging::{
    consumer::{ATTEMPTS_HEADER, QUEUE_HEADER, REASON_HEADER, SERVICE_HEADER},
    contracts::Lane,
};

fn dead_properties(message_id: &str, queue: &str, reason: &str) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (name, value) in [
        (REASON_HEADER, reason),
        (SERVICE_HEADER, "order-processor"),
        (QUEUE_HEADER, queue),
    ] {
        headers.insert(name.into(), AMQPValue::LongString(LongString::from(value)));
    }
    headers.insert(ATTEMPTS_HEADER.into(), AMQPValue::LongUInt(5));
    BasicProperties::default()
        .with_message_id(message_id.into())
        .with_headers(headers)
}

/// A topology of the test's own on the shared broker, and a fresh database.
struct Setup {
    connection: lapin::Connection,
    topology: messaging::Topology,
    broker: messaging::Broker,
    pool: sqlx::PgPool,
    _guard: test_support::TopologyGuard,
}

impl Setup {
    async fn new() -> Self {
        let connection = test_support::amqp().await;
        let topology =
            test_support::declare_topology(&connection, &test_support::unique_prefix()).await;
        Setup {
            broker: test_support::broker(&topology),
            pool: test_support::fresh_database().await.1,
            _guard: test_support::TopologyGuard(topology.clone()),
            connection,
            topology,
        }
    }
}

#[tokio::test]
async fn dead_letters_are_listed_with_their_reason_and_replayed_one_at_a_time() {
    let Setup {
        connection,
        topology,
        broker,
        pool,
        _guard,
    } = Setup::new().await;
    let publisher = test_support::publisher(&topology);
    let work = topology.work_queue(Lane::Standard);
    for (id, reason) in [
        ("m-1", "gave up after 5 attempts: db down"),
        ("m-2", "not an OrderPlaced message"),
    ] {
        publisher
            .publish(
                &topology.dead_letters(),
                "",
                id.as_bytes(),
                dead_properties(id, &work, reason),
            )
            .await
            .unwrap();
    }

    let letters = list(&broker).await.unwrap();
    assert_eq!(letters.len(), 2);
    assert_eq!(letters[0].message_id, "m-1");
    assert_eq!(letters[0].reason, "gave up after 5 attempts: db down");
    assert_eq!(letters[0].attempts, 5);
    assert_eq!(letters[1].queue.as_deref(), Some(work.as_str()));
    assert_eq!(
        list(&broker).await.unwrap().len(),
        2,
        "listing leaves them in place"
    );

    let replayed = replay(&broker, &pool, &Selection::MessageId("m-2".into()))
        .await
        .unwrap();

    assert_eq!(replayed.len(), 1);
    let back = test_support::next_message(&connection, &work, Duration::from_secs(5)).await;
    assert_eq!(back.data, b"m-2");
    assert_eq!(
        messaging::consumer::previous_attempts(&back.properties),
        0,
        "a replay starts with fresh attempts"
    );
    let left = list(&broker).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].message_id, "m-1");

    assert_eq!(
        replay(&broker, &pool, &Selection::All).await.unwrap().len(),
        1
    );
    assert!(list(&broker).await.unwrap().is_empty());
}

#[tokio::test]
async fn dead_letters_survive_being_listed_and_partly_replayed_a_hundred_times() {
    // Every listing and every partial replay hands the other dead letters
    // back by closing its channel, which a quorum queue counts as a
    // delivery: on RabbitMQ 4.x, past the default limit of 20, a queue
    // without an explicit "no limit" would drop them.
    let Setup {
        connection,
        topology,
        broker,
        pool,
        _guard,
    } = Setup::new().await;
    let publisher = test_support::publisher(&topology);
    let work = topology.work_queue(Lane::Standard);
    let ids: Vec<String> = (1..=4).map(|i| format!("d-{i}")).collect();
    for id in &ids {
        publisher
            .publish(
                &topology.dead_letters(),
                "",
                id.as_bytes(),
                dead_properties(id, &work, "gave up"),
            )
            .await
            .unwrap();
    }

    for round in 0..100 {
        let mut listed: Vec<String> = list(&broker)
            .await
            .unwrap()
            .into_iter()
            .map(|l| l.message_id)
            .collect();
        listed.sort();
        assert_eq!(listed, ids, "round {round}: every dead letter is listed");
        // Always the same one: the others are only ever handed back.
        let chosen = &ids[0];
        let replayed = replay(&broker, &pool, &Selection::MessageId(chosen.clone()))
            .await
            .unwrap();
        assert_eq!(replayed.len(), 1, "round {round}: {chosen} replayed");
        // It fails again: back to the dead letters, as a consumer would.
        let back = test_support::next_message(&connection, &work, Duration::from_secs(10)).await;
        assert_eq!(back.data, chosen.as_bytes());
        publisher
            .publish(
                &topology.dead_letters(),
                "",
                &back.data,
                dead_properties(chosen, &work, "gave up"),
            )
            .await
            .unwrap();
    }
    assert_eq!(list(&broker).await.unwrap().len(), ids.len());
}

#[tokio::test]
async fn replaying_an_orders_message_accepts_its_held_order_again() {
    let Setup {
        connection,
        topology,
        broker,
        pool,
        _guard,
    } = Setup::new().await;
    let work = topology.work_queue(Lane::Standard);
    let order_id = uuid::Uuid::new_v4();
    sqlx::query!(
        "WITH o AS (
             INSERT INTO orders (id, customer_id, email, items, total_cents, currency, lane,
                                 status, reason, correlation_id)
             VALUES ($1, 'c-1', 'c-1@example.com', '[]', 100, 'EUR', 'standard', 'held',
                     'gave up after 5 attempts', 'corr-1') RETURNING id)
         INSERT INTO outbox (message_id, exchange, routing_key, payload, correlation_id, order_id,
                             published_at)
         SELECT $2, $3, 'standard', '{}', 'corr-1', id, now() - interval '1 hour' FROM o",
        order_id,
        uuid::Uuid::new_v4(),
        topology.orders_exchange(),
    )
    .execute(&pool)
    .await
    .unwrap();
    let mut properties = dead_properties("m-held", &work, "gave up after 5 attempts");
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert(
        messaging::contracts::ORDER_ID_HEADER.into(),
        AMQPValue::LongString(LongString::from(order_id.to_string())),
    );
    headers.insert(
        messaging::consumer::HELD_HEADER.into(),
        AMQPValue::Boolean(true),
    );
    properties = properties.with_headers(headers);
    test_support::publisher(&topology)
        .publish(&topology.dead_letters(), "", b"{}", properties)
        .await
        .unwrap();

    let replayed = replay(&broker, &pool, &Selection::All).await.unwrap();

    assert_eq!(replayed.len(), 1);
    let back = test_support::next_message(&connection, &work, Duration::from_secs(5)).await;
    assert!(
        back.properties
            .headers()
            .as_ref()
            .is_none_or(|h| !h.inner().contains_key(messaging::consumer::HELD_HEADER)),
        "a replay carries no earlier answer to whether its order is held"
    );
    let row = sqlx::query!(
        r#"SELECT o.status, o.reason, m.published_at < now() - interval '1 minute' AS "silent!"
         FROM orders o JOIN outbox m ON m.order_id = o.id WHERE o.id = $1"#,
        order_id,
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((row.status.as_str(), row.reason), ("accepted", None));
    assert!(
        !row.silent,
        "its message counts as published now: the republisher watches it again"
    );
    let last = sqlx::query!(
        "SELECT status, service FROM order_status_history WHERE order_id = $1 ORDER BY id DESC LIMIT 1",
        order_id,
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (last.status, last.service),
        ("accepted".to_owned(), "dead-letters".to_owned())
    );
}
