//! Listing and replaying against the real broker.

use std::time::Duration;

use dead_letters::{Selection, list, replay};
use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, LongString},
};
use messaging::{
    consumer::{ATTEMPTS_HEADER, QUEUE_HEADER, REASON_HEADER, SERVICE_HEADER},
    contracts::Lane,
};

fn dead_properties(message_id: &str, queue: &str, reason: &str) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (name, value) in [
        (REASON_HEADER, reason),
        (SERVICE_HEADER, "order-processor"),
        (QUEUE_HEADER, queue),
    ] {
        headers.insert(name.into(), AMQPValue::LongString(LongString::from(value)));
    }
    headers.insert(ATTEMPTS_HEADER.into(), AMQPValue::LongUInt(5));
    BasicProperties::default()
        .with_message_id(message_id.into())
        .with_headers(headers)
}

#[tokio::test]
async fn dead_letters_are_listed_with_their_reason_and_replayed_one_at_a_time() {
    let prefix = test_support::unique_prefix();
    let connection = test_support::amqp().await;
    let topology = test_support::declare_topology(&connection, &prefix).await;
    let _guard = test_support::TopologyGuard(topology.clone());
    let broker = test_support::broker(&topology);
    let publisher = test_support::publisher(&topology);
    let work = topology.work_queue(Lane::Standard);
    for (id, reason) in [
        ("m-1", "gave up after 5 attempts: db down"),
        ("m-2", "not an OrderPlaced message"),
    ] {
        publisher
            .publish(
                &topology.dead_letters(),
                "",
                id.as_bytes(),
                dead_properties(id, &work, reason),
            )
            .await
            .unwrap();
    }

    let letters = list(&broker).await.unwrap();
    assert_eq!(letters.len(), 2);
    assert_eq!(letters[0].message_id, "m-1");
    assert_eq!(letters[0].reason, "gave up after 5 attempts: db down");
    assert_eq!(letters[0].attempts, 5);
    assert_eq!(letters[1].queue.as_deref(), Some(work.as_str()));
    assert_eq!(
        list(&broker).await.unwrap().len(),
        2,
        "listing leaves them in place"
    );

    let replayed = replay(&broker, &Selection::MessageId("m-2".into()))
        .await
        .unwrap();

    assert_eq!(replayed.len(), 1);
    let back = test_support::next_message(&connection, &work, Duration::from_secs(5)).await;
    assert_eq!(back.data, b"m-2");
    assert_eq!(
        messaging::consumer::previous_attempts(&back.properties),
        0,
        "a replay starts with fresh attempts"
    );
    let left = list(&broker).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].message_id, "m-1");

    assert_eq!(replay(&broker, &Selection::All).await.unwrap().len(), 1);
    assert!(list(&broker).await.unwrap().is_empty());
}

#[tokio::test]
async fn dead_letters_survive_being_listed_and_partly_replayed_a_hundred_times() {
    // Every listing and every partial replay hands the other dead letters
    // back by closing its channel, which a quorum queue counts as a
    // delivery: on RabbitMQ 4.x, past the default limit of 20, a queue
    // without an explicit "no limit" would drop them.
    let prefix = test_support::unique_prefix();
    let connection = test_support::amqp().await;
    let topology = test_support::declare_topology(&connection, &prefix).await;
    let _guard = test_support::TopologyGuard(topology.clone());
    let broker = test_support::broker(&topology);
    let publisher = test_support::publisher(&topology);
    let work = topology.work_queue(Lane::Standard);
    let ids: Vec<String> = (1..=4).map(|i| format!("d-{i}")).collect();
    for id in &ids {
        publisher
            .publish(
                &topology.dead_letters(),
                "",
                id.as_bytes(),
                dead_properties(id, &work, "gave up"),
            )
            .await
            .unwrap();
    }

    for round in 0..100 {
        let mut listed: Vec<String> = list(&broker)
            .await
            .unwrap()
            .into_iter()
            .map(|l| l.message_id)
            .collect();
        listed.sort();
        assert_eq!(listed, ids, "round {round}: every dead letter is listed");
        // Always the same one: the others are only ever handed back.
        let chosen = &ids[0];
        let replayed = replay(&broker, &Selection::MessageId(chosen.clone()))
            .await
            .unwrap();
        assert_eq!(replayed.len(), 1, "round {round}: {chosen} replayed");
        // It fails again: back to the dead letters, as a consumer would.
        let back = test_support::next_message(&connection, &work, Duration::from_secs(10)).await;
        assert_eq!(back.data, chosen.as_bytes());
        publisher
            .publish(
                &topology.dead_letters(),
                "",
                &back.data,
                dead_properties(chosen, &work, "gave up"),
            )
            .await
            .unwrap();
    }
    assert_eq!(list(&broker).await.unwrap().len(), ids.len());
}
