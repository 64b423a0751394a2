//! Stopping order-api loses nothing a request committed while it stopped.

use std::time::Duration;

use order_api::{auth::Scope, startup::Application};
use tokio_util::sync::CancellationToken;

use crate::helpers::{client_with, new_key, order_body, test_settings};

#[tokio::test]
async fn the_final_outbox_flush_waits_for_a_request_still_committing() {
    let (settings, pool) = test_settings().await;
    let _topology = test_support::TopologyGuard(settings.service.amqp.topology());
    let application = Application::build(settings).await.unwrap();
    let url = format!("http://127.0.0.1:{}/orders", application.port());
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(application.run_until_stopped(shutdown.clone()));

    // Hold the orders table, so the POST waits inside its transaction.
    let mut lock = pool.begin().await.unwrap();
    sqlx::query!("LOCK TABLE orders IN EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let client = client_with(&new_key(&pool, "test-client", Scope::Client).await);
    let post = tokio::spawn(client.post(url).json(&order_body()).send());
    test_support::eventually(
        Duration::from_secs(30),
        "the POST waiting for the lock",
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
    let response = post.await.unwrap().unwrap();
    assert_eq!(response.status().as_u16(), 202);
    running.await.unwrap().unwrap();

    let unpublished: i64 =
        sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM outbox WHERE published_at IS NULL"#)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        unpublished, 0,
        "the order committed during shutdown was published and marked"
    );
}
