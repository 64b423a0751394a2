//! Every kind of bad input gets a clear JSON error with a stable code, and
//! stores nothing.

use serde_json::{Value, json};

use crate::helpers::{TestApp, assert_error, count, order_body, spawn_app};

fn with(mutate: impl FnOnce(&mut Value)) -> Value {
    let mut body = order_body();
    mutate(&mut body);
    body
}

async fn assert_nothing_stored(app: &TestApp) {
    assert_eq!(
        count!(&app.pool, r#"SELECT count(*) AS "n!" FROM orders"#),
        0
    );
    assert_eq!(
        count!(&app.pool, r#"SELECT count(*) AS "n!" FROM outbox"#),
        0
    );
    assert_eq!(
        count!(
            &app.pool,
            r#"SELECT count(*) AS "n!" FROM idempotency_keys"#
        ),
        0
    );
}

#[tokio::test]
async fn invalid_orders_are_rejected_with_the_right_status_and_code() {
    let app = spawn_app().await;
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        (
            "wrong type",
            with(|b| b["items"][0]["quantity"] = json!("two")),
            422,
            "invalid_body",
        ),
        (
            "missing field",
            with(|b| {
                b.as_object_mut().unwrap().remove("email");
            }),
            422,
            "invalid_body",
        ),
        (
            "unknown field",
            with(|b| b["coupon"] = json!("FREE")),
            422,
            "invalid_body",
        ),
        (
            "unknown item field",
            with(|b| b["items"][0]["colour"] = json!("red")),
            422,
            "invalid_body",
        ),
        (
            "items not an array",
            with(|b| b["items"] = json!({})),
            422,
            "invalid_body",
        ),
        (
            // A whole number (JSON Schema's `integer`), just out of range.
            "quantity beyond i64",
            with(|b| b["items"][0]["quantity"] = json!(1e30)),
            422,
            "validation_failed",
        ),
        (
            "fractional quantity",
            with(|b| b["items"][0]["quantity"] = json!(2.5)),
            422,
            "invalid_body",
        ),
        ("body is an array", json!([1, 2]), 422, "invalid_body"),
        (
            "empty items",
            with(|b| b["items"] = json!([])),
            422,
            "validation_failed",
        ),
        (
            "zero quantity",
            with(|b| b["items"][0]["quantity"] = json!(0)),
            422,
            "validation_failed",
        ),
        (
            "negative quantity",
            with(|b| b["items"][0]["quantity"] = json!(-3)),
            422,
            "validation_failed",
        ),
        (
            "absurd quantity",
            with(|b| b["items"][0]["quantity"] = json!(1_000_000)),
            422,
            "validation_failed",
        ),
        (
            "blank customer",
            with(|b| b["customer_id"] = json!("  ")),
            422,
            "validation_failed",
        ),
        (
            "bad email",
            with(|b| b["email"] = json!("not-an-email")),
            422,
            "validation_failed",
        ),
        (
            "bad currency",
            with(|b| b["currency"] = json!("DOGE")),
            422,
            "validation_failed",
        ),
        (
            "bad callback",
            with(|b| b["callback_url"] = json!("file:///etc/passwd")),
            422,
            "validation_failed",
        ),
        (
            "callback at a service",
            with(|b| b["callback_url"] = json!("http://notification-service:8082/healthz")),
            422,
            "validation_failed",
        ),
        (
            "callback at order-api itself",
            with(|b| b["callback_url"] = json!("http://127.0.0.1:8080/orders")),
            422,
            "validation_failed",
        ),
        (
            "unknown sku",
            with(|b| b["items"][0]["sku"] = json!("UNOBTAINIUM")),
            422,
            "unknown_sku",
        ),
    ];
    for (name, body, status, code) in cases {
        let response = app
            .post_order(&body, Some(&format!("key-{}", name.replace(' ', "-"))))
            .await;
        let error = assert_error(response, status, code).await;
        println!("{name}: {error}");
    }
    assert_nothing_stored(&app).await;
}

#[tokio::test]
async fn validation_errors_name_every_bad_field() {
    let app = spawn_app().await;
    let body = with(|b| {
        b["email"] = json!("x");
        b["items"][1]["quantity"] = json!(-1);
    });
    let error = assert_error(app.post_order(&body, None).await, 422, "validation_failed").await;
    let fields: Vec<&str> = error["error"]["details"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["email", "items[1].quantity"]);
}

#[tokio::test]
async fn unknown_skus_are_listed() {
    let app = spawn_app().await;
    let body = with(|b| b["items"][1]["sku"] = json!("NOPE"));
    let error = assert_error(app.post_order(&body, None).await, 422, "unknown_sku").await;
    assert_eq!(error["error"]["details"]["skus"], json!(["NOPE"]));
}

#[tokio::test]
async fn malformed_json_is_a_400() {
    let app = spawn_app().await;
    let trailing = format!("{}}}", order_body());
    for raw in ["{\"customer_id\": ", "not json", "", trailing.as_str()] {
        let response = app.post_raw(raw.to_owned(), Some("application/json")).await;
        assert_error(response, 400, "malformed_json").await;
    }
    assert_nothing_stored(&app).await;
}

#[tokio::test]
async fn a_body_that_is_not_json_by_content_type_is_a_415() {
    let app = spawn_app().await;
    let body = order_body().to_string();
    for content_type in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
    ] {
        let response = app.post_raw(body.clone(), content_type).await;
        assert_error(response, 415, "unsupported_media_type").await;
    }
    assert_nothing_stored(&app).await;
}

#[tokio::test]
async fn a_huge_body_is_a_413() {
    let app = spawn_app().await;
    let huge = with(|b| b["customer_id"] = json!("x".repeat(200 * 1024)));
    assert_error(app.post_order(&huge, None).await, 413, "payload_too_large").await;
    assert_nothing_stored(&app).await;
}

#[tokio::test]
async fn a_bad_idempotency_key_is_a_400() {
    let app = spawn_app().await;
    let long = "k".repeat(300);
    for key in ["has space", long.as_str()] {
        assert_error(
            app.post_order(&order_body(), Some(key)).await,
            400,
            "invalid_idempotency_key",
        )
        .await;
    }
    assert_nothing_stored(&app).await;
}

#[tokio::test]
async fn order_lookups_fail_clearly() {
    let app = spawn_app().await;
    assert_error(app.get("/orders/not-a-uuid").await, 400, "invalid_order_id").await;
    assert_error(
        app.get("/orders/6f1c0a64-7a35-4a36-9d29-3c3b8c1ad1c1")
            .await,
        404,
        "order_not_found",
    )
    .await;
    assert_error(app.get("/no/such/route").await, 404, "not_found").await;
    let delete = app
        .client
        .delete(format!("{}/orders", app.address))
        .send()
        .await
        .unwrap();
    assert_error(delete, 405, "method_not_allowed").await;
}
