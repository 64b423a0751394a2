//! An event whose copy never reached the service's queue (published and
//! confirmed, then lost on the broker) is sent again and notified once.

use std::time::Duration;

use clap::Parser;
use messaging::contracts::Outcome;
use notification_service::{configuration::Settings, handler, startup::Application};
use test_support::{count, events::event_for_stored_order};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn an_event_its_queue_lost_is_sent_again_and_notified_once() {
    test_support::init_tracing();
    let (url, pool) = test_support::fresh_database().await;
    let mut settings = Settings::parse_from(["notification-service"]);
    test_support::isolate(&mut settings.worker.service, url);
    settings.http_port = 0;
    settings.worker.event_resend_after_secs = 1;
    let topology = settings.worker.topology();
    let _topology = test_support::TopologyGuard(topology.clone());

    // Decided, written to the outbox and confirmed by the exchange a minute
    // ago; the queue's copy is gone (nothing here ever publishes it).
    let event = event_for_stored_order(&pool, Outcome::Processed).await;
    sqlx::query!(
        "INSERT INTO outbox (message_id, exchange, routing_key, payload, correlation_id, order_id,
                             created_at, published_at)
         VALUES ($1, $2, '', $3, 'corr-lost', $4, now() - interval '1 minute',
                 now() - interval '1 minute')",
        event.message_id,
        topology.events_exchange(),
        serde_json::to_value(&event).unwrap(),
        event.order_id
    )
    .execute(&pool)
    .await
    .unwrap();

    let app = Application::build(settings).await.unwrap();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(app.run_until_stopped(shutdown.clone()));

    let amqp = test_support::amqp().await;
    test_support::eventually(
        Duration::from_secs(60),
        "the lost event's notification",
        || async {
            (count!(&pool, r#"SELECT count(*) AS "n!" FROM notifications"#) == 1
                && test_support::queue_depth(&amqp, &topology.subscriber_queue(handler::CONSUMER))
                    .await
                    == 0)
                .then_some(())
        },
    )
    .await;
    // Later checks find it handled; had the lost copy turned up after all,
    // it would be skipped as a duplicate.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        count!(&pool, r#"SELECT count(*) AS "n!" FROM notifications"#),
        1
    );

    shutdown.cancel();
    running.await.unwrap().expect("a clean shutdown");
}
