//! Server-Sent Events: an order's stream shows it move and ends at its final
//! status, a late subscriber still sees the whole story, the all-orders
//! stream filters by customer, and a client key's all-orders stream holds
//! its own orders only.

use std::{collections::HashSet, time::Duration};

use chrono::Utc;
use lapin::{BasicProperties, options::BasicPublishOptions};
use messaging::{
    contracts::{Lane, OrderEvent, Outcome, SCHEMA_VERSION},
    topology::{WATCH_DEAD_LETTERED, WATCH_RETRYING},
};
use serde_json::{Value, json};
use uuid::Uuid;

use order_api::auth::Scope;

use crate::helpers::{EventReader, TestApp, client_with, new_key, order_body, spawn_app};

async fn place(app: &TestApp, body: &Value) -> Uuid {
    let response = app.post_order(body, None).await;
    assert_eq!(response.status().as_u16(), 202);
    let order: Value = response.json().await.unwrap();
    order["id"].as_str().unwrap().parse().unwrap()
}

/// An order placed with `client`'s key.
async fn place_as(app: &TestApp, client: &reqwest::Client) -> Uuid {
    let response = client
        .post(format!("{}/orders", app.address))
        .json(&order_body())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 202);
    let order: Value = response.json().await.unwrap();
    order["id"].as_str().unwrap().parse().unwrap()
}

