//! The faults. Each prints what it injected and the counts it checked.
//!
//! The cases that do not test RabbitMQ itself run twice: with the orders'
//! messages and the events on RabbitMQ (`chaos::cases::<case>`), and in
//! Postgres (`chaos::cases::postgres::<case>`: `WORK_QUEUE=postgres`,
//! `EVENT_BUS=postgres`), the same body with a [`Transport`] parameter.

use std::time::Duration;

use lapin::{BasicProperties, options::BasicPublishOptions};
use messaging::{Topology, amqp::Envelope};
use serde_json::json;
use uuid::Uuid;

use super::{Load, System, Transport, check_invariants};

const RATE: u64 = 25;

/// A test of each `case` on either transport: `$test` runs `$case` with
/// RabbitMQ, `postgres::$test` with Postgres.
macro_rules! on_both_transports {
    ($($test:ident => $case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                $case(Transport::Rabbitmq).await;
            }
        )*

        /// The cases with the orders' messages and the events in Postgres.
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$case(super::Transport::Postgres).await;
                }
            )*
        }
    };
}

on_both_transports! {
    kill_9_a_processor_mid_batch => kill_9_a_processor,
    postgres_down_for_ten_seconds => postgres_down,
    poison_messages_are_dead_lettered_and_a_fixed_one_replays_once => poison_and_replay,
    sigterm_everything_mid_load_and_start_again => sigterm_everything,
    a_payment_provider_failing_and_timing_out_moves_each_amount_once => payment_provider_failing,
    a_poison_and_a_flaky_order_in_one_batch_set_only_themselves_apart => poison_and_flaky_in_a_batch,
    fifty_concurrent_posts_with_one_key => fifty_posts_one_key,
}

