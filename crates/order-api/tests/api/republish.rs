//! Orders the broker forgot are published again from Postgres, and a queue
//! that still holds them gets nothing more; a dead letter hides no forgotten
//! order, and a held order (its message in the dead letters) is not sent.

use std::time::Duration;

use lapin::options::QueuePurgeOptions;
use messaging::{Broker, contracts::Lane};
use order_api::{auth::Scope, republish::Republisher, startup::Application};
use sqlx::PgPool;
use test_support::TopologyGuard;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::helpers::{client_with, new_key, order_body, test_settings};

/// One order accepted and published by an order-api that has stopped since
/// (its own checks must not hold the lock while the test runs them).
async fn one_order_published() -> (PgPool, Broker, TopologyGuard) {
    let (settings, pool) = test_settings().await;
    let guard = TopologyGuard(settings.service.amqp.topology());
    let broker = settings.service.amqp.broker().unwrap();
    // order-api accepts and publishes one order, then stops: its own checks
    // must not hold the lock while the test runs them.
    let application = Application::build(settings).await.unwrap();
    let url = format!("http://127.0.0.1:{}/orders", application.port());
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(application.run_until_stopped(shutdown.clone()));
    let client = client_with(&new_key(&pool, "test-client", Scope::Client).await);
    let response = client.post(url).json(&order_body()).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 202);
    shutdown.cancel();
    running.await.unwrap().unwrap();
    (pool, broker, guard)
}

/// A republisher for which every order is overdue at once.
fn overdue(pool: &PgPool, broker: &Broker) -> Republisher {
    let publisher = messaging::Publisher::new(broker.clone());
    Republisher::new(pool.clone(), broker.clone(), publisher, Duration::ZERO)
}

async fn purge(amqp: &lapin::Connection, queue: &str) {
    let channel = amqp.create_channel().await.unwrap();
    channel
        .queue_purge(queue.into(), QueuePurgeOptions::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn an_accepted_order_the_broker_no_longer_has_is_published_again_once() {
    let (pool, broker, guard) = one_order_published().await;
    let topology = &guard.0;
    let amqp = test_support::amqp().await;
    let queue = topology.work_queue(Lane::Standard);
    assert_eq!(test_support::queue_depth(&amqp, &queue).await, 1);
    let waiting_a_while = Republisher::new(
        pool.clone(),
        broker.clone(),
        messaging::Publisher::new(broker.clone()),
        Duration::from_secs(3600),
    );
    let overdue = overdue(&pool, &broker);
    assert_eq!(
        overdue.check().await.unwrap(),
        0,
        "the queue still holds the order"
    );

    purge(&amqp, &queue).await;
    assert_eq!(waiting_a_while.check().await.unwrap(), 0, "not overdue yet");
    assert_eq!(overdue.check().await.unwrap(), 1, "the forgotten order");
    assert_eq!(
        overdue.check().await.unwrap(),
        0,
        "the queue holds it again"
    );

    let delivery = test_support::next_message(&amqp, &queue, Duration::from_secs(10)).await;
    let message_id: Uuid = sqlx::query_scalar!("SELECT message_id FROM outbox")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        delivery.properties.message_id().as_ref().unwrap().as_str(),
        message_id.to_string(),
        "the same message id"
    );
    assert_eq!(test_support::queue_depth(&amqp, &queue).await, 0);
}

#[tokio::test]
async fn a_dead_letter_hides_no_forgotten_order_and_a_held_order_is_not_sent() {
    let (pool, broker, guard) = one_order_published().await;
    let topology = &guard.0;
    let amqp = test_support::amqp().await;
    // Someone else's dead letter waits for a person; the order's own message
    // is lost.
    messaging::Publisher::new(broker.clone())
        .publish(
            &topology.dead_letters(),
            "",
            b"a poison message",
            Default::default(),
        )
        .await
        .unwrap();
    purge(&amqp, &topology.work_queue(Lane::Standard)).await;
    let overdue = overdue(&pool, &broker);
    assert_eq!(
        overdue.check().await.unwrap(),
        1,
        "the dead letter is not the forgotten order's message"
    );

    // Once held, the order's message is in the dead letters: left alone.
    purge(&amqp, &topology.work_queue(Lane::Standard)).await;
    sqlx::query!("UPDATE orders SET status = 'held', reason = 'gave up'")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(
        overdue.check().await.unwrap(),
        0,
        "a held order is not sent"
    );
}
