//! The attack table: each row a caller who means harm, the exact answer it
//! gets, and that nothing was stored or sent for it.

use std::time::Duration;

use order_api::auth::{self, Scope};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{
    TestApp, assert_error, client_with, count, new_key, order_body, spawn_app, spawn_with,
    test_settings,
};

async fn orders_stored(app: &TestApp) -> i64 {
    count!(&app.pool, r#"SELECT count(*) AS "n!" FROM orders"#)
}

async fn place(app: &TestApp, client: &reqwest::Client, key: Option<&str>) -> reqwest::Response {
    let mut request = client
        .post(format!("{}/orders", app.address))
        .json(&order_body());
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    request.send().await.unwrap()
}

fn challenge(response: &reqwest::Response) -> String {
    response
        .headers()
        .get("www-authenticate")
        .expect("a 401 carries WWW-Authenticate")
        .to_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn no_key_is_401_with_a_challenge_and_stores_nothing() {
    let app = spawn_app().await;
    let anonymous = reqwest::Client::new();
    let response = place(&app, &anonymous, Some("k-1")).await;
    assert_eq!(challenge(&response), "Bearer realm=\"orderflow\"");
    assert_error(response, 401, "unauthenticated").await;
    for path in [
        "/orders/00000000-0000-0000-0000-000000000000",
        "/events",
        "/metrics",
    ] {
        let response = app.get_as(&anonymous, path).await;
        assert_error(response, 401, "unauthenticated").await;
    }
    // A Basic header is no key either.
    let basic = anonymous
        .post(format!("{}/orders", app.address))
        .basic_auth("user", Some("pw"))
        .json(&order_body())
        .send()
        .await
        .unwrap();
    assert_error(basic, 401, "unauthenticated").await;
    assert_eq!(orders_stored(&app).await, 0);
    assert_eq!(
        count!(
            &app.pool,
            r#"SELECT count(*) AS "n!" FROM idempotency_keys"#
        ),
        0
    );
    // The public routes stay public.
    for path in ["/healthz", "/readyz", "/openapi.json"] {
        let response = app.get_as(&anonymous, path).await;
        assert_eq!(response.status().as_u16(), 200, "{path}");
    }
}

#[tokio::test]
async fn a_wrong_key_is_401_and_stores_nothing() {
    let app = spawn_app().await;
    let almost = format!("{}x", app.key);
    for wrong in ["ofk_guess", almost.as_str(), &"k".repeat(5000)] {
        let response = place(&app, &client_with(wrong), None).await;
        assert_eq!(
            challenge(&response),
            "Bearer realm=\"orderflow\", error=\"invalid_token\""
        );
        assert_error(response, 401, "invalid_api_key").await;
    }
    assert_eq!(orders_stored(&app).await, 0);
}

#[tokio::test]
async fn a_revoked_key_is_refused_on_its_next_request() {
    let app = spawn_app().await;
    let made = auth::create_key(&app.pool, "leaky", Scope::Client, None)
        .await
        .unwrap();
    let leaky = client_with(&made.key);
    assert_eq!(place(&app, &leaky, None).await.status().as_u16(), 202);

    assert_eq!(
        auth::revoke(&app.pool, &made.id.to_string()).await.unwrap(),
        1
    );

    assert_error(place(&app, &leaky, None).await, 401, "invalid_api_key").await;
    assert_eq!(
        orders_stored(&app).await,
        1,
        "only the order before revocation"
    );
    // Other clients' keys are not touched by revoking one.
    assert_eq!(place(&app, &app.client, None).await.status().as_u16(), 202);

    // Revoking a client by name revokes every key it holds, and only those.
    let first = client_with(&new_key(&app.pool, "rotating", Scope::Client).await);
    let second = client_with(&new_key(&app.pool, "rotating", Scope::Client).await);
    assert_eq!(auth::revoke(&app.pool, "rotating").await.unwrap(), 2);
    for revoked in [first, second] {
        assert_error(place(&app, &revoked, None).await, 401, "invalid_api_key").await;
    }
    assert_eq!(place(&app, &app.client, None).await.status().as_u16(), 202);
    assert_eq!(orders_stored(&app).await, 3);
}

#[tokio::test]
async fn another_clients_order_and_its_stream_do_not_exist_for_you() {
    let app = spawn_app().await;
    let response = place(&app, &app.client, None).await;
    let order: Value = response.json().await.unwrap();
    let id = order["id"].as_str().unwrap();
    let other = client_with(&new_key(&app.pool, "other-shop", Scope::Client).await);

    for path in [format!("/orders/{id}"), format!("/orders/{id}/events")] {
        let response = app.get_as(&other, &path).await;
        let body = assert_error(response, 404, "order_not_found").await;
        assert!(!body.to_string().contains("ada@example.com"), "{body}");
    }
    // Its owner (with any of its keys: a rotated one too) and an admin see it.
    assert_eq!(
        app.get(&format!("/orders/{id}")).await.status().as_u16(),
        200
    );
    let rotated = client_with(&new_key(&app.pool, "test-client", Scope::Client).await);
    let response = app.get_as(&rotated, &format!("/orders/{id}")).await;
    assert_eq!(response.status().as_u16(), 200);
    let admin = app.get_as(&app.admin, &format!("/orders/{id}")).await;
    assert_eq!(admin.status().as_u16(), 200);
}

#[tokio::test]
async fn metrics_are_for_admins_only() {
    let app = spawn_app().await;
    let response = app.get("/metrics").await;
    assert_error(response, 403, "forbidden").await;
    let admin = app.get_as(&app.admin, "/metrics").await;
    assert_eq!(admin.status().as_u16(), 200);
    // A client key's `/events` is its own orders' events only (proved in
    // `live.rs`); an admin's is every order's.
    for client in [&app.client, &app.admin] {
        assert_eq!(app.get_as(client, "/events").await.status().as_u16(), 200);
    }
}

#[tokio::test]
async fn the_same_idempotency_key_from_two_clients_makes_two_orders() {
    let app = spawn_app().await;
    let other = client_with(&new_key(&app.pool, "other-shop", Scope::Client).await);
    let first = place(&app, &app.client, Some("1")).await;
    let second = place(&app, &other, Some("1")).await;
    assert_eq!(first.status().as_u16(), 202);
    assert_eq!(second.status().as_u16(), 202);
    assert!(second.headers().get("idempotent-replayed").is_none());
    let first: Value = first.json().await.unwrap();
    let second: Value = second.json().await.unwrap();
    assert_ne!(first["id"], second["id"]);
    assert_eq!(orders_stored(&app).await, 2);
    // Each client's retry still replays its own first answer.
    let again = place(&app, &other, Some("1")).await;
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["id"], second["id"]);
    assert_eq!(orders_stored(&app).await, 2);
}

#[tokio::test]
async fn a_flood_over_the_rate_limit_gets_429_with_retry_after_and_stores_only_what_passed() {
    let (mut settings, pool) = test_settings().await;
    settings.rate_limit_per_second = 1.try_into().unwrap();
    settings.rate_limit_burst = 2.try_into().unwrap();
    let app = spawn_with(settings, pool).await;
    let flood = (0..30).map(|_| place(&app, &app.client, None));
    let answers = futures_util::future::join_all(flood).await;
    let mut accepted = 0;
    let mut limited = 0;
    for response in answers {
        match response.status().as_u16() {
            202 => accepted += 1,
            429 => {
                let wait: u64 = response.headers()["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!(wait >= 1);
                assert_error(response, 429, "rate_limited").await;
                limited += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert!(limited > 0, "30 requests at once over a burst of 2");
    assert_eq!(orders_stored(&app).await, accepted);
    // Another key has a budget of its own.
    let other = client_with(&new_key(&app.pool, "other-shop", Scope::Client).await);
    assert_eq!(place(&app, &other, None).await.status().as_u16(), 202);
}

#[tokio::test]
async fn a_client_trickling_its_headers_is_cut_off_and_others_are_served() {
    let (mut settings, pool) = test_settings().await;
    settings.service.http.http_header_timeout_ms = 1000;
    let app = spawn_with(settings, pool).await;
    let address = app.address.trim_start_matches("http://").to_owned();
    let mut slow = tokio::net::TcpStream::connect(&address).await.unwrap();
    let request = format!(
        "GET /healthz HTTP/1.1\r\nHost: {address}\r\nX-Padding: {}\r\n\r\n",
        "a".repeat(600)
    );
    let trickle = async {
        for byte in request.as_bytes() {
            if slow.write_all(&[*byte]).await.is_err() {
                return "the server closed the connection";
            }
            // Meanwhile, others are served.
            let response = app.get("/healthz").await;
            assert_eq!(response.status().as_u16(), 200);
            tokio::time::sleep(Duration::from_secs(1)).await;
            let mut buffer = [0u8; 64];
            // Closed (0 or an error) or a 408 before the headers were
            // complete: either way the server gave up on this client.
            if tokio::time::timeout(Duration::from_millis(1), slow.read(&mut buffer))
                .await
                .is_ok()
            {
                return "the server closed the connection";
            }
        }
        "the whole request went through"
    };
    let outcome = tokio::time::timeout(Duration::from_secs(300), trickle)
        .await
        .expect("the server cuts a trickling client off");
    assert_eq!(outcome, "the server closed the connection");
}

#[tokio::test]
async fn a_thousand_idle_event_streams_are_capped_and_orders_still_go_through() {
    let (mut settings, pool) = test_settings().await;
    settings.sse_max_streams_per_key = 10;
    settings.sse_max_streams = 15;
    // This row is about the stream caps, not the request rate.
    settings.rate_limit_per_second = 100_000.try_into().unwrap();
    settings.rate_limit_burst = 100_000.try_into().unwrap();
    let app = spawn_with(settings.clone(), pool).await;
    let order: Value = place(&app, &app.client, None).await.json().await.unwrap();
    let path = format!(
        "{}/orders/{}/events",
        app.address,
        order["id"].as_str().unwrap()
    );

    let open = |client: reqwest::Client, count: usize| {
        let path = path.clone();
        async move {
            let requests = (0..count).map(|_| client.get(&path).send());
            futures_util::future::join_all(requests)
                .await
                .into_iter()
                .map(Result::unwrap)
                .collect::<Vec<_>>()
        }
    };
    let mine = open(app.client.clone(), 1000).await;
    let (streaming, refused): (Vec<_>, Vec<_>) =
        mine.into_iter().partition(|r| r.status().as_u16() == 200);
    assert_eq!(streaming.len(), 10, "the per-key cap");
    assert_eq!(refused.len(), 990);
    assert!(
        refused
            .iter()
            .all(|r| r.headers().contains_key("retry-after"))
    );
    assert_error(refused.into_iter().next().unwrap(), 429, "too_many_streams").await;

    // The admin sees the order too: its streams count against the total.
    let theirs = open(app.admin.clone(), 10).await;
    let admitted = theirs.iter().filter(|r| r.status().as_u16() == 200).count();
    assert_eq!(admitted, 5, "the total cap");

    // Orders still go through while every stream slot is taken.
    let other = client_with(&new_key(&app.pool, "other-shop", Scope::Client).await);
    assert_eq!(place(&app, &other, None).await.status().as_u16(), 202);

    // A closed stream gives its slot back.
    drop(streaming);
    drop(theirs);
    test_support::eventually(Duration::from_secs(30), "a free stream slot", || async {
        let response = app.client.get(&path).send().await.unwrap();
        (response.status().as_u16() == 200).then_some(())
    })
    .await;
}

#[tokio::test]
async fn an_unknown_client_or_scope_is_refused_when_making_a_key() {
    let app = spawn_app().await;
    assert!(
        auth::create_key(&app.pool, "Bad Name", Scope::Client, None)
            .await
            .is_err()
    );
    assert!(
        auth::create_key(&app.pool, "demo", Scope::Client, Some("short"))
            .await
            .is_err()
    );
    // A chosen demo key made twice is one key.
    let first = auth::create_key(&app.pool, "demo", Scope::Client, Some("orderflow-demo-key"))
        .await
        .unwrap();
    let again = auth::create_key(&app.pool, "demo", Scope::Client, Some("orderflow-demo-key"))
        .await
        .unwrap();
    assert_eq!(first.id, again.id);
    // Only the hash is stored, and a quarter of the key in clear at most.
    let stored = sqlx::query!(
        "SELECT key_hash, key_prefix FROM api_keys WHERE id = $1",
        first.id
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        stored.key_hash,
        Sha256::digest(b"orderflow-demo-key").to_vec()
    );
    assert_eq!(stored.key_prefix, "orde");
}