async fn kill_9_a_processor(transport: Transport) {
    // One second of payment per order at 25 orders/s: each processor holds
    // about eight unacked messages (prefetch 10) at any moment; in Postgres,
    // as many claimed jobs, which come back once their 5 s lease runs out.
    let mut system = System::with(transport, &[("PAYMENT_LATENCY_MS", "1000")]).await;
    let load = Load::start(system.api_url(), system.client(), RATE);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let victim = system.processors.remove(0);
    println!(
        "kill -9 {} while it holds a batch (prefetch 10, 1 s per order)",
        victim.name
    );
    victim.kill();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let report = load.finish().await;
    check_invariants(&system, "kill -9 processor", &report.accepted, 0).await;
    let redelivered: usize = ["processor-2", "processor-3"]
        .iter()
        .map(|name| system.log(name).matches("redelivered=true").count())
        .sum();
    println!("messages redelivered to the surviving processors: {redelivered}");
    assert!(
        redelivered > 0,
        "the victim's unacked messages went to the others"
    );
    system.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_down_for_ten_seconds() {
    let mut system = System::start(&[]).await;
    let load = Load::start(system.api_url(), system.client(), RATE);
    tokio::time::sleep(Duration::from_secs(3)).await;
    println!("stopping RabbitMQ for 10 s while orders are posted");
    system.rabbit.stop().await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    system.rabbit.start_again().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let report = load.finish().await;
    println!(
        "POST answers: {:?}, replayed: {}, transport errors: {}",
        report.statuses, report.replays, report.transport_errors
    );
    assert_eq!(report.transport_errors, 0, "order-api kept answering");
    assert!(
        report.statuses.keys().all(|s| *s == 202),
        "every POST was accepted while RabbitMQ was down: {:?}",
        report.statuses
    );
    system.wait_ready().await;
    check_invariants(&system, "RabbitMQ down 10 s", &report.accepted, 0).await;
    system.stop_all().await;
}

async fn postgres_down(transport: Transport) {
    let mut system = System::with(transport, &[]).await;
    let load = Load::start(system.api_url(), system.client(), RATE);
    tokio::time::sleep(Duration::from_secs(3)).await;
    println!("stopping Postgres for 10 s while orders are posted");
    system.postgres.stop().await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    system.postgres.start_again().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let report = load.finish().await;
    println!(
        "POST answers: {:?}, replayed: {}, transport errors: {}, slowest 503: {:?}",
        report.statuses, report.replays, report.transport_errors, report.slowest_503
    );
    assert!(
        report.statuses.get(&503).copied().unwrap_or(0) > 0,
        "POSTs during the outage got 503"
    );
    assert!(!report.statuses.contains_key(&500), "no 500s");
    assert_eq!(
        report.transport_errors, 0,
        "no hangs or dropped connections"
    );
    assert!(
        report.slowest_503 < Duration::from_secs(8),
        "every 503 came while Postgres was still down, not held until it was back"
    );
    system.wait_ready().await;
    check_invariants(&system, "Postgres down 10 s", &report.accepted, 0).await;
    system.stop_all().await;
}

async fn poison_and_replay(transport: Transport) {
    let mut system = System::with(
        transport,
        &[("DEMO_FAILURES", "true"), ("RETRY_MAX_ATTEMPTS", "3")],
    )
    .await;
    let load = Load::start(system.api_url(), system.client(), RATE);
    let client = system.client();
    let carrier = place(&client, &system.api_url(), "c-poison", "WIDGET", 1).await;
    queue_poison(&system, carrier, "poison-json").await;
    println!("posting an order that fails every attempt (customer \"doomed\")");
    let doomed_id = place(&client, &system.api_url(), "doomed", "WIDGET", 1).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut report = load.finish().await;
    report.accepted.extend([carrier, doomed_id]);

    let letters = test_support_dead_letters(&system).await;
    println!("dead letters: {letters:?}");
    assert_eq!(letters.len(), 2);
    assert!(
        letters
            .iter()
            .any(|l| l.0.starts_with("not an OrderPlaced message"))
    );
    assert!(
        letters
            .iter()
            .any(|l| l.0.starts_with("gave up after 3 attempts"))
    );
    let held: serde_json::Value = client
        .get(format!("{}/{doomed_id}", system.api_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(held["status"], "held", "its client sees it held: {held}");
    assert!(
        held["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("gave up after 3 attempts")),
        "and why: {held}"
    );

    println!(
        "fixing the cause (the payment provider restarted without demo failures) and replaying the doomed order"
    );
    system.env.retain(|(k, _)| *k != "DEMO_FAILURES");
    system.restart_provider().await;
    // Its message is an outbox row, or with the work in Postgres a job.
    let message_id = sqlx::query_scalar!(
        r#"SELECT message_id AS "message_id!" FROM outbox WHERE order_id = $1
           UNION ALL SELECT message_id FROM jobs WHERE order_id = $1"#,
        doomed_id
    )
    .fetch_one(&system.pool)
    .await
    .unwrap();
    let replayed = dead_letters::replay(
        system.dead_letter_broker().as_ref(),
        &system.pool,
        &dead_letters::Selection::MessageId(message_id.to_string()),
    )
    .await
    .unwrap();
    assert_eq!(replayed.len(), 1);
    check_invariants(&system, "poison messages", &report.accepted, 1).await;
    let doomed_status: String =
        sqlx::query_scalar!("SELECT status FROM orders WHERE id = $1", doomed_id)
            .fetch_one(&system.pool)
            .await
            .unwrap();
    assert_eq!(
        doomed_status, "processed",
        "the replayed order was processed"
    );
    system.stop_all().await;
}

/// POST an order of `quantity` × `sku` for `customer`; its id.
async fn place(
    client: &reqwest::Client,
    url: &str,
    customer: &str,
    sku: &str,
    quantity: u32,
) -> Uuid {
    let order: serde_json::Value = client
        .post(url)
        .json(&json!({"customer_id": customer, "email": "m@example.com",
                      "items": [{"sku": sku, "quantity": quantity}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    order["id"].as_str().unwrap().parse().unwrap()
}

/// A message that is no order message, queued for the processors: invalid
/// JSON straight onto the standard work queue or, with the work in
/// Postgres, a job whose body is JSON (the column takes nothing else) but
/// no `OrderPlaced`, beside `order_id`'s own (a job names an existing
/// order). `label` is its message id on RabbitMQ, its correlation id as a
/// job (whose message id is a UUID).
async fn queue_poison(system: &System, order_id: Uuid, label: &str) {
    match system.transport {
        Transport::Rabbitmq => {
            println!("publishing invalid JSON straight onto the work queue");
            let amqp = system.amqp().await;
            let channel = amqp.create_channel().await.unwrap();
            publish_poison(&channel, &Topology::new(""), label).await;
        }
        Transport::Postgres => {
            println!("writing a job that is no order message straight into the jobs table");
            sqlx::query!(
                r#"INSERT INTO jobs (order_id, message_id, lane, body, correlation_id)
                   VALUES ($1, gen_random_uuid(), 'standard', '{"order_id": "oops"}', $2)"#,
                order_id,
                label,
            )
            .execute(&system.pool)
            .await
            .unwrap();
        }
    }
}

/// Invalid JSON, straight onto the standard work queue.
async fn publish_poison(channel: &lapin::Channel, topology: &Topology, message_id: &str) {
    channel
        .basic_publish(
            topology.orders_exchange().as_str().into(),
            "standard".into(),
            BasicPublishOptions::default(),
            b"{\"order_id\": oops",
            BasicProperties::default().with_message_id(message_id.into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

/// The dead letters (the queue's and the dead jobs), once there are two.
async fn test_support_dead_letters(system: &System) -> Vec<(String, u32)> {
    let broker = system.dead_letter_broker();
    test_support::eventually(Duration::from_secs(30), "two dead letters", || async {
        let letters = dead_letters::list(broker.as_ref(), &system.pool)
            .await
            .ok()?;
        (letters.len() >= 2).then(|| {
            letters
                .into_iter()
                .map(|l| (l.reason, l.attempts))
                .collect()
        })
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_message_delivered_twice_is_processed_once() {
    let mut system = System::start(&[]).await;
    let load = Load::start(system.api_url(), system.client(), RATE);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let report = load.finish().await;
    let topology = Topology::new("");
    let publisher = messaging::Publisher::new(system.broker());
    let sent: Vec<(Uuid, Uuid, serde_json::Value, String)> = sqlx::query!(
        "SELECT message_id, order_id, payload, routing_key FROM outbox WHERE exchange = $1 LIMIT 20",
        topology.orders_exchange(),
    )
    .fetch_all(&system.pool)
    .await
    .unwrap()
    .into_iter()
    .map(|r| (r.message_id, r.order_id, r.payload, r.routing_key))
    .collect();
    println!(
        "re-publishing {} already-published orders (a publisher retry after a lost confirm)",
        sent.len()
    );
    for (message_id, order_id, payload, routing_key) in &sent {
        let envelope = Envelope {
            message_id: *message_id,
            correlation_id: "duplicate".into(),
            order_id: *order_id,
        };
        publisher
            .publish(
                &topology.orders_exchange(),
                routing_key,
                &serde_json::to_vec(payload).unwrap(),
                envelope.properties(),
            )
            .await
            .unwrap();
    }
    assert!(!sent.is_empty());
    check_invariants(&system, "duplicate delivery", &report.accepted, 0).await;
    system.stop_all().await;
}

async fn sigterm_everything(transport: Transport) {
    let mut system = System::with(transport, &[("PAYMENT_LATENCY_MS", "50")]).await;
    let load = Load::start(system.api_url(), system.client(), RATE);
    tokio::time::sleep(Duration::from_secs(4)).await;
    println!("SIGTERM to every service mid-load");
    system.stop_all().await;
    let report = load.finish().await;
    println!("starting every service again");
    system.provider = Some(system.start_provider());
    system.api = Some(system.service("order-api", "order-api"));
    system.start_workers();
    system.wait_ready().await;
    check_invariants(&system, "SIGTERM all and restart", &report.accepted, 0).await;
    system.stop_all().await;
}

async fn payment_provider_failing(transport: Transport) {
    // Every provider call takes 300 ms, so the kill below falls between
    // money steps; a capture that outlives its message's three attempts is
    // left to the sweeper.
    let mut system = System::with(
        transport,
        &[
            ("DEMO_FAILURES", "true"),
            ("PAYMENT_LATENCY_MS", "300"),
            ("RETRY_MAX_ATTEMPTS", "3"),
            ("PAYMENT_SWEEP_INTERVAL_MS", "500"),
            ("PAYMENT_SETTLE_AFTER_SECS", "2"),
        ],
    )
    .await;
    let load = Load::start(system.api_url(), system.client(), RATE);
    let client = system.client();
    // (customer, item, quantity, final status): each step failing, or timing
    // out after the provider did it.
    let troubled = [
        ("timeout-authorise-1", "WIDGET", 1, "processed"),
        ("timeout-capture-1", "GADGET", 1, "processed"),
        ("timeout-void-1", "LIMITED-EDITION", 6, "rejected"),
        ("flaky-void-2", "LIMITED-EDITION", 6, "rejected"),
        ("flaky-capture-8", "GIZMO", 1, "processed"),
    ];
    let mut ids = Vec::new();
    for (customer, sku, quantity, _) in troubled {
        ids.push(place(&client, &system.api_url(), customer, sku, quantity).await);
    }
    println!("posted orders whose provider calls fail, or time out after doing the work");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let victim = system.processors.remove(0);
    println!(
        "kill -9 {} mid-payment (300 ms per provider call)",
        victim.name
    );
    victim.kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut report = load.finish().await;
    report.accepted.extend(ids.iter().copied());
    // The capture failing eight times: its message is dead-lettered after
    // three, and the sweeper captures it.
    check_invariants(&system, "payment provider faults", &report.accepted, 1).await;
    for (id, (customer, _, _, expected)) in ids.iter().zip(troubled) {
        let status: String = sqlx::query_scalar!("SELECT status FROM orders WHERE id = $1", id)
            .fetch_one(&system.pool)
            .await
            .unwrap();
        assert_eq!(status, expected, "{customer}");
    }
    let swept: usize = ["processor-2", "processor-3"]
        .iter()
        .map(|name| system.log(name).matches("sweeper=true").count())
        .sum();
    println!("log lines of the sweeper finishing payments: {swept}");
    assert!(swept > 0, "the sweeper finished the dead-lettered capture");
    system.stop_all().await;
}

async fn poison_and_flaky_in_a_batch(transport: Transport) {
    let mut system = System::with(
        transport,
        &[
            ("DEMO_FAILURES", "true"),
            ("RETRY_MAX_ATTEMPTS", "3"),
            ("PREFETCH", "40"),
            ("BATCH_SIZE", "20"),
        ],
    )
    .await;
    for processor in system.processors.drain(..) {
        assert!(crate::processes::stop(processor).await.success());
    }
    println!(
        "processors stopped; queueing 30 orders, one flaky, and a poison message between them"
    );
    let client = system.client();
    let mut accepted = std::collections::HashSet::new();
    let mut last = None;
    for i in 0..30 {
        if let (10, Some(before)) = (i, last) {
            queue_poison(&system, before, "poison-in-a-batch").await;
        }
        let customer = if i == 20 {
            "flaky-authorise-1".to_owned()
        } else {
            format!("c-{i}")
        };
        let id = place(&client, &system.api_url(), &customer, "WIDGET", 1).await;
        accepted.insert(id);
        last = Some(id);
    }
    println!("one processor starts on the waiting messages (batches of up to 20)");
    system.processors = vec![system.service("order-processor", "processor-1")];
    system.wait_ready().await;
    check_invariants(&system, "poison and flaky in a batch", &accepted, 1).await;
    let letters = test_support::eventually(Duration::from_secs(30), "the dead letter", || async {
        dead_letters::list(system.dead_letter_broker().as_ref(), &system.pool)
            .await
            .ok()
            .filter(|l| !l.is_empty())
    })
    .await;
    assert_eq!(
        letters.len(),
        1,
        "only the poison is dead-lettered: {letters:?}"
    );
    assert!(letters[0].reason.starts_with("not an OrderPlaced message"));
    let retried = match transport {
        Transport::Rabbitmq => "retrying in",
        Transport::Postgres => "the job is retried in",
    };
    let retries = system.log("processor-1").matches(retried).count();
    println!("dead letters: 1 (the poison); retries: {retries} (the flaky order)");
    assert_eq!(retries, 1, "only the flaky order was retried, once");
    system.stop_all().await;
}

async fn fifty_posts_one_key(transport: Transport) {
    let mut system = System::with(transport, &[]).await;
    let client = system.client();
    let url = system.api_url();
    let body = json!({"customer_id": "c-key", "email": "m@example.com",
                      "items": [{"sku": "WIDGET", "quantity": 1}]});
    println!(
        "50 concurrent POSTs with the same Idempotency-Key amid 200 without, all at once, so \
         order-api's group commit batches them"
    );
    let post = |key: Option<&'static str>, body: serde_json::Value| {
        let mut request = client.post(&url).json(&body);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        tokio::spawn(async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let replayed = response.headers().contains_key("idempotent-replayed");
            (
                key.is_some(),
                status,
                replayed,
                response.bytes().await.unwrap(),
            )
        })
    };
    let mut sent = Vec::new();
    for i in 0..250 {
        sent.push(if i % 5 == 2 {
            post(Some("one-key-in-a-flood"), body.clone())
        } else {
            post(
                None,
                json!({"customer_id": format!("c-{i}"), "email": "m@example.com",
                              "items": [{"sku": "GADGET", "quantity": 1}]}),
            )
        });
    }
    let mut answers = Vec::new();
    for request in sent {
        answers.push(request.await.unwrap());
    }
    let first: Vec<_> = answers
        .iter()
        .filter(|(keyed, status, replayed, _)| *keyed && *status == 202 && !replayed)
        .collect();
    assert_eq!(first.len(), 1, "one order for the key");
    let (mut replays, mut in_flight) = (0, 0);
    for (keyed, status, replayed, body) in &answers {
        match (keyed, status, replayed) {
            (true, 202, false) | (false, 202, false) => {}
            (true, 202, true) => {
                assert_eq!(body, &first[0].3, "a replay is byte for byte");
                replays += 1;
            }
            (true, 409, _) => in_flight += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    let accepted: std::collections::HashSet<Uuid> = answers
        .iter()
        .filter(|(_, status, replayed, _)| *status == 202 && !replayed)
        .map(|(.., body)| {
            let order: serde_json::Value = serde_json::from_slice(body).unwrap();
            order["id"].as_str().unwrap().parse().unwrap()
        })
        .collect();
    assert_eq!(
        accepted.len(),
        201,
        "200 orders without a key and one with it"
    );
    // Its message: an outbox row, or a job written with the order (and
    // deleted once handled, so the order is counted).
    let published: i64 = match transport {
        Transport::Rabbitmq => sqlx::query_scalar!(
            r#"SELECT count(*) AS "n!" FROM outbox
             WHERE exchange = 'orders' AND payload->>'customer_id' = 'c-key'"#,
        )
        .fetch_one(&system.pool)
        .await
        .unwrap(),
        Transport::Postgres => sqlx::query_scalar!(
            r#"SELECT count(*) AS "n!" FROM orders WHERE customer_id = 'c-key'"#,
        )
        .fetch_one(&system.pool)
        .await
        .unwrap(),
    };
    assert_eq!(published, 1, "one message for the key");
    let largest: i64 = sqlx::query_scalar!(
        r#"SELECT max(n) AS "n!" FROM (SELECT count(*) AS n FROM orders GROUP BY created_at) b"#,
    )
    .fetch_one(&system.pool)
    .await
    .unwrap();
    println!(
        "the key: 1 order, {replays} replays, {in_flight} × 409; largest batch order-api stored in one transaction: {largest}"
    );
    check_invariants(&system, "50 POSTs one key", &accepted, 0).await;
    system.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_the_payment_provider_under_load_and_start_it_again() {
    // 100 ms per provider call: calls are in flight when it dies, some
    // done and unanswered, some not begun.
    let mut system = System::start(&[("PAYMENT_LATENCY_MS", "100")]).await;
    let load = Load::start(system.api_url(), system.client(), RATE);
    tokio::time::sleep(Duration::from_secs(4)).await;
    println!("kill -9 the payment provider mid-load; 5 s later it starts again");
    system.provider.take().expect("the provider runs").kill();
    tokio::time::sleep(Duration::from_secs(5)).await;
    system.provider = Some(system.start_provider());
    system.wait_ready().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let report = load.finish().await;
    check_invariants(&system, "kill -9 payment provider", &report.accepted, 0).await;
    let unanswered: usize = (1..=3)
        .map(|i| {
            system
                .log(&format!("processor-{i}"))
                .matches("payment provider")
                .count()
        })
        .sum();
    println!("processor log lines about the provider failing: {unanswered}");
    assert!(unanswered > 0, "the processors saw the provider gone");
    system.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_provider_slower_than_the_processors_wait_for_20_s() {
    // The processors wait 1 s for an answer; for 20 s the provider takes 3.
    let mut system =
        System::start(&[("DEMO_FAILURES", "true"), ("PAYMENT_TIMEOUT_MS", "1000")]).await;
    let load = Load::start(system.api_url(), system.client(), RATE);
    tokio::time::sleep(Duration::from_secs(3)).await;
    println!("the payment provider answers in 3 s for 20 s; the processors wait 1 s");
    system.provider_latency(3000).await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    system.provider_latency(20).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let report = load.finish().await;
    check_invariants(&system, "slow payment provider", &report.accepted, 0).await;
    let timed_out: usize = (1..=3)
        .map(|i| {
            system
                .log(&format!("processor-{i}"))
                .matches("did not answer")
                .count()
        })
        .sum();
    println!("processor log lines of provider calls given up: {timed_out}");
    assert!(timed_out > 0, "calls outlived the processors' wait");
    system.stop_all().await;
}
