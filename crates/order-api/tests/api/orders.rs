use std::time::Duration;

use messaging::contracts::{Lane, SCHEMA_VERSION};
use serde_json::{Value, json};

use crate::helpers::{count, order_body, spawn_app};

#[tokio::test]
async fn a_valid_order_is_stored_published_and_answered_with_202() {
    let app = spawn_app().await;

    let response = app.post_order(&order_body(), None).await;

    assert_eq!(response.status().as_u16(), 202);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let correlation = response.headers()["x-correlation-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        location,
        format!("/orders/{}", body["id"].as_str().unwrap())
    );
    assert_eq!(body["status"], "accepted");
    assert_eq!(body["total_cents"], 2 * 1999 + 4950);
    assert_eq!(body["lane"], "standard");
    assert_eq!(
        count!(&app.pool, r#"SELECT count(*) AS "n!" FROM orders"#),
        1
    );
    // Marked by the relay within a few milliseconds of the confirm.
    test_support::eventually(
        Duration::from_secs(5),
        "the outbox row marked published",
        || async {
            (count!(
                &app.pool,
                r#"SELECT count(*) AS "n!" FROM outbox WHERE published_at IS NOT NULL"#
            ) == 1)
                .then_some(())
        },
    )
    .await;

    let (placed, properties) = app
        .next_placed(&app.topology.work_queue(Lane::Standard))
        .await;
    assert_eq!(placed.order_id.to_string(), body["id"].as_str().unwrap());
    assert_eq!(placed.schema_version, SCHEMA_VERSION);
    assert_eq!(placed.items.len(), 2);
    assert_eq!(
        properties.correlation_id().as_ref().unwrap().as_str(),
        correlation,
        "the correlation id travels in the AMQP properties"
    );
    assert_eq!(properties.delivery_mode(), &Some(2), "persistent");
}

#[tokio::test]
async fn an_express_order_travels_on_the_express_queue() {
    let app = spawn_app().await;
    let mut body = order_body();
    body["express"] = json!(true);

    let response = app.post_order(&body, None).await;

    assert_eq!(response.status().as_u16(), 202);
    let (placed, _) = app
        .next_placed(&app.topology.work_queue(Lane::Express))
        .await;
    assert_eq!(placed.lane, Lane::Express);
    assert_eq!(
        test_support::queue_depth(&app.amqp, &app.topology.work_queue(Lane::Standard)).await,
        0
    );
}

#[tokio::test]
async fn a_client_correlation_id_is_kept_and_echoed() {
    let app = spawn_app().await;
    let response = app
        .client
        .post(format!("{}/orders", app.address))
        .header("X-Correlation-Id", "trace-abc-123")
        .json(&order_body())
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-correlation-id"], "trace-abc-123");
    let (_, properties) = app
        .next_placed(&app.topology.work_queue(Lane::Standard))
        .await;
    assert_eq!(
        properties.correlation_id().as_ref().unwrap().as_str(),
        "trace-abc-123"
    );
}

#[tokio::test]
async fn get_returns_the_order_and_its_history() {
    let app = spawn_app().await;
    let created: Value = app
        .post_order(&order_body(), None)
        .await
        .json()
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap();

    let response = app.get(&format!("/orders/{id}")).await;

    assert_eq!(response.status().as_u16(), 200);
    let order: Value = response.json().await.unwrap();
    assert_eq!(order["id"], id);
    assert_eq!(order["status"], "accepted");
    assert_eq!(order["items"][0]["unit_price_cents"], 1999);
    let history = order["history"].as_array().unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0]["status"], "accepted");
    assert_eq!(history[0]["service"], "order-api");
}

#[tokio::test]
async fn health_and_readiness_answer() {
    let app = spawn_app().await;
    assert_eq!(app.get("/healthz").await.status().as_u16(), 200);
    let ready = app.get("/readyz").await;
    assert_eq!(ready.status().as_u16(), 200);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["postgres"], "ok");
    assert_eq!(body["rabbitmq"], "ok");
}

#[tokio::test]
async fn metrics_count_accepted_orders_and_replays() {
    let app = spawn_app().await;
    app.post_order(&order_body(), Some("m-1")).await;
    app.post_order(&order_body(), Some("m-1")).await;

    let response = app.get_as(&app.admin, "/metrics").await;

    assert_eq!(response.status().as_u16(), 200);
    let text = response.text().await.unwrap();
    assert!(text.contains("publish_confirm_seconds_bucket"), "{text}");
    assert!(app.metric("orders_accepted_total{lane=\"standard\"}").await >= Some(1.0));
    assert!(app.metric("idempotent_replays_total").await >= Some(1.0));
}

#[tokio::test]
async fn an_order_whose_queue_was_deleted_is_published_once_the_topology_is_back() {
    let app = spawn_app().await;
    // Warm up: the publisher connects before the queue disappears.
    assert_eq!(
        app.post_order(&order_body(), None).await.status().as_u16(),
        202
    );
    let queue = app.topology.work_queue(Lane::Standard);
    let channel = app.amqp.create_channel().await.unwrap();
    channel
        .queue_delete(queue.as_str().into(), Default::default())
        .await
        .unwrap();

    let response = app.post_order(&order_body(), None).await;

    assert_eq!(
        response.status().as_u16(),
        202,
        "the order is safe in the outbox"
    );
    test_support::eventually(
        std::time::Duration::from_secs(10),
        "the relay to publish it",
        || async {
            (count!(
                &app.pool,
                r#"SELECT count(*) AS "n!" FROM outbox WHERE published_at IS NULL"#
            ) == 0)
                .then_some(())
        },
    )
    .await;
    assert_eq!(test_support::queue_depth(&app.amqp, &queue).await, 1);
}
