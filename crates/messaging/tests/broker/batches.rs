//! The consume loop's batches on the real broker: what waits is handled
//! together and acked with `multiple`; a batch that fails is split, so only
//! the message at fault is retried or dead-lettered.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use lapin::{BasicProperties, message::Delivery};
use messaging::{
    Topology,
    consumer::{self, ConsumerSpec, Disposition, Handler, REASON_HEADER, RetryPolicy},
    contracts::Lane,
};
use tokio_util::sync::CancellationToken;

const MESSAGES: usize = 60;
const POISON: &str = "poison";
const FLAKY: &str = "flaky";

/// Effects committed per message body, and the sizes of the batches seen.
#[derive(Clone, Default)]
struct Recorder {
    effects: Arc<Mutex<HashMap<String, u32>>>,
    batches: Arc<Mutex<Vec<usize>>>,
}

fn body(delivery: &Delivery) -> String {
    String::from_utf8_lossy(&delivery.data).into_owned()
}

/// A transient failure the first time only.
fn failing(delivery: &Delivery) -> bool {
    let body = body(delivery);
    body == POISON || (body == FLAKY && consumer::previous_attempts(&delivery.properties) == 0)
}

impl Recorder {
    fn commit(&self, deliveries: &[&Delivery]) {
        let mut effects = self.effects.lock().unwrap();
        for delivery in deliveries {
            *effects.entry(body(delivery)).or_default() += 1;
        }
    }

    fn effects(&self) -> HashMap<String, u32> {
        self.effects.lock().unwrap().clone()
    }
}

impl Handler for Recorder {
    async fn handle(&self, delivery: Delivery) -> Disposition {
        match body(&delivery).as_str() {
            POISON => Disposition::DeadLetter {
                reason: "poison in the test".into(),
            },
            FLAKY if failing(&delivery) => Disposition::Retry {
                reason: "flaky in the test".into(),
            },
            _ => {
                self.commit(&[&delivery]);
                Disposition::Ack
            }
        }
    }

    /// One transaction for the batch: any failing message rolls it back.
    async fn handle_batch(&self, deliveries: &[Delivery]) -> Option<Vec<Disposition>> {
        self.batches.lock().unwrap().push(deliveries.len());
        // Batches finish out of the order they started in.
        let pause = deliveries[0].delivery_tag % 4 * 15;
        tokio::time::sleep(Duration::from_millis(pause)).await;
        if deliveries.iter().any(failing) {
            return None;
        }
        self.commit(&deliveries.iter().collect::<Vec<_>>());
        Some(vec![Disposition::Ack; deliveries.len()])
    }
}

/// Quick retries, so a flaky message comes back within the test.
pub(crate) fn retry() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 3,
        initial_delay: Duration::from_millis(200),
        max_delay: Duration::from_millis(200),
        max_wait: Duration::from_secs(60),
    }
}

/// Publish the messages (one poison, one flaky), then consume them in
/// batches of up to `batch_size`; returns what the handler saw and the
/// topology, once every message is settled and the consumer stopped.
async fn consume_all(batch_size: u16) -> (Recorder, Topology, lapin::Connection) {
    let retry = retry();
    let connection = test_support::amqp().await;
    let topology = Topology::new(test_support::unique_prefix())
        .with_queue_expiry_ms(Some(test_support::QUEUE_EXPIRES_MS))
        .with_retry_delays(retry.delays());
    topology
        .declare(&connection, &test_support::management())
        .await
        .expect("declaring the test topology");
    let publisher = test_support::publisher(&topology);
    for i in 0..MESSAGES {
        let body = match i {
            17 => POISON.to_owned(),
            33 => FLAKY.to_owned(),
            _ => format!("ok-{i}"),
        };
        publisher
            .publish(
                &topology.orders_exchange(),
                Lane::Standard.as_str(),
                body.as_bytes(),
                BasicProperties::default().with_message_id(format!("m-{i}").into()),
            )
            .await
            .unwrap();
    }

    let recorder = Recorder::default();
    let spec = ConsumerSpec {
        queue: topology.work_queue(Lane::Standard),
        tag: "batches".into(),
        service: "batch-test".into(),
        prefetch: 50,
        batch_size,
        retry,
    };
    let channel = connection.create_channel().await.unwrap();
    let stop = CancellationToken::new();
    let consuming = {
        let (topology, recorder, stop) = (topology.clone(), recorder.clone(), stop.clone());
        tokio::spawn(async move {
            consumer::run(&channel, &topology, &publisher, spec, stop, recorder).await
        })
    };
    test_support::eventually(
        Duration::from_secs(60),
        "every message but the poison to take effect",
        || async { (recorder.effects().len() == MESSAGES - 1).then_some(()) },
    )
    .await;
    stop.cancel();
    consuming
        .await
        .unwrap()
        .expect("the consumer drained without losing its channel (no delivery acked twice)");
    (recorder, topology, connection)
}

