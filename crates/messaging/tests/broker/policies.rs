//! What the policies do on the broker, whatever its version.

use std::{
    sync::atomic::{AtomicI32, Ordering},
    time::Duration,
};

use lapin::{
    BasicProperties,
    options::{BasicGetOptions, BasicRejectOptions},
    types::{AMQPValue, FieldTable, LongString},
};
use messaging::{contracts::Lane, topology::RETRY_DELAY_HEADER};

#[tokio::test]
async fn every_queue_is_declared_with_its_type_alone_and_runs_under_its_policy() {
    let prefix = test_support::unique_prefix();
    let connection = test_support::amqp().await;
    let topology = test_support::declare_topology(&connection, &prefix).await;
    let _guard = test_support::TopologyGuard(topology.clone());
    let management = test_support::management();
    let broker_4 = management.version().await.unwrap().starts_with('4');

    for queue in topology.all_queues() {
        let info = test_support::eventually(
            Duration::from_secs(30),
            &format!("{queue} in the management API"),
            || async { management.queue(&queue).await.unwrap() },
        )
        .await;
        let mut keys: Vec<&str> = info.arguments.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(keys, ["x-expires", "x-queue-type"], "{queue}");
    }
    // The broker's own delivery limit (the crash-loop safety net) comes from
    // the policy: a work queue message rejected past it is dead-lettered.
    let publisher = test_support::publisher(&topology);
    let work = topology.work_queue(Lane::Standard);
    publisher
        .publish(
            &topology.orders_exchange(),
            Lane::Standard.as_str(),
            b"crash loop",
            BasicProperties::default().with_message_id("crash-1".into()),
        )
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let dead_letters = topology.dead_letters();
    let rejections = AtomicI32::new(0);
    test_support::eventually(Duration::from_secs(60), "the dead letter", || {
        let (channel, work, connection, dead_letters) =
            (&channel, &work, &connection, &dead_letters);
        let rejections = &rejections;
        async move {
            if test_support::queue_depth(connection, dead_letters).await == 1 {
                return Some(());
            }
            let got = channel
                .basic_get(work.as_str().into(), BasicGetOptions::default())
                .await
                .unwrap()?;
            got.delivery
                .reject(BasicRejectOptions { requeue: true })
                .await
                .unwrap();
            rejections.fetch_add(1, Ordering::Relaxed);
            None
        }
    })
    .await;
    let rejections = rejections.into_inner();
    assert!(
        rejections <= messaging::topology::DELIVERY_LIMIT + 1,
        "dead-lettered after {rejections} deliveries"
    );
    let dead = test_support::next_message(
        &connection,
        &topology.dead_letters(),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(dead.data, b"crash loop");
    assert_eq!(test_support::queue_depth(&connection, &work).await, 0);
    // Dead letters carry no limit of their own: "none" on 3.x is the
    // absence of a policy, on 4.x it must be spelled -1.
    let dead_policy = management
        .policy(&messaging::Topology::policy_name(&topology.dead_letters()))
        .await
        .unwrap();
    if broker_4 {
        assert_eq!(dead_policy, Some(serde_json::json!({"delivery-limit": -1})));
    } else {
        assert_eq!(dead_policy, None);
    }
}

fn retry_headers(delay_ms: u64) -> FieldTable {
    let mut headers = FieldTable::default();
    headers.insert(
        RETRY_DELAY_HEADER.into(),
        AMQPValue::LongString(LongString::from(delay_ms.to_string())),
    );
    headers
}

#[tokio::test]
async fn a_short_retry_is_not_held_behind_a_long_one() {
    let prefix = test_support::unique_prefix();
    let connection = test_support::amqp().await;
    let topology = messaging::Topology::new(prefix)
        .with_queue_expiry_ms(Some(test_support::QUEUE_EXPIRES_MS))
        .with_retry_delays([Duration::from_millis(500), Duration::from_secs(60)]);
    topology
        .declare(&connection, &test_support::management())
        .await
        .unwrap();
    let _guard = test_support::TopologyGuard(topology.clone());
    let publisher = test_support::publisher(&topology);
    let work = topology.work_queue(Lane::Express);
    for (body, delay_ms) in [(&b"in a minute"[..], 60_000), (b"in half a second", 500)] {
        publisher
            .publish(
                &topology.retry_exchange(),
                &work,
                body,
                BasicProperties::default().with_headers(retry_headers(delay_ms)),
            )
            .await
            .unwrap();
    }
    let first = test_support::next_message(&connection, &work, Duration::from_secs(50)).await;
    assert_eq!(first.data, b"in half a second");
    assert_eq!(
        test_support::queue_depth(&connection, &topology.retry_queue(Duration::from_secs(60)))
            .await,
        1,
        "the long retry still waits"
    );
}

#[tokio::test]
async fn a_retry_with_a_delay_no_queue_waits_for_is_refused_not_dropped() {
    let prefix = test_support::unique_prefix();
    let connection = test_support::amqp().await;
    let topology = test_support::declare_topology(&connection, &prefix).await;
    let _guard = test_support::TopologyGuard(topology.clone());
    let publisher = test_support::publisher(&topology);
    let refused = publisher
        .publish(
            &topology.retry_exchange(),
            &topology.work_queue(Lane::Standard),
            b"lost?",
            BasicProperties::default().with_headers(retry_headers(1234)),
        )
        .await;
    assert!(refused.is_err(), "an unroutable retry is an error");
}
