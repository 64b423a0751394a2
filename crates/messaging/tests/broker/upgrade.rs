//! Upgrading a running deployment: the broker still has the queues the
//! previous release declared (tunable arguments baked in), with messages in
//! them, and the new release must take them over without losing one.

use std::time::Duration;

use lapin::{
    BasicProperties, Channel, Connection, ExchangeKind,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable, LongString},
};
use messaging::{Topology, contracts::Lane, topology::SUBSCRIBERS};

fn string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

async fn queue(channel: &Channel, name: &str, args: &[(&str, AMQPValue)]) {
    let mut table = FieldTable::default();
    table.insert("x-queue-type".into(), string("quorum"));
    table.insert(
        "x-expires".into(),
        AMQPValue::LongUInt(test_support::QUEUE_EXPIRES_MS),
    );
    for (key, value) in args {
        table.insert((*key).into(), value.clone());
    }
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            table,
        )
        .await
        .unwrap();
}

async fn bind(channel: &Channel, queue: &str, exchange: &str, key: &str) {
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
}

/// The topology as orderflow declared it before policies (commit cc6f3df),
/// with `orders.dead` given a delivery limit by hand, as in the report.
async fn declare_previous_release(connection: &Connection, t: &Topology) {
    let channel = connection.create_channel().await.unwrap();
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    for (exchange, kind) in [
        (t.dead_letters(), ExchangeKind::Fanout),
        (t.orders_exchange(), ExchangeKind::Direct),
        (t.events_exchange(), ExchangeKind::Fanout),
    ] {
        channel
            .exchange_declare(
                exchange.as_str().into(),
                kind,
                durable,
                FieldTable::default(),
            )
            .await
            .unwrap();
    }
    let dead = t.dead_letters();
    queue(
        &channel,
        &dead,
        &[("x-delivery-limit", AMQPValue::LongInt(5))],
    )
    .await;
    bind(&channel, &dead, &dead, "").await;
    let mut work = vec![];
    for lane in [Lane::Standard, Lane::Express] {
        work.push((t.work_queue(lane), t.orders_exchange(), lane.as_str()));
    }
    for service in SUBSCRIBERS {
        work.push((t.subscriber_queue(service), t.events_exchange(), ""));
    }
    for (name, exchange, key) in &work {
        let dead_letter = [
            ("x-dead-letter-strategy", string("at-least-once")),
            ("x-overflow", string("reject-publish")),
        ];
        let mut args = vec![
            ("x-delivery-limit", AMQPValue::LongInt(10)),
            ("x-dead-letter-exchange", string(&dead)),
        ];
        args.extend(dead_letter.clone());
        queue(&channel, name, &args).await;
        bind(&channel, name, exchange, key).await;
        let mut retry = vec![
            ("x-dead-letter-exchange", string("")),
            ("x-dead-letter-routing-key", string(name)),
        ];
        retry.extend(dead_letter);
        queue(&channel, &t.legacy_retry_queue(name), &retry).await;
    }
}

async fn publish(
    channel: &Channel,
    exchange: &str,
    key: &str,
    body: &str,
    expiration: Option<&str>,
) {
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(body.into());
    if let Some(ms) = expiration {
        properties = properties.with_expiration(ms.into());
    }
    channel
        .basic_publish(
            exchange.into(),
            key.into(),
            Default::default(),
            body.as_bytes(),
            properties,
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

#[tokio::test]
async fn queues_declared_by_the_previous_release_are_migrated_with_every_message() {
    let prefix = test_support::unique_prefix();
    let connection = test_support::amqp().await;
    let topology = Topology::new(prefix)
        .with_queue_expiry_ms(Some(test_support::QUEUE_EXPIRES_MS))
        .with_retry_delays([Duration::from_secs(1)]);
    let _guard = test_support::TopologyGuard(topology.clone());
    declare_previous_release(&connection, &topology).await;

    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(Default::default()).await.unwrap();
    let standard = topology.work_queue(Lane::Standard);
    for i in 0..25 {
        publish(
            &channel,
            &topology.orders_exchange(),
            "standard",
            &format!("order-{i}"),
            None,
        )
        .await;
    }
    for i in 0..5 {
        publish(
            &channel,
            &topology.events_exchange(),
            "",
            &format!("event-{i}"),
            None,
        )
        .await;
        publish(
            &channel,
            &topology.dead_letters(),
            "",
            &format!("dead-{i}"),
            None,
        )
        .await;
    }
    // A retry waiting in the old per-queue retry queue comes back on time.
    publish(
        &channel,
        "",
        &topology.legacy_retry_queue(&standard),
        "retrying",
        Some("2000"),
    )
    .await;

    let management = test_support::management();
    topology
        .declare(&connection, &management)
        .await
        .expect("the upgrade declares cleanly");

    for queue in topology.all_queues() {
        let info = management
            .queue(&queue)
            .await
            .unwrap()
            .expect("the queue exists");
        let mut keys: Vec<&str> = info.arguments.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(keys, ["x-expires", "x-queue-type"], "{queue} declared anew");
        assert!(
            management
                .queue(&format!("{queue}.migrating"))
                .await
                .unwrap()
                .is_none(),
            "no holding queue is left for {queue}"
        );
    }
    let depth = |queue: String| {
        let connection = &connection;
        async move { test_support::queue_depth(connection, &queue).await }
    };
    assert_eq!(depth(topology.dead_letters()).await, 5);
    for service in SUBSCRIBERS {
        assert_eq!(
            depth(topology.subscriber_queue(service)).await,
            5,
            "{service}"
        );
    }
    test_support::eventually(
        Duration::from_secs(30),
        "the old retry to come back",
        || async { (depth(standard.clone()).await == 26).then_some(()) },
    )
    .await;

    // A second service starting on the upgraded broker finds nothing to do,
    // and the emptied legacy retry queue is retired.
    topology
        .declare(&connection, &management)
        .await
        .expect("declaring again is a no-op");
    assert!(
        management
            .queue(&topology.legacy_retry_queue(&standard))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(depth(standard.clone()).await, 26);
    // Published after the upgrade: still routed.
    publish(
        &channel,
        &topology.orders_exchange(),
        "standard",
        "after",
        None,
    )
    .await;
    test_support::eventually(Duration::from_secs(10), "the new order", || async {
        (depth(standard.clone()).await == 27).then_some(())
    })
    .await;
}
