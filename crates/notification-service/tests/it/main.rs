//! notification-service against the real Postgres and RabbitMQ.

use std::time::Duration;

use clap::Parser;
use messaging::{amqp::Envelope, contracts::Outcome};
use notification_service::{configuration::Settings, handler, startup::Application};
use platform::worker::EventHandler;
use test_support::{
    count,
    events::{event_for_stored_order, received},
};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn a_batch_sends_each_new_events_email_and_webhook_once() {
    let (_, pool) = test_support::fresh_database().await;
    let before = event_for_stored_order(&pool, Outcome::Processed).await;
    let mut fresh = event_for_stored_order(&pool, Outcome::Processed).await;
    fresh.callback_url = Some("https://hooks.example.com/orders".into());
    assert!(handler::notify(&pool, &before).await.unwrap());
    let notifier = handler::Notifier { pool: pool.clone() };

    // Handled before, new, and the new one delivered twice in the batch.
    let batch = [
        received(&before, "corr-b"),
        received(&fresh, "corr-b"),
        received(&fresh, "corr-b"),
    ];
    let sent = notifier.handle_batch(&batch).await.unwrap();

    assert_eq!(sent, [false, true, false]);
    assert_eq!(
        count!(&pool, r#"SELECT count(*) AS "n!" FROM notifications"#),
        2
    );
    assert_eq!(
        count!(&pool, r#"SELECT count(*) AS "n!" FROM webhook_deliveries"#),
        1
    );
    assert_eq!(
        count!(
            &pool,
            r#"SELECT count(*) AS "n!" FROM order_status_history WHERE status = 'notified'"#
        ),
        2
    );
}

#[tokio::test]
async fn one_email_per_event_however_often_it_is_delivered() {
    let (_, pool) = test_support::fresh_database().await;
    let event = event_for_stored_order(&pool, Outcome::Processed).await;

    assert!(handler::notify(&pool, &event).await.unwrap());
    assert!(
        !handler::notify(&pool, &event).await.unwrap(),
        "a redelivery is skipped"
    );

    assert_eq!(
        count!(&pool, r#"SELECT count(*) AS "n!" FROM notifications"#),
        1
    );
    let sent = sqlx::query!("SELECT recipient, subject FROM notifications")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(sent.recipient, "grace@example.com");
    assert!(sent.subject.contains("is confirmed"), "{}", sent.subject);
    assert_eq!(
        count!(
            &pool,
            r#"SELECT count(*) AS "n!" FROM order_status_history WHERE status = 'notified'"#
        ),
        1
    );
}

#[tokio::test]
async fn a_rejection_email_says_why_and_that_nothing_was_charged() {
    let (_, pool) = test_support::fresh_database().await;
    let event = event_for_stored_order(
        &pool,
        Outcome::Rejected {
            reason: "out_of_stock: LIMITED-EDITION".into(),
        },
    )
    .await;
    let (subject, body) = handler::compose(&event);
    assert!(subject.starts_with("We could not complete"), "{subject}");
    assert!(
        body.contains("out_of_stock: LIMITED-EDITION") && body.contains("not been charged"),
        "{body}"
    );
}

#[tokio::test]
async fn an_event_on_the_fanout_exchange_is_notified_once() {
    test_support::init_tracing();
    let (url, pool) = test_support::fresh_database().await;
    let mut settings = Settings::parse_from(["notification-service"]);
    test_support::isolate(&mut settings.worker.service, url);
    settings.http_port = 0;
    let topology = settings.worker.topology();
    let _topology = test_support::TopologyGuard(topology.clone());
    let app = Application::build(settings).await.unwrap();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(app.run_until_stopped(shutdown.clone()));

    let event = event_for_stored_order(&pool, Outcome::Processed).await;
    let amqp = test_support::amqp().await;
    let publisher = test_support::publisher(&topology);
    let envelope = Envelope {
        message_id: event.message_id,
        correlation_id: "corr-n".into(),
        order_id: event.order_id,
    };
    let body = serde_json::to_vec(&event).unwrap();
    // The same event twice: a publisher retry after a lost confirm.
    for _ in 0..2 {
        publisher
            .publish(
                &topology.events_exchange(),
                "",
                &body,
                envelope.properties(),
            )
            .await
            .unwrap();
    }

    test_support::eventually(Duration::from_secs(10), "the notification", || async {
        (count!(&pool, r#"SELECT count(*) AS "n!" FROM processed_messages"#) == 1
            && test_support::queue_depth(&amqp, &topology.subscriber_queue(handler::CONSUMER))
                .await
                == 0)
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        count!(&pool, r#"SELECT count(*) AS "n!" FROM notifications"#),
        1
    );

    shutdown.cancel();
    running.await.unwrap().expect("a clean shutdown");
}

mod lost;
mod refusals;
mod webhooks;
