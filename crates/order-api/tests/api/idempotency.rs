//! Stripe's idempotency semantics, against the real database.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use serde_json::{Value, json};

use crate::helpers::{assert_error, count, order_body, spawn_app, spawn_with, test_settings};

#[tokio::test]
async fn the_same_key_and_body_replays_the_first_response() {
    let app = spawn_app().await;
    let first = app.post_order(&order_body(), Some("key-1")).await;
    assert_eq!(first.status().as_u16(), 202);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let location = first.headers()["location"].clone();
    let first_body = first.bytes().await.unwrap();

    let second = app.post_order(&order_body(), Some("key-1")).await;

    assert_eq!(second.status().as_u16(), 202);
    assert_eq!(second.headers()["idempotent-replayed"], "true");
    assert_eq!(second.headers()["location"], location);
    assert_eq!(
        second.bytes().await.unwrap(),
        first_body,
        "byte-for-byte the same"
    );
    assert_eq!(
        count!(&app.pool, r#"SELECT count(*) AS "n!" FROM orders"#),
        1
    );
    assert_eq!(
        count!(&app.pool, r#"SELECT count(*) AS "n!" FROM outbox"#),
        1,
        "published once"
    );
}

#[tokio::test]
async fn defaults_spelled_out_count_as_the_same_body() {
    let app = spawn_app().await;
    app.post_order(&order_body(), Some("key-d")).await;
    let mut explicit = order_body();
    explicit["currency"] = json!("EUR");
    explicit["express"] = json!(false);
    let second = app.post_order(&explicit, Some("key-d")).await;
    assert_eq!(second.headers()["idempotent-replayed"], "true");
}

#[tokio::test]
async fn the_same_key_with_a_different_body_is_a_422() {
    let app = spawn_app().await;
    app.post_order(&order_body(), Some("key-2")).await;
    let mut other = order_body();
    other["items"][0]["quantity"] = json!(5);

    assert_error(
        app.post_order(&other, Some("key-2")).await,
        422,
        "idempotency_key_reused",
    )
    .await;
    assert_eq!(
        count!(&app.pool, r#"SELECT count(*) AS "n!" FROM orders"#),
        1
    );
}

#[tokio::test]
async fn a_key_whose_first_request_is_in_flight_is_a_409() {
    let app = spawn_app().await;
    // Play the first request: hold the key's lock in an open transaction.
    let mut first = app.pool.begin().await.unwrap();
    sqlx::query!(
        "SELECT pg_advisory_xact_lock(hashtextextended($1 || E'\\n' || $2, 0))",
        "test-client",
        "key-3"
    )
    .execute(&mut *first)
    .await
    .unwrap();

    assert_error(
        app.post_order(&order_body(), Some("key-3")).await,
        409,
        "idempotency_key_in_flight",
    )
    .await;

    first.rollback().await.unwrap();
    assert_eq!(
        app.post_order(&order_body(), Some("key-3"))
            .await
            .status()
            .as_u16(),
        202
    );
}

#[tokio::test]
async fn concurrent_requests_with_one_key_make_one_order() {
    let app = spawn_app().await;
    let body = order_body();
    let requests = (0..20).map(|_| app.post_order(&body, Some("key-race")));
    let responses = futures_util::future::join_all(requests).await;

    let mut created = 0;
    for response in responses {
        match (
            response.status().as_u16(),
            response.headers().get("idempotent-replayed"),
        ) {
            (202, None) => created += 1,
            (202, Some(_)) | (409, _) => {}
            (status, _) => panic!("unexpected {status}"),
        }
    }
    assert_eq!(created, 1);
    assert_eq!(
        count!(&app.pool, r#"SELECT count(*) AS "n!" FROM orders"#),
        1
    );
    assert_eq!(
        count!(&app.pool, r#"SELECT count(*) AS "n!" FROM outbox"#),
        1
    );
}

#[tokio::test]
async fn a_failed_validation_stores_no_key() {
    let app = spawn_app().await;
    let mut bad = order_body();
    bad["items"][0]["quantity"] = json!(0);
    assert_error(
        app.post_order(&bad, Some("key-4")).await,
        422,
        "validation_failed",
    )
    .await;

    let fixed = app.post_order(&order_body(), Some("key-4")).await;
    assert_eq!(fixed.status().as_u16(), 202, "the key is still free");
    assert!(fixed.headers().get("idempotent-replayed").is_none());
}

#[tokio::test]
async fn keys_expire_and_are_cleaned_up() {
    let (mut settings, pool) = test_settings().await;
    settings.idempotency_ttl_secs = 1;
    settings.idempotency_cleanup_interval_secs = 1;
    let app = spawn_with(settings, pool).await;
    let first: Value = app
        .post_order(&order_body(), Some("key-5"))
        .await
        .json()
        .await
        .unwrap();

    test_support::eventually(
        Duration::from_secs(10),
        "the key to be cleaned up",
        || async {
            (count!(
                &app.pool,
                r#"SELECT count(*) AS "n!" FROM idempotency_keys"#
            ) == 0)
                .then_some(())
        },
    )
    .await;

    let second = app.post_order(&order_body(), Some("key-5")).await;
    assert_eq!(second.status().as_u16(), 202);
    assert!(second.headers().get("idempotent-replayed").is_none());
    let second: Value = second.json().await.unwrap();
    assert_ne!(
        first["id"], second["id"],
        "an expired key starts a new order"
    );
}

#[tokio::test]
async fn orders_posted_together_share_a_transaction_and_keep_their_own_answers() {
    let (mut settings, pool) = test_settings().await;
    settings.rate_limit_burst = 1000.try_into().unwrap();
    let app = spawn_with(settings, pool).await;
    // Hold every writer at the price lookup, so the requests pile up.
    let mut gate = app.pool.begin().await.unwrap();
    sqlx::query!("LOCK TABLE inventory IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *gate)
        .await
        .unwrap();
    let mut unknown_sku = order_body();
    unknown_sku["items"][0]["sku"] = json!("NO-SUCH-THING");
    let mut requests: Vec<(&str, Value, Option<&str>)> = Vec::new();
    requests.extend((0..50).map(|_| ("one key", order_body(), Some("key-storm"))));
    requests.extend((0..20).map(|_| ("no key", order_body(), None)));
    requests.extend((0..5).map(|_| ("unknown sku", unknown_sku.clone(), Some("key-unknown"))));
    let total = requests.len();
    let answered = Arc::new(AtomicUsize::new(0));
    let sent: Vec<_> = requests
        .into_iter()
        .map(|(kind, body, key)| {
            let mut request = app
                .client
                .post(format!("{}/orders", app.address))
                .json(&body);
            if let Some(key) = key {
                request = request.header("Idempotency-Key", key);
            }
            let answered = Arc::clone(&answered);
            tokio::spawn(async move {
                let response = request.send().await.unwrap();
                answered.fetch_add(1, Ordering::SeqCst);
                let status = response.status().as_u16();
                let replayed = response.headers().contains_key("idempotent-replayed");
                (kind, status, replayed, response.bytes().await.unwrap())
            })
        })
        .collect();
    test_support::eventually(
        Duration::from_secs(30),
        "every request waiting in the intake",
        || async {
            // A request refused before its batch reaches the gate (409)
            // is answered already.
            let pending = app.metric("order_intake_pending").await.unwrap_or(0.0);
            let answered = answered.load(Ordering::SeqCst);
            (pending as usize + answered == total).then_some(())
        },
    )
    .await;
    gate.rollback().await.unwrap();

    let mut answers = Vec::new();
    for request in sent {
        answers.push(request.await.unwrap());
    }
    let of = |kind: &'static str| answers.iter().filter(move |a| a.0 == kind);
    let created: Vec<_> = of("one key").filter(|a| a.1 == 202 && !a.2).collect();
    assert_eq!(created.len(), 1, "one order for the key");
    for (_, status, replayed, body) in of("one key") {
        match (status, replayed) {
            (202, false) => {}
            (202, true) => assert_eq!(body, &created[0].3, "a replay is byte for byte"),
            (409, _) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(of("no key").all(|a| a.1 == 202));
    assert!(of("unknown sku").all(|a| a.1 == 422 || a.1 == 409));
    assert_eq!(
        count!(&app.pool, r#"SELECT count(*) AS "n!" FROM orders"#),
        1 + 20
    );
    assert_eq!(
        count!(&app.pool, r#"SELECT count(*) AS "n!" FROM outbox"#),
        1 + 20
    );
    assert_eq!(
        count!(
            &app.pool,
            r#"SELECT count(*) AS "n!" FROM idempotency_keys"#
        ),
        1,
        "no key stored for the refused request"
    );
    // Orders of one transaction share its start time.
    let largest_batch = count!(
        &app.pool,
        r#"SELECT max(n) AS "n!" FROM (SELECT count(*) AS n FROM orders GROUP BY created_at) b"#
    );
    assert!(largest_batch > 1, "the writers batched nothing");
}
