//! A broker named by several URLs, as a cluster's nodes are: the first node
//! that answers is used, and a lost connection moves on to the next node.
//! The "nodes" here are the test broker under distinct URLs and closed
//! ports on 127.0.0.1, which refuse at once.

use messaging::{AmqpSettings, Broker};
use test_support::{QUEUE_EXPIRES_MS, TopologyGuard};

/// A URL on 127.0.0.1 where nothing listens.
fn refusing(password: &str) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("amqp://orderflow:{password}@127.0.0.1:{port}/%2f")
}

/// The test broker under a URL of its own (a different heartbeat).
fn live(heartbeat: u16) -> String {
    let url = test_support::amqp_url();
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}heartbeat={heartbeat}")
}

fn broker(urls: &[String]) -> (Broker, TopologyGuard) {
    let settings = AmqpSettings {
        amqp_url: urls.join(","),
        topology_prefix: test_support::unique_prefix(),
        topology_queue_expires_ms: Some(QUEUE_EXPIRES_MS),
        rabbitmq_management_url: Some(test_support::management_url()),
    };
    let broker = settings.broker().unwrap();
    let guard = TopologyGuard(broker.topology().clone());
    (broker, guard)
}

#[tokio::test]
async fn the_first_node_that_answers_is_used_and_the_topology_declared_on_it() {
    let (broker, _guard) = broker(&[refusing("s3cret"), live(30)]);
    broker.connect_once().await.unwrap();
    assert_eq!(broker.connected_to(), messaging::amqp::redact(&live(30)));
    let queue = broker
        .topology()
        .work_queue(messaging::contracts::Lane::Standard);
    assert_eq!(
        test_support::queue_depth(&test_support::amqp().await, &queue).await,
        0
    );
}

#[tokio::test]
async fn a_lost_connection_moves_on_to_the_next_node_that_answers() {
    let (broker, _guard) = broker(&[live(30), refusing("s3cret"), live(31)]);
    let first = broker.connect_once().await.unwrap();
    assert_eq!(broker.connected_to(), messaging::amqp::redact(&live(30)));
    assert!(
        std::sync::Arc::ptr_eq(&first, &broker.connect_once().await.unwrap()),
        "a live connection is kept"
    );

    first.close(320, "the node went away".into()).await.unwrap();
    broker.connect_once().await.unwrap();
    assert_eq!(
        broker.connected_to(),
        messaging::amqp::redact(&live(31)),
        "past the refusing node to the third"
    );

    broker
        .connect_once()
        .await
        .unwrap()
        .close(320, "again".into())
        .await
        .unwrap();
    broker.connect_once().await.unwrap();
    assert_eq!(
        broker.connected_to(),
        messaging::amqp::redact(&live(30)),
        "round to the first"
    );
    broker.close().await;
}

#[tokio::test]
async fn a_lost_connection_is_replaced_at_once_not_when_next_needed() {
    let (broker, _guard) = broker(&[live(30), live(31)]);
    let first = broker.connect_once().await.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let keeper = tokio::spawn({
        let (broker, stop) = (broker.clone(), stop.clone());
        async move { broker.keep_connected(&stop).await }
    });
    first.close(320, "the node went away".into()).await.unwrap();
    // Nothing asks for a connection here: the keeper makes one by itself.
    test_support::eventually(
        std::time::Duration::from_secs(30),
        "a connection to the next node",
        || async {
            (broker.is_connected() && broker.connected_to() == messaging::amqp::redact(&live(31)))
                .then_some(())
        },
    )
    .await;
    stop.cancel();
    keeper.await.unwrap();
    broker.close().await;
}

#[tokio::test]
async fn no_node_answering_names_each_without_its_password() {
    let (broker, _guard) = broker(&[refusing("s3cret"), refusing("s3cret")]);
    let error = format!("{:#}", broker.connect_once().await.err().unwrap());
    assert!(error.starts_with("no RabbitMQ node answered"), "{error}");
    assert_eq!(
        error.matches("orderflow:***@127.0.0.1:").count(),
        2,
        "{error}"
    );
    assert!(!error.contains("s3cret"), "{error}");
}
