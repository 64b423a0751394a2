//! A consumer the broker does not serve while messages wait (as after a
//! lost delivery or settlement in a leader change) subscribes again instead
//! of sitting idle for ever. A single-active-consumer queue makes such a
//! consumer on purpose: the broker delivers only to the first subscriber,
//! which holds its message and never acks.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures_util::StreamExt;
use lapin::{
    BasicProperties,
    message::Delivery,
    options::{BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable, LongString},
};
use messaging::consumer::{self, ConsumerSpec, Disposition};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn a_consumer_idle_beside_waiting_messages_gives_up_its_subscription() {
    let connection = test_support::amqp().await;
    let topology =
        test_support::declare_topology(&connection, &test_support::unique_prefix()).await;
    let _guard = test_support::TopologyGuard(topology.clone());
    let queue = format!("{}.single-active", topology.prefix().unwrap());
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    arguments.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    arguments.insert(
        "x-expires".into(),
        AMQPValue::LongUInt(test_support::QUEUE_EXPIRES_MS),
    );
    let setup = connection.create_channel().await.unwrap();
    setup
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            arguments,
        )
        .await
        .unwrap();

    // The active consumer: takes one message and keeps it.
    let active = connection.create_channel().await.unwrap();
    active
        .basic_qos(1, BasicQosOptions::default())
        .await
        .unwrap();
    let mut holder = active
        .basic_consume(
            queue.as_str().into(),
            "holder".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let publisher = test_support::publisher(&topology);
    for n in 0..3 {
        publisher
            .publish(
                "",
                &queue,
                format!("m{n}").as_bytes(),
                BasicProperties::default().with_message_id(format!("m{n}").into()),
            )
            .await
            .unwrap();
    }
    let _held = tokio::time::timeout(Duration::from_secs(30), holder.next())
        .await
        .expect("the active consumer got a message");

    // Ours: subscribed, never served.
    let handled = Arc::new(AtomicUsize::new(0));
    let handler = {
        let handled = handled.clone();
        consumer::Each(move |_delivery: Delivery| {
            handled.fetch_add(1, Ordering::SeqCst);
            async { Disposition::Ack }
        })
    };
    let spec = ConsumerSpec {
        queue: queue.clone(),
        tag: "idle".into(),
        service: "stalled-test".into(),
        prefetch: 10,
        batch_size: 5,
        retry: crate::batches::retry(),
    };
    let channel = connection.create_channel().await.unwrap();
    let result = tokio::time::timeout(
        Duration::from_secs(120),
        consumer::run(
            &channel,
            &topology,
            &publisher,
            spec,
            CancellationToken::new(),
            handler,
        ),
    )
    .await
    .expect("the consumer gave up a subscription the broker did not serve");
    assert!(result.is_err(), "reported as a failed round: {result:?}");
    assert_eq!(handled.load(Ordering::SeqCst), 0, "it never got a message");
    let _ = setup
        .queue_delete(queue.as_str().into(), Default::default())
        .await;
}
