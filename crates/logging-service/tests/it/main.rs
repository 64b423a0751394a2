//! logging-service against the real Postgres and RabbitMQ.

use std::time::Duration;

use clap::Parser;
use lapin::BasicProperties;
use logging_service::{configuration::Settings, handler, startup::Application};
use messaging::contracts::Outcome;
use platform::worker::EventHandler;
use test_support::{
    count,
    events::{event_for_stored_order, received},
};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn one_audit_record_per_event_however_often_it_is_delivered() {
    let (_, pool) = test_support::fresh_database().await;
    let event = event_for_stored_order(
        &pool,
        Outcome::Rejected {
            reason: "payment_declined".into(),
        },
    )
    .await;

    assert!(handler::record(&pool, &event, "corr-l").await.unwrap());
    assert!(!handler::record(&pool, &event, "corr-l").await.unwrap());

    let row = sqlx::query!(
        r#"SELECT event_type, correlation_id, payload->>'reason' AS "reason!" FROM audit_log"#
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(row.event_type, "order.rejected");
    assert_eq!(row.correlation_id, "corr-l");
    assert_eq!(row.reason, "payment_declined");
    assert_eq!(
        count!(&pool, r#"SELECT count(*) AS "n!" FROM audit_log"#),
        1
    );
}

#[tokio::test]
async fn a_batch_records_each_new_event_once_in_one_statement() {
    let (_, pool) = test_support::fresh_database().await;
    let before = event_for_stored_order(&pool, Outcome::Processed).await;
    let fresh = event_for_stored_order(&pool, Outcome::Processed).await;
    assert!(handler::record(&pool, &before, "corr-0").await.unwrap());
    let trail = handler::AuditTrail { pool: pool.clone() };

    // Handled before, new, and the new one delivered twice in the batch.
    let batch = [
        received(&before, "corr-b"),
        received(&fresh, "corr-b"),
        received(&fresh, "corr-b"),
    ];
    let recorded = trail.handle_batch(&batch).await.unwrap();

    assert_eq!(recorded, [false, true, false]);
    assert_eq!(
        count!(&pool, r#"SELECT count(*) AS "n!" FROM audit_log"#),
        2
    );
    assert_eq!(
        count!(
            &pool,
            r#"SELECT count(*) AS "n!" FROM processed_messages WHERE consumer = 'logging-service'"#
        ),
        2
    );
}

#[tokio::test]
async fn a_malformed_event_is_dead_lettered_and_the_next_one_recorded() {
    test_support::init_tracing();
    let (url, pool) = test_support::fresh_database().await;
    let mut settings = Settings::parse_from(["logging-service"]);
    test_support::isolate(&mut settings.worker.service, url);
    settings.http_port = 0;
    let topology = settings.worker.topology();
    let _topology = test_support::TopologyGuard(topology.clone());
    let app = Application::build(settings).await.unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(app.run_until_stopped(shutdown.clone()));
    let amqp = test_support::amqp().await;
    let publisher = test_support::publisher(&topology);

    publisher
        .publish(
            &topology.events_exchange(),
            "",
            b"[]",
            BasicProperties::default(),
        )
        .await
        .unwrap();
    let event = event_for_stored_order(&pool, Outcome::Processed).await;
    publisher
        .publish(
            &topology.events_exchange(),
            "",
            &serde_json::to_vec(&event).unwrap(),
            BasicProperties::default(),
        )
        .await
        .unwrap();

    let dead =
        test_support::next_message(&amqp, &topology.dead_letters(), Duration::from_secs(10)).await;
    assert_eq!(dead.data, b"[]");
    test_support::eventually(Duration::from_secs(10), "the audit record", || async {
        (count!(&pool, r#"SELECT count(*) AS "n!" FROM audit_log"#) == 1).then_some(())
    })
    .await;
    shutdown.cancel();
}
