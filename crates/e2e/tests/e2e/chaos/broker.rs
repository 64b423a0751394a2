//! The broker misbehaving without going down: it blocks publishers (a
//! memory alarm), or it forgets what it held (a purge, a restart without its
//! data). Postgres holds every accepted order, so none may be lost.

use std::time::{Duration, Instant};

use messaging::{Topology, contracts::Lane};

use super::{Load, System, check_invariants};

const RATE: u64 = 25;

/// Checks for orders the broker forgot every 1.5 s in these cases.
const REPUBLISH_AFTER: (&str, &str) = ("ORDER_REPUBLISH_AFTER_SECS", "3");

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_alarm_blocks_publishers_and_orders_are_still_accepted_at_once() {
    let mut system = System::start(&[]).await;
    let load = Load::start(system.api_url(), system.client(), RATE);
    tokio::time::sleep(Duration::from_secs(3)).await;
    println!("memory alarm on (vm_memory_high_watermark 0) for 8 s while orders are posted");
    system
        .rabbit
        .rabbitmqctl(&["set_vm_memory_high_watermark", "0"])
        .await;
    test_support::eventually(
        Duration::from_secs(30),
        "order-api to see the broker block publishers",
        || async {
            system
                .log("order-api")
                .contains("the broker is blocking publishers")
                .then_some(())
        },
    )
    .await;
    let blocked_from = Instant::now();
    let readiness = poll_readiness(system.api.as_ref().unwrap().url("/readyz"));
    tokio::time::sleep(Duration::from_secs(8)).await;
    let blocked_until = Instant::now();
    let not_ready = readiness.finish().await;
    system
        .rabbit
        .rabbitmqctl(&["set_vm_memory_high_watermark", "0.4"])
        .await;
    println!("memory alarm off");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let report = load.finish().await;

    let mut during: Vec<Duration> = report
        .accepted_latencies
        .iter()
        .filter(|(sent, _)| (blocked_from..blocked_until).contains(sent))
        .map(|(_, took)| *took)
        .collect();
    during.sort();
    assert!(!during.is_empty(), "orders were accepted during the alarm");
    println!(
        "POST /orders latency while publishers were blocked ({} accepted): p50={:?} p90={:?} p99={:?} max={:?}",
        during.len(),
        percentile(&during, 0.5),
        percentile(&during, 0.9),
        percentile(&during, 0.99),
        during[during.len() - 1],
    );
    println!(
        "POST answers: {:?}, transport errors: {}; /readyz not ready {} of {} times during the alarm",
        report.statuses, report.transport_errors, not_ready.0, not_ready.1
    );
    assert_eq!(report.transport_errors, 0, "order-api kept answering");
    assert!(
        report.statuses.keys().all(|s| *s == 202),
        "every POST was accepted while publishers were blocked: {:?}",
        report.statuses
    );
    assert!(not_ready.1 > 0, "/readyz was polled during the alarm");
    assert_eq!(not_ready.0, 0, "/readyz stayed ready during the alarm");
    let skipped = system
        .log("order-api")
        .matches("publish failed; the outbox relay will retry")
        .count();
    println!("POSTs that left their publish to the outbox relay: {skipped}");
    assert!(skipped > 0, "requests did not wait for a blocked broker");
    check_invariants(&system, "memory alarm", &report.accepted, 0).await;
    system.stop_all().await;
}

/// Polls a `/readyz` every 200 ms until finished: (not ready, polls).
struct ReadinessPoll {
    stop: tokio_util::sync::CancellationToken,
    handle: tokio::task::JoinHandle<(usize, usize)>,
}

fn poll_readiness(url: String) -> ReadinessPoll {
    let stop = tokio_util::sync::CancellationToken::new();
    let token = stop.clone();
    let handle = tokio::spawn(async move {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let (mut not_ready, mut polls) = (0, 0);
        while !token.is_cancelled() {
            polls += 1;
            let ready = client
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if !ready {
                not_ready += 1;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        (not_ready, polls)
    });
    ReadinessPoll { stop, handle }
}

impl ReadinessPoll {
    async fn finish(self) -> (usize, usize) {
        self.stop.cancel();
        self.handle.await.expect("the readiness poll")
    }
}

/// Orders order-api published again, as its log says.
fn republished(system: &System) -> usize {
    system
        .log("order-api")
        .matches("published again (same message id)")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purging_the_work_queues_under_load_loses_no_order() {
    // Six orders a second on the standard lane (three processors, prefetch
    // 2, one second of payment each) for about 21 posted: a backlog grows.
    // The purge comes after 3 s (about 55 orders waiting) and the load ends
    // 3 s later, so the backlog drains well within the settle limit even on
    // a busy machine.
    let mut system = System::start(&[
        ("PAYMENT_LATENCY_MS", "1000"),
        ("PREFETCH", "2"),
        REPUBLISH_AFTER,
    ])
    .await;
    let load = Load::start(system.api_url(), system.client(), RATE);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let topology = Topology::new("");
    for lane in [Lane::Standard, Lane::Express] {
        let queue = topology.work_queue(lane);
        let out = system.rabbit.rabbitmqctl(&["purge_queue", &queue]).await;
        println!("rabbitmqctl purge_queue {queue}: {}", out.trim());
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let report = load.finish().await;
    check_invariants(&system, "work queues purged", &report.accepted, 0).await;
    let again = republished(&system);
    println!("orders published again from Postgres: {again}");
    assert!(again > 0, "the purged orders were published again");
    system.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restarted_without_its_data_loses_no_order() {
    let mut system = System::start(&[REPUBLISH_AFTER]).await;
    println!("processors stopped; orders accepted meanwhile wait in the work queues");
    for processor in system.processors.drain(..) {
        assert!(crate::processes::stop(processor).await.success());
    }
    let load = Load::start(system.api_url(), system.client(), RATE);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let report = load.finish().await;
    let amqp = system.amqp().await;
    let topology = Topology::new("");
    let mut queued = 0;
    for lane in [Lane::Standard, Lane::Express] {
        queued += test_support::queue_depth(&amqp, &topology.work_queue(lane)).await;
    }
    drop(amqp);
    println!(
        "{} orders accepted, {queued} in the work queues; stopping RabbitMQ, wiping its data, starting it blank",
        report.accepted.len()
    );
    system.rabbit.stop().await;
    system.rabbit.wipe_data().await;
    system.rabbit.start_again().await;
    system.processors = (1..=3)
        .map(|i| system.service("order-processor", &format!("processor-{i}")))
        .collect();
    system.wait_ready().await;
    check_invariants(&system, "broker restarted blank", &report.accepted, 0).await;
    let again = republished(&system);
    println!("orders published again from Postgres: {again}");
    assert!(
        again >= queued as usize,
        "every order the broker forgot was published again"
    );
    system.stop_all().await;
}