async fn assert_settled_once(
    recorder: &Recorder,
    topology: &Topology,
    connection: &lapin::Connection,
) {
    let effects = recorder.effects();
    assert!(
        effects.values().all(|&n| n == 1),
        "every effect once: {effects:?}"
    );
    assert!(!effects.contains_key(POISON));
    assert_eq!(
        effects.get(FLAKY),
        Some(&1),
        "the flaky message, retried once"
    );
    let dead = test_support::next_message(
        connection,
        &topology.dead_letters(),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(body(&dead), POISON);
    assert_eq!(
        test_support::header(&dead, REASON_HEADER).as_deref(),
        Some("poison in the test")
    );
    // Acked, not merely delivered: nothing comes back once the consumer is gone.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        test_support::queue_depth(connection, &topology.work_queue(Lane::Standard)).await,
        0
    );
    assert_eq!(
        test_support::queue_depth(connection, &topology.dead_letters()).await,
        0,
        "only the poison is dead-lettered"
    );
}

#[tokio::test]
async fn waiting_messages_are_handled_in_batches_and_only_the_failing_ones_are_set_apart() {
    let (recorder, topology, connection) = consume_all(20).await;
    let _guard = test_support::TopologyGuard(topology.clone());
    let batches = recorder.batches.lock().unwrap().clone();
    assert!(
        batches.iter().any(|&n| n > 1),
        "messages that waited were handed over together: {batches:?}"
    );
    assert!(batches.iter().all(|&n| n <= 20), "{batches:?}");
    assert_settled_once(&recorder, &topology, &connection).await;
}

#[tokio::test]
async fn a_batch_size_of_one_handles_each_message_on_its_own() {
    let (recorder, topology, connection) = consume_all(1).await;
    let _guard = test_support::TopologyGuard(topology.clone());
    assert_eq!(*recorder.batches.lock().unwrap(), Vec::<usize>::new());
    assert_settled_once(&recorder, &topology, &connection).await;
}

/// A channel lost while a batch's handler hangs (on a dead database
/// connection, say): the consumer gives up on the batch and returns, so
/// the service reconnects, and the broker hands the message on.
#[tokio::test]
async fn a_consumer_whose_channel_is_lost_returns_even_while_a_batch_hangs() {
    let connection = test_support::amqp().await;
    let topology =
        test_support::declare_topology(&connection, &test_support::unique_prefix()).await;
    let _guard = test_support::TopologyGuard(topology.clone());
    let publisher = test_support::publisher(&topology);
    publisher
        .publish(
            &topology.orders_exchange(),
            Lane::Standard.as_str(),
            b"stuck",
            BasicProperties::default().with_message_id("m-stuck".into()),
        )
        .await
        .unwrap();
    let spec = ConsumerSpec {
        queue: topology.work_queue(Lane::Standard),
        tag: "hangs".into(),
        service: "batch-test".into(),
        prefetch: 10,
        batch_size: 5,
        retry: retry(),
    };
    let channel = connection.create_channel().await.unwrap();
    let entered = Arc::new(tokio::sync::Notify::new());
    let handler = {
        let entered = entered.clone();
        consumer::Each(move |_delivery: Delivery| {
            let entered = entered.clone();
            async move {
                entered.notify_one();
                std::future::pending::<Disposition>().await
            }
        })
    };
    let consuming = {
        let (channel, topology) = (channel.clone(), topology.clone());
        tokio::spawn(async move {
            consumer::run(
                &channel,
                &topology,
                &publisher,
                spec,
                CancellationToken::new(),
                handler,
            )
            .await
        })
    };
    tokio::time::timeout(Duration::from_secs(60), entered.notified())
        .await
        .expect("the handler got the message");
    // An ack of a tag never delivered: the broker closes the channel
    // (PRECONDITION_FAILED), as it does when its node goes away.
    let _ = channel
        .basic_ack(999_999, lapin::options::BasicAckOptions::default())
        .await;
    let result = tokio::time::timeout(Duration::from_secs(120), consuming)
        .await
        .expect("the consumer returned although its batch never finished")
        .unwrap();
    assert!(result.is_err(), "a lost channel is reported: {result:?}");
    test_support::eventually(
        Duration::from_secs(30),
        "the message back in its queue",
        || async {
            (test_support::queue_depth(&connection, &topology.work_queue(Lane::Standard)).await
                == 1)
                .then_some(())
        },
    )
    .await;
}