/// What order-processor would do: decide, and announce it on the fanout.
async fn decide(app: &TestApp, order_id: Uuid, outcome: Outcome) {
    sqlx::query!(
        "UPDATE orders SET status = $2 WHERE id = $1",
        order_id,
        outcome.status()
    )
    .execute(&app.pool)
    .await
    .unwrap();
    sqlx::query!(
        "INSERT INTO order_status_history (order_id, status, service) VALUES ($1, $2, 'test')",
        order_id,
        outcome.status()
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let event = OrderEvent {
        schema_version: SCHEMA_VERSION,
        message_id: Uuid::new_v4(),
        occurred_at: Utc::now(),
        outcome,
        order_id,
        customer_id: "c-42".into(),
        email: "ada@example.com".into(),
        total_cents: 8948,
        currency: "EUR".into(),
        lane: Lane::Standard,
        processed_by: "processor-test".into(),
        callback_url: None,
        payment: None,
        items: Vec::new(),
    };
    let channel = app.amqp.create_channel().await.unwrap();
    channel
        .basic_publish(
            app.topology.events_exchange().as_str().into(),
            "".into(),
            BasicPublishOptions::default(),
            &serde_json::to_vec(&event).unwrap(),
            BasicProperties::default(),
        )
        .await
        .unwrap();
}

/// What notification-service would do.
async fn notify(app: &TestApp, order_id: Uuid) {
    sqlx::query!(
        "INSERT INTO order_status_history (order_id, status, service)
         VALUES ($1, 'notified', 'notification-service')",
        order_id
    )
    .execute(&app.pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn a_subscriber_sees_its_order_move_in_order_and_the_stream_ends() {
    let app = spawn_app().await;
    let id = place(&app, &order_body()).await;
    let mut events = EventReader::open(&app, &format!("/orders/{id}/events")).await;

    let (name, data) = events.next().await.unwrap();
    assert_eq!(name, "accepted");
    assert_eq!(data["order_id"], id.to_string());
    assert_eq!(data["lane"], "standard");

    // No pause: the stream opens once the feed's queue is bound.
    decide(
        &app,
        id,
        Outcome::Rejected {
            reason: "out_of_stock: WIDGET".into(),
        },
    )
    .await;
    let (name, data) = events.next().await.unwrap();
    assert_eq!(name, "rejected");
    assert_eq!(data["reason"], "out_of_stock: WIDGET");
    assert_eq!(
        events.next().await,
        None,
        "the stream ends at the final status"
    );
}

/// Queues of order-api's live feed bound to the order-events exchange (the
/// subscribers' own queues are named; the feed's is server-named).
async fn live_feed_queues(app: &TestApp) -> usize {
    let url = format!(
        "{}/api/exchanges/%2F/{}/bindings/source",
        test_support::management_url(),
        app.topology.events_exchange()
    );
    let bindings: Vec<Value> = reqwest::get(url).await.unwrap().json().await.unwrap();
    bindings
        .iter()
        .filter(|b| {
            b["destination"]
                .as_str()
                .unwrap_or("")
                .starts_with("amq.gen-")
        })
        .count()
}

#[tokio::test]
async fn the_live_feed_receives_events_only_while_a_client_watches() {
    let app = spawn_app().await;
    let id = place(&app, &order_body()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(live_feed_queues(&app).await, 0, "no one watches: no queue");

    let mut events = EventReader::open(&app, &format!("/orders/{id}/events")).await;
    assert_eq!(
        live_feed_queues(&app).await,
        1,
        "bound before the stream opens"
    );
    assert_eq!(events.next().await.unwrap().0, "accepted");
    decide(&app, id, Outcome::Processed).await;
    assert_eq!(events.next().await.unwrap().0, "processed");
    assert_eq!(events.next().await, None);
    drop(events);

    test_support::eventually(
        Duration::from_secs(30),
        "the live feed's queue to go once no one watches",
        || async { (live_feed_queues(&app).await == 0).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn a_subscriber_after_the_end_still_sees_the_whole_story() {
    let app = spawn_app().await;
    let mut body = order_body();
    body["express"] = json!(true);
    let id = place(&app, &body).await;
    decide(&app, id, Outcome::Processed).await;
    notify(&app, id).await;

    let mut events = EventReader::open(&app, &format!("/orders/{id}/events")).await;
    let mut names = Vec::new();
    while let Some((name, data)) = events.next().await {
        assert_eq!(data["lane"], "express");
        names.push(name);
    }
    assert_eq!(names, ["accepted", "processed", "notified"]);
}

#[tokio::test]
async fn the_all_orders_stream_filters_by_customer() {
    let app = spawn_app().await;
    let mut events = EventReader::open_with(&app, &app.admin, "/events?customer_id=c-99").await;

    let mut other = order_body();
    other["customer_id"] = json!("c-1");
    place(&app, &other).await;
    let mut mine = order_body();
    mine["customer_id"] = json!("c-99");
    let id = place(&app, &mine).await;

    let (name, data) = events.next().await.unwrap();
    assert_eq!(name, "accepted");
    assert_eq!(data["order_id"], id.to_string(), "only c-99's orders");
    assert_eq!(data["customer_id"], "c-99");
}

#[tokio::test]
async fn an_unknown_order_has_no_stream() {
    let app = spawn_app().await;
    let missing = app.get(&format!("/orders/{}/events", Uuid::new_v4())).await;
    assert_eq!(missing.status().as_u16(), 404);
    let invalid = app.get("/orders/nope/events").await;
    assert_eq!(invalid.status().as_u16(), 400);
}

/// The copy a consumer sends watchers of a retry or a dead letter: the
/// order's own body, and the consumer's headers (the held flag a boolean,
/// as the consumer sets it).
async fn fail(app: &TestApp, what: &str, order_id: Uuid, headers: &[(&str, &str)]) {
    let body = json!({"order_id": order_id, "customer_id": "c-42"});
    let mut table = lapin::types::FieldTable::default();
    for (name, value) in headers {
        let value = if *name == messaging::consumer::HELD_HEADER {
            lapin::types::AMQPValue::Boolean(*value == "true")
        } else {
            lapin::types::AMQPValue::LongString((*value).into())
        };
        table.insert((*name).into(), value);
    }
    let channel = app.amqp.create_channel().await.unwrap();
    channel
        .basic_publish(
            app.topology.watch_exchange().as_str().into(),
            what.into(),
            BasicPublishOptions::default(),
            &serde_json::to_vec(&body).unwrap(),
            BasicProperties::default().with_headers(table),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn the_all_orders_stream_shows_retries_and_dead_letters_on_their_order() {
    let app = spawn_app().await;
    let id = place(&app, &order_body()).await;
    let mut events = EventReader::open_with(&app, &app.admin, "/events").await;
    fail(
        &app,
        WATCH_RETRYING,
        id,
        &[
            (messaging::consumer::ATTEMPTS_HEADER, "1"),
            (messaging::topology::RETRY_DELAY_HEADER, "1000"),
            (
                messaging::consumer::QUEUE_HEADER,
                &app.topology.work_queue(Lane::Standard),
            ),
        ],
    )
    .await;
    let (name, data) = events.next().await.unwrap();
    assert_eq!(name, "retrying", "{data}");
    assert_eq!(data["order_id"], id.to_string());
    let reason = data["reason"].as_str().unwrap();
    assert!(
        reason.contains("attempt 1")
            && reason.contains("1000 ms")
            && reason.contains(&app.topology.work_queue(Lane::Standard)),
        "{reason}"
    );

    fail(
        &app,
        WATCH_DEAD_LETTERED,
        id,
        &[
            (messaging::consumer::ATTEMPTS_HEADER, "8"),
            (
                messaging::consumer::REASON_HEADER,
                "gave up after 8 attempts: payment provider unavailable",
            ),
            (
                messaging::consumer::QUEUE_HEADER,
                &app.topology.work_queue(Lane::Standard),
            ),
            (messaging::consumer::HELD_HEADER, "true"),
        ],
    )
    .await;
    let (name, data) = events.next().await.unwrap();
    assert_eq!(name, "held", "a dead-lettered order is held: {data}");
    assert_eq!(data["order_id"], id.to_string());
    assert!(
        data["reason"]
            .as_str()
            .unwrap()
            .starts_with("gave up after 8 attempts"),
        "{data}"
    );

    // A dead letter that held no order (a subscriber's event, say) is only
    // a dead letter.
    fail(
        &app,
        WATCH_DEAD_LETTERED,
        id,
        &[(messaging::consumer::REASON_HEADER, "not an OrderEvent")],
    )
    .await;
    let (name, data) = events.next().await.unwrap();
    assert_eq!(name, "dead_lettered", "{data}");
    assert_eq!(data["order_id"], id.to_string());

    // Not an order: not shown, and the stream goes on.
    let channel = app.amqp.create_channel().await.unwrap();
    channel
        .basic_publish(
            app.topology.watch_exchange().as_str().into(),
            WATCH_DEAD_LETTERED.into(),
            BasicPublishOptions::default(),
            b"not json",
            BasicProperties::default(),
        )
        .await
        .unwrap();
    decide(&app, id, Outcome::Processed).await;
    let (name, data) = events.next().await.unwrap();
    assert_eq!(name, "processed", "{data}");
    assert_eq!(data["processed_by"], "processor-test");
}

#[tokio::test]
async fn a_watcher_does_not_take_a_retry_that_no_retry_queue_takes() {
    let app = spawn_app().await;
    let id = place(&app, &order_body()).await;
    // Someone watches, and the wire tap is bound: a copy reaches them.
    let mut events = EventReader::open_with(&app, &app.admin, "/events").await;
    fail(&app, WATCH_RETRYING, id, &[]).await;
    let (name, data) = events.next().await.unwrap();
    assert_eq!(name, "retrying", "{data}");
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        messaging::topology::RETRY_DELAY_HEADER.into(),
        lapin::types::AMQPValue::LongString("1234".into()),
    );
    let refused = test_support::publisher(&app.topology)
        .publish(
            &app.topology.retry_exchange(),
            &app.topology.work_queue(Lane::Standard),
            b"lost?",
            BasicProperties::default().with_headers(headers),
        )
        .await;
    assert!(
        refused.is_err(),
        "a retry no delay queue takes is still returned as unroutable while someone watches"
    );
}

/// Read `events` until each of `expected` (an event name and its order) has
/// come; what came, in order.
async fn read_until_all(
    events: &mut EventReader,
    expected: &[(&str, Uuid)],
) -> Vec<(String, Uuid)> {
    let mut seen = Vec::new();
    while !expected
        .iter()
        .all(|(name, id)| seen.iter().any(|(n, i)| n == name && i == id))
    {
        let (name, data) = events.next().await.expect("the stream goes on");
        let id = data["order_id"].as_str().unwrap().parse().unwrap();
        seen.push((name, id));
    }
    seen
}

#[tokio::test]
async fn a_client_key_streams_its_own_orders_events_and_never_another_clients() {
    let app = spawn_app().await;
    let shop = client_with(&new_key(&app.pool, "other-shop", Scope::Client).await);
    // Placed while no one watches: whose they are is read from Postgres
    // when their outcomes come from the broker.
    let mine_before = place(&app, &order_body()).await;
    let theirs_before = place_as(&app, &shop).await;

    let mut mine = EventReader::open(&app, "/events").await;
    let mut theirs = EventReader::open_with(&app, &shop, "/events").await;
    let mut admin = EventReader::open_with(&app, &app.admin, "/events").await;

    // Accepted by order-api itself, retried (the wire tap) and decided (the
    // fanout, whose events do not say whose order it is): each client's
    // interleaved with the other's.
    let theirs_now = place_as(&app, &shop).await;
    let mine_now = place(&app, &order_body()).await;
    fail(&app, WATCH_RETRYING, theirs_now, &[]).await;
    fail(&app, WATCH_RETRYING, mine_now, &[]).await;
    // A dead letter of no order in the database is no client's.
    let nobodys = Uuid::new_v4();
    fail(&app, WATCH_DEAD_LETTERED, nobodys, &[]).await;
    for id in [theirs_before, mine_before, theirs_now, mine_now] {
        decide(&app, id, Outcome::Processed).await;
    }

    // The firehose still has everything.
    read_until_all(
        &mut admin,
        &[
            ("accepted", theirs_now),
            ("accepted", mine_now),
            ("retrying", theirs_now),
            ("retrying", mine_now),
            ("dead_lettered", nobodys),
            ("processed", theirs_before),
            ("processed", mine_before),
            ("processed", theirs_now),
            ("processed", mine_now),
        ],
    )
    .await;
    // Everything above is in the feed now: an order accepted after it
    // comes after it on every stream, so a stream read up to its own last
    // order has been sent all it will ever be of the above.
    let mine_last = place(&app, &order_body()).await;
    let theirs_last = place_as(&app, &shop).await;

    let cases = [
        (&mut mine, [mine_before, mine_now, mine_last], "test-client"),
        (
            &mut theirs,
            [theirs_before, theirs_now, theirs_last],
            "other-shop",
        ),
    ];
    for (events, [before, now, last], client) in cases {
        let seen = read_until_all(
            events,
            &[
                ("accepted", now),
                ("retrying", now),
                ("processed", before),
                ("processed", now),
                ("accepted", last),
            ],
        )
        .await;
        let own = HashSet::from([before, now, last]);
        assert!(
            seen.iter().all(|(_, id)| own.contains(id)),
            "{client} was sent an event of an order not its own: {seen:?}"
        );
    }
}
