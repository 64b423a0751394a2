//! Webhooks against real local HTTP receivers: signed, retried until they
//! succeed, dead-lettered after the last attempt, and never held up by a
//! receiver that is failing or slow.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    routing::post,
};
use messaging::contracts::Outcome;
use notification_service::{
    handler,
    webhooks::{self, Dispatcher, SIGNATURE_HEADER, WebhookPolicy},
};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

const SECRET: &str = "test-webhook-secret";

/// A receiver that fails its first `failures` calls (or all, or slowly).
#[derive(Default)]
pub(crate) struct Receiver {
    failures: u32,
    delay: Duration,
    pub(crate) calls: AtomicU32,
    received: Mutex<Vec<(String, Bytes)>>,
}

async fn receive(
    State(receiver): State<Arc<Receiver>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let call = receiver.calls.fetch_add(1, Ordering::SeqCst) + 1;
    tokio::time::sleep(receiver.delay).await;
    let signature = headers
        .get(SIGNATURE_HEADER)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    receiver.received.lock().unwrap().push((signature, body));
    if call <= receiver.failures {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::NO_CONTENT
    }
}

pub(crate) async fn start_receiver(receiver: Receiver) -> (String, Arc<Receiver>) {
    let receiver = Arc::new(receiver);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let app = Router::new()
        .route("/hook", post(receive))
        .with_state(receiver.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, receiver)
}

/// Lets webhooks reach the loopback receivers (`WEBHOOK_ALLOWED_HOSTS=127.0.0.1`).
pub(crate) fn policy(max_attempts: u32) -> WebhookPolicy {
    WebhookPolicy {
        secret: notification_service::webhooks::Secret(SECRET.into()),
        max_attempts,
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_millis(400),
        timeout: Duration::from_millis(500),
        concurrency: 8,
        allowed_hosts: "127.0.0.1".parse().unwrap(),
    }
}

/// An event for a stored order whose callback is `url`, notified (which
/// queues its webhook).
pub(crate) async fn notified_with_callback(pool: &PgPool, url: &str) -> uuid::Uuid {
    let mut event = test_support::events::event_for_stored_order(pool, Outcome::Processed).await;
    event.callback_url = Some(url.into());
    assert!(handler::notify(pool, &event).await.unwrap());
    event.message_id
}

pub(crate) async fn delivery(pool: &PgPool, event_id: uuid::Uuid) -> (String, i32) {
    let row = sqlx::query!(
        "SELECT state, attempts FROM webhook_deliveries WHERE event_id = $1",
        event_id
    )
    .fetch_one(pool)
    .await
    .unwrap();
    (row.state, row.attempts)
}

pub(crate) fn run(pool: &PgPool, policy: WebhookPolicy) -> CancellationToken {
    let stop = CancellationToken::new();
    let dispatcher = Dispatcher::new(pool.clone(), policy).unwrap();
    tokio::spawn(dispatcher.run(stop.clone()));
    stop
}

#[tokio::test]
async fn a_webhook_is_signed_with_the_shared_secret() {
    let (_, pool) = test_support::fresh_database().await;
    let (url, receiver) = start_receiver(Receiver::default()).await;
    let event_id = notified_with_callback(&pool, &url).await;
    let stop = run(&pool, policy(3));

    test_support::eventually(Duration::from_secs(5), "the webhook delivered", || async {
        (delivery(&pool, event_id).await.0 == "delivered").then_some(())
    })
    .await;
    stop.cancel();
    let (signature, body) = receiver.received.lock().unwrap()[0].clone();
    assert!(webhooks::verify(SECRET, &signature, &body), "{signature}");
    assert!(!webhooks::verify("another-secret", &signature, &body));
    let event: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(event["message_id"], event_id.to_string());
    assert_eq!(event["type"], "order.processed");
}

#[tokio::test]
async fn a_receiver_that_fails_twice_gets_exactly_one_successful_delivery() {
    let (_, pool) = test_support::fresh_database().await;
    let (url, receiver) = start_receiver(Receiver {
        failures: 2,
        ..Receiver::default()
    })
    .await;
    let event_id = notified_with_callback(&pool, &url).await;
    let stop = run(&pool, policy(5));

    test_support::eventually(Duration::from_secs(10), "the webhook delivered", || async {
        (delivery(&pool, event_id).await.0 == "delivered").then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    assert_eq!(delivery(&pool, event_id).await, ("delivered".into(), 3));
    assert_eq!(
        receiver.calls.load(Ordering::SeqCst),
        3,
        "no call after the success"
    );
    let codes: Vec<Option<i32>> = sqlx::query_scalar!(
        "SELECT a.status_code FROM webhook_attempts a JOIN webhook_deliveries d ON d.id = a.delivery_id
         WHERE d.event_id = $1 ORDER BY a.attempt",
        event_id
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(codes, [Some(503), Some(503), Some(204)]);
}

#[tokio::test]
async fn a_receiver_that_always_fails_ends_dead_and_holds_up_no_one() {
    let (_, pool) = test_support::fresh_database().await;
    let (failing_url, failing) = start_receiver(Receiver {
        failures: u32::MAX,
        ..Receiver::default()
    })
    .await;
    let (slow_url, _) = start_receiver(Receiver {
        delay: Duration::from_secs(5),
        ..Receiver::default()
    })
    .await;
    let (healthy_url, _) = start_receiver(Receiver::default()).await;
    let doomed = notified_with_callback(&pool, &failing_url).await;
    let slow = notified_with_callback(&pool, &slow_url).await;
    let stop = run(&pool, policy(3));
    // Others' webhooks, queued while those two are failing, go out at once.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let started = std::time::Instant::now();
    let healthy = notified_with_callback(&pool, &healthy_url).await;
    test_support::eventually(
        Duration::from_secs(2),
        "the healthy webhook delivered",
        || async { (delivery(&pool, healthy).await.0 == "delivered").then_some(()) },
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "delivered on time: {:?}",
        started.elapsed()
    );

    test_support::eventually(
        Duration::from_secs(10),
        "the failing webhook dead",
        || async { (delivery(&pool, doomed).await.0 == "dead").then_some(()) },
    )
    .await;
    assert_eq!(delivery(&pool, doomed).await, ("dead".into(), 3));
    assert_eq!(failing.calls.load(Ordering::SeqCst), 3);
    // The slow receiver's attempt timed out, and is recorded as such.
    test_support::eventually(
        Duration::from_secs(5),
        "the slow receiver's timeout",
        || async {
            let error: Option<String> = sqlx::query_scalar!(
                "SELECT last_error FROM webhook_deliveries WHERE event_id = $1",
                slow
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            error.filter(|e| e.contains("no answer")).map(|_| ())
        },
    )
    .await;
    stop.cancel();
}
