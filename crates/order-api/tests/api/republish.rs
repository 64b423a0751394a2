//! Orders the broker forgot are published again from Postgres, and a queue
//! that still holds them gets nothing more.

use std::time::Duration;

use lapin::options::QueuePurgeOptions;
use messaging::contracts::Lane;
use order_api::{auth::Scope, republish::Republisher, startup::Application};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::helpers::{client_with, new_key, order_body, test_settings};

#[tokio::test]
async fn an_accepted_order_the_broker_no_longer_has_is_published_again_once() {
    let (settings, pool) = test_settings().await;
    let topology = settings.amqp.topology();
    let _guard = test_support::TopologyGuard(topology.clone());
    let broker = settings.amqp.broker().unwrap();
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

    let amqp = test_support::amqp().await;
    let queue = topology.work_queue(Lane::Standard);
    assert_eq!(test_support::queue_depth(&amqp, &queue).await, 1);
    let publisher = messaging::Publisher::new(broker.clone());
    let waiting_a_while = Republisher::new(
        pool.clone(),
        broker.clone(),
        publisher.clone(),
        Duration::from_secs(3600),
    );
    let overdue = Republisher::new(pool.clone(), broker, publisher, Duration::ZERO);
    assert_eq!(
        overdue.check().await.unwrap(),
        0,
        "the queue still holds the order"
    );

    let channel = amqp.create_channel().await.unwrap();
    channel
        .queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
        .await
        .unwrap();
    assert_eq!(waiting_a_while.check().await.unwrap(), 0, "not overdue yet");
    assert_eq!(overdue.check().await.unwrap(), 1, "the forgotten order");
    assert_eq!(
        overdue.check().await.unwrap(),
        0,
        "the queue holds it again"
    );

    let delivery = test_support::next_message(&amqp, &queue, Duration::from_secs(10)).await;
    let message_id: Uuid = sqlx::query_scalar("SELECT message_id FROM outbox")
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
