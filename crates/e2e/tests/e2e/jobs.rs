//! The work queue on Postgres (`WORK_QUEUE=postgres`) with the real
//! binaries and a 2 s lease: a processor frozen (SIGSTOP) or killed
//! (SIGKILL) while it holds a batch loses its jobs to another processor once
//! its lease has run out, and what the frozen one does when it wakes up
//! changes nothing; a poison job and an order that fails every attempt end
//! dead with their reasons, listed and replayed by the dead-letters tool; a
//! payment that fails twice is retried and succeeds. Each case ends with
//! every order final exactly once, its message processed once, and the
//! money moved once.

use std::{path::PathBuf, process::Command, time::Duration};

use serde_json::json;
use sqlx::PgPool;
use test_support::TopologyGuard;
use tokio::time::Instant;
use uuid::Uuid;

use crate::processes::{self, Service};

/// How long a claim is its processor's without a heartbeat.
const LEASE_MS: &str = "2000";

/// The longest any case waits for the system to get somewhere.
const PATIENCE: Duration = Duration::from_secs(60);

/// order-api, the payment provider and the processors started so far, on a
/// fresh database and topology, with the work queue on Postgres.
struct System {
    api: Service,
    /// The payment provider (taken out while it restarts).
    provider: Option<Service>,
    processors: Vec<Service>,
    pool: PgPool,
    books: PgPool,
    books_url: String,
    env: Vec<(&'static str, String)>,
    log_dir: PathBuf,
    client: reqwest::Client,
    topology: TopologyGuard,
}

impl System {
    /// order-api and the provider, ready, with `extra` settings over the
    /// defaults; no processor yet.
    async fn start(extra: &[(&'static str, &str)]) -> Self {
        let (database_url, pool) = test_support::fresh_database().await;
        let prefix = test_support::unique_prefix();
        let topology = TopologyGuard(messaging::Topology::new(prefix.clone()));
        let log_dir = std::env::temp_dir().join(format!("orderflow-jobs-{prefix}"));
        std::fs::create_dir_all(&log_dir).unwrap();
        let mut env = processes::shared_env(&database_url, prefix);
        env.extend([
            ("DB_MAX_CONNECTIONS", "3".into()),
            ("WORK_QUEUE", "postgres".into()),
            ("JOB_LEASE_MS", LEASE_MS.into()),
            // Two batches of four jobs in hand per processor.
            ("PREFETCH", "8".into()),
            ("BATCH_SIZE", "4".into()),
            ("RATE_LIMIT_PER_SECOND", "100000".into()),
            ("RATE_LIMIT_BURST", "100000".into()),
            ("RUST_LOG", "info".into()),
        ]);
        env.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
        let books_url = test_support::empty_database().await;
        let provider =
            processes::start_provider(processes::free_port(), &env, &books_url, &log_dir);
        env.push(("PAYMENT_PROVIDER_URL", provider.url("")));
        let api = processes::start("order-api", "order-api", &env, &log_dir);
        processes::wait_ready([&api, &provider]).await;
        let key = processes::api_key(&database_url, "jobs-shop", "client");
        Self {
            api,
            provider: Some(provider),
            processors: Vec::new(),
            pool,
            books: PgPool::connect_lazy(&books_url).expect("a database URL"),
            books_url,
            env,
            log_dir,
            client: processes::keyed_client(&key, Duration::from_secs(30)),
            topology,
        }
    }

    /// Start a processor named `name` and wait until it is ready.
    /// The value of `name` every service was started with.
    fn setting(&self, name: &str) -> String {
        self.env
            .iter()
            .rev()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("no {name} setting"))
    }

    async fn start_processor(&mut self, name: &str) {
        let mut env = self.env.clone();
        env.push(("INSTANCE_ID", name.to_owned()));
        // Room for its two batches, its listener, relay and sweeper.
        env.push(("DB_MAX_CONNECTIONS", "6".into()));
        let processor = processes::start("order-processor", name, &env, &self.log_dir);
        processes::wait_ready([&processor]).await;
        self.processors.push(processor);
    }

    /// Take the processor named `name` out of the system.
    fn take_processor(&mut self, name: &str) -> Service {
        let at = self
            .processors
            .iter()
            .position(|p| p.name == name)
            .unwrap_or_else(|| panic!("no processor {name}"));
        self.processors.remove(at)
    }

    fn processor(&self, name: &str) -> &Service {
        self.processors
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no processor {name}"))
    }

    /// What the service `name` has logged so far.
    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.log_dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// POST an order of one widget for `customer`: its id.
    async fn place(&self, customer: &str, express: bool) -> Uuid {
        let response = self
            .client
            .post(self.api.url("/orders"))
            .json(
                &json!({"customer_id": customer, "email": "m@example.com", "express": express,
                          "items": [{"sku": "WIDGET", "quantity": 1}]}),
            )
            .send()
            .await
            .expect("POST /orders");
        assert_eq!(response.status().as_u16(), 202, "{customer}'s order");
        let order: serde_json::Value = response.json().await.unwrap();
        order["id"].as_str().unwrap().parse().unwrap()
    }

    /// Post `n` orders at once: their ids.
    async fn place_many(&self, n: usize) -> Vec<Uuid> {
        let posts = (0..n).map(|i| self.place_owned(format!("c-{i}"), i % 4 == 0));
        futures_util::future::join_all(posts).await
    }

    async fn place_owned(&self, customer: String, express: bool) -> Uuid {
        self.place(&customer, express).await
    }

    /// Wait until `done` says the system got where it should, or panic
    /// with `what` and what was left in the `jobs` table and the orders.
    async fn wait_for<F, Fut>(&self, what: &str, mut done: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let deadline = Instant::now() + PATIENCE;
        while !done().await {
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {PATIENCE:?} waiting for {what}; what was left:\n{}\
                     service logs in {}",
                    self.left().await,
                    self.log_dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Wait until every order is final and no job is left but `dead` ones.
    async fn settle(&self, dead: i64) {
        self.wait_for("every order final and only the dead jobs left", || async {
            let not_final = test_support::count!(
                &self.pool,
                r#"SELECT count(*) AS "n!" FROM orders WHERE status NOT IN ('processed', 'rejected')"#
            );
            let jobs = test_support::count!(&self.pool, r#"SELECT count(*) AS "n!" FROM jobs"#);
            let dead_jobs = test_support::count!(
                &self.pool,
                r#"SELECT count(*) AS "n!" FROM jobs WHERE state = 'dead'"#
            );
            not_final == 0 && jobs == dead && dead_jobs == dead
        })
        .await;
    }

    /// Every job row, and every order not final, as text.
    async fn left(&self) -> String {
        let jobs = sqlx::query_scalar!(
            r#"SELECT row_to_json(j)::text AS "row!" FROM (
                 SELECT id, order_id, lane, state, run_at, attempts, claims, leased_by, reason,
                        now() AS now
                 FROM jobs ORDER BY id) j"#
        )
        .fetch_all(&self.pool)
        .await
        .unwrap_or_else(|error| vec![format!("could not read them: {error}")]);
        let orders = sqlx::query_scalar!(
            r#"SELECT json_build_object(
                 'id', o.id, 'status', o.status, 'reason', o.reason, 'processed_by', o.processed_by,
                 'history', (SELECT json_agg(json_build_object('status', h.status,
                                 'service', h.service, 'detail', h.detail) ORDER BY h.id)
                             FROM order_status_history h WHERE h.order_id = o.id),
                 'payment', (SELECT p.state FROM payments p WHERE p.order_id = o.id))::text AS "row!"
               FROM orders o WHERE o.status NOT IN ('processed', 'rejected')
                  OR (SELECT count(*) FROM order_status_history h WHERE h.order_id = o.id
                      AND h.status IN ('processed', 'rejected')) <> 1
               ORDER BY o.created_at LIMIT 30"#
        )
        .fetch_all(&self.pool)
        .await
        .unwrap_or_else(|error| vec![format!("could not read them: {error}")]);
        format!(
            "jobs rows ({}):\n  {}\norders not final, or final more than once ({} shown):\n  {}\n",
            jobs.len(),
            jobs.join("\n  "),
            orders.len(),
            orders.join("\n  "),
        )
    }

    /// The jobs `processor` holds whose orders are not final: (job, order).
    async fn held_unfinished(&self, processor: &str) -> Vec<(i64, Uuid)> {
        sqlx::query!(
            r#"SELECT j.id, j.order_id FROM jobs j JOIN orders o ON o.id = j.order_id
               WHERE j.state = 'running' AND j.leased_by = $1 AND o.status = 'accepted'
               ORDER BY j.id"#,
            processor
        )
        .fetch_all(&self.pool)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.id, r.order_id))
        .collect()
    }

    /// Wait until `processor` holds jobs of orders not final yet (its
    /// payments are slow: it holds them a while).
    async fn wait_until_holding(&self, processor: &str) {
        self.wait_for(&format!("{processor} to hold jobs"), || async {
            !self.held_unfinished(processor).await.is_empty()
        })
        .await;
    }

    /// What the processors wrote of every order: its row, status history,
    /// payment and processed message; one line per order.
    async fn written(&self) -> Vec<String> {
        sqlx::query_scalar!(
            r#"SELECT json_build_object(
                 'order', row_to_json(o),
                 'history', (SELECT json_agg(row_to_json(h) ORDER BY h.id)
                             FROM order_status_history h WHERE h.order_id = o.id),
                 'payment', (SELECT row_to_json(p) FROM payments p WHERE p.order_id = o.id)
               )::text AS "row!"
               FROM orders o ORDER BY o.id"#
        )
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    /// Sessions on the orders' database in the middle of a transaction.
    async fn in_transaction(&self) -> i64 {
        test_support::count!(
            &self.pool,
            r#"SELECT count(*) AS "n!" FROM pg_stat_activity
               WHERE datname = current_database() AND state LIKE 'idle in transaction%'"#
        )
    }

    /// Every order final exactly once, each message processed once, the
    /// money moved once, no job left but `dead` dead ones; prints the counts.
    async fn check_once(&self, case: &str, dead: i64) {
        // Anything late would have arrived by now.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let orders = test_support::count!(&self.pool, r#"SELECT count(*) AS "n!" FROM orders"#);
        let wrong = self.left().await;
        let finals = test_support::count!(
            &self.pool,
            r#"SELECT count(*) AS "n!" FROM orders o
               WHERE o.status IN ('processed', 'rejected')
                 AND (SELECT count(*) FROM order_status_history h WHERE h.order_id = o.id
                      AND h.status IN ('processed', 'rejected')) = 1"#
        );
        assert_eq!(
            finals, orders,
            "{case}: every order final, with exactly one final status line; {wrong}"
        );
        let processed = test_support::count!(
            &self.pool,
            r#"SELECT count(*) AS "n!" FROM processed_messages WHERE consumer = 'order-processor'"#
        );
        assert_eq!(
            processed, orders,
            "{case}: each order's message processed once"
        );
        let jobs = test_support::count!(&self.pool, r#"SELECT count(*) AS "n!" FROM jobs"#);
        let dead_jobs = test_support::count!(
            &self.pool,
            r#"SELECT count(*) AS "n!" FROM jobs WHERE state = 'dead'"#
        );
        assert_eq!(
            (jobs, dead_jobs),
            (dead, dead),
            "{case}: no job left but the dead; {wrong}"
        );
        let money = crate::chaos::check_money(&self.pool, &self.books, case).await;
        let per_processor: Vec<(String, i64)> = sqlx::query!(
            r#"SELECT coalesce(processed_by, '-') AS "processed_by!", count(*) AS "orders!"
               FROM orders GROUP BY 1 ORDER BY 1"#
        )
        .fetch_all(&self.pool)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.processed_by, r.orders))
        .collect();
        println!(
            "{case}: orders={orders} final_once={finals} processed_messages={processed} \
             jobs_left={jobs} (dead {dead_jobs}) per processor {per_processor:?}; {money}"
        );
    }

    /// SIGTERM every service; each exits 0.
    async fn stop_all(mut self) {
        let services: Vec<Service> = self
            .processors
            .drain(..)
            .chain(std::iter::once(self.api))
            .chain(self.provider)
            .collect();
        for service in services {
            let name = service.name.clone();
            let status = processes::stop(service).await;
            assert!(status.success(), "{name} exited with {status} on SIGTERM");
        }
        let _ = std::fs::remove_dir_all(&self.log_dir);
    }
}

/// Send `signal` (`STOP`, `CONT`) to `service`.
fn signal(service: &Service, signal: &str) {
    let sent = Command::new("kill")
        .args([format!("-{signal}"), service.pid().to_string()])
        .status()
        .expect("running kill");
    assert!(sent.success(), "kill -{signal} {}", service.name);
}

/// The orders of `held` each finished by `processor`.
async fn finished_by(system: &System, held: &[(i64, Uuid)], processor: &str) {
    let ids: Vec<Uuid> = held.iter().map(|(_, order)| *order).collect();
    let other: Vec<(Uuid, Option<String>)> = sqlx::query!(
        "SELECT id, processed_by FROM orders WHERE id = ANY($1) AND processed_by IS DISTINCT FROM $2",
        &ids,
        processor
    )
    .fetch_all(&system.pool)
    .await
    .unwrap()
    .into_iter()
    .map(|r| (r.id, r.processed_by))
    .collect();
    assert!(
        other.is_empty(),
        "the held orders were finished by {processor}; these were not: {other:?}"
    );
}

/// Slow payments (1 s a provider call, two calls an order), so that a
/// processor holds its batches for seconds.
const SLOW_PAYMENTS: [(&str, &str); 2] = [
    ("PAYMENT_LATENCY_MS", "1000"),
    ("PAYMENT_TIMEOUT_MS", "10000"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processor_frozen_past_its_lease_loses_its_jobs_and_its_late_commit_changes_nothing() {
    let mut system = System::start(&SLOW_PAYMENTS).await;
    // Queued first, so that the processor takes full batches.
    system.place_many(16).await;
    system.start_processor("processor-1").await;
    system.wait_until_holding("processor-1").await;

    // Freeze it between transactions: frozen inside one, it would hold its
    // row locks and keep the other processor waiting until it is thawed.
    let frozen = system.processor("processor-1");
    let mut held = Vec::new();
    for _ in 0..20 {
        signal(frozen, "STOP");
        // Let statements it had sent finish.
        tokio::time::sleep(Duration::from_millis(200)).await;
        held = system.held_unfinished("processor-1").await;
        if system.in_transaction().await == 0 && !held.is_empty() {
            break;
        }
        signal(frozen, "CONT");
        held.clear();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !held.is_empty(),
        "processor-1 frozen holding unfinished jobs, outside a transaction; {}",
        system.left().await
    );
    println!(
        "SIGSTOP processor-1 holding {} jobs of unfinished orders (lease {LEASE_MS} ms, 1 s per \
         provider call); processor-2 starts",
        held.len()
    );

    system.start_processor("processor-2").await;
    system.settle(0).await;
    finished_by(&system, &held, "processor-2").await;

    println!("every order final; SIGCONT processor-1");
    let before_thaw = system.written().await;
    let processed_before = test_support::count!(
        &system.pool,
        r#"SELECT count(*) AS "n!" FROM processed_messages"#
    );
    signal(system.processor("processor-1"), "CONT");
    // Each job it held comes to be settled, and finds its lease lost.
    system
        .wait_for("processor-1 to find each of its leases lost", || async {
            system.log("processor-1").matches("lease was lost").count() >= held.len()
        })
        .await;
    let log = system.log("processor-1");
    let lost: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("lease was lost"))
        .collect();
    println!(
        "processor-1 thawed; its lines about leases lost ({}):\n{}",
        lost.len(),
        lost.join("\n")
    );
    let thawed = system.take_processor("processor-1");
    assert!(
        processes::stop(thawed).await.success(),
        "the thawed processor stops cleanly"
    );
    let after_thaw = system.written().await;
    let changed: Vec<(&String, &String)> = before_thaw
        .iter()
        .zip(&after_thaw)
        .filter(|(before, after)| before != after)
        .collect();
    assert!(
        changed.is_empty() && before_thaw.len() == after_thaw.len(),
        "the thawed processor changed no order, history line or payment; these changed \
         (before, after): {changed:#?}"
    );
    assert_eq!(
        test_support::count!(
            &system.pool,
            r#"SELECT count(*) AS "n!" FROM processed_messages"#
        ),
        processed_before,
        "the thawed processor recorded no message as processed"
    );
    system.check_once("frozen processor", 0).await;
    system.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processor_killed_holding_a_batch_loses_its_jobs_to_another_once_its_lease_ran_out() {
    let mut system = System::start(&SLOW_PAYMENTS).await;
    system.place_many(16).await;
    system.start_processor("processor-1").await;
    system.wait_until_holding("processor-1").await;

    let victim = system.take_processor("processor-1");
    victim.kill();
    // Let statements it had sent finish (or roll back).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let held = system.held_unfinished("processor-1").await;
    assert!(
        !held.is_empty(),
        "processor-1 killed holding unfinished jobs; {}",
        system.left().await
    );
    println!(
        "kill -9 processor-1 holding {} jobs of unfinished orders; processor-2 starts",
        held.len()
    );

    system.start_processor("processor-2").await;
    system.settle(0).await;
    finished_by(&system, &held, "processor-2").await;
    let log = system.log("processor-2");
    let not_again: Vec<&Uuid> = held
        .iter()
        .map(|(_, order)| order)
        .filter(|order| {
            !log.lines()
                .any(|l| l.contains(&order.to_string()) && l.contains("redelivered=true"))
        })
        .collect();
    assert!(
        not_again.is_empty(),
        "processor-2 logged each job it claimed again as redelivered; not these orders': \
         {not_again:?}"
    );
    system.check_once("killed processor", 0).await;
    system.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_and_doomed_jobs_die_with_their_reasons_and_replay_and_a_flaky_payment_is_retried() {
    let mut system = System::start(&[
        ("DEMO_FAILURES", "true"),
        ("RETRY_MAX_ATTEMPTS", "3"),
        ("RETRY_INITIAL_DELAY_MS", "200"),
        ("RETRY_MAX_DELAY_MS", "1000"),
    ])
    .await;
    // The live page, watching with an admin key: the jobs' retries and dead
    // letters reach it as they do from RabbitMQ's wire tap.
    let database_url = system.setting("DATABASE_URL");
    let admin = processes::keyed_client(
        &processes::api_key(&database_url, "jobs-ops", "admin"),
        Duration::from_secs(600),
    );
    let live = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, String)>::new()));
    let events = admin.get(system.api.url("/events")).send().await.unwrap();
    assert_eq!(events.status(), 200);
    let heard = live.clone();
    tokio::spawn(processes::server_events(events, move |_, event| {
        let order = event["order_id"].as_str().unwrap_or_default().to_owned();
        let status = event["status"].as_str().unwrap_or_default().to_owned();
        heard.lock().unwrap().push((order, status));
    }));
    system.start_processor("processor-1").await;
    let plain = system.place("c-1", false).await;
    // The first two authorisations answer 503; the third goes through.
    let flaky = system.place("flaky-2", false).await;
    // Every authorisation answers 503.
    let doomed = system.place("doomed", true).await;
    // A job whose body is not an order message, for an existing order.
    let poison: Uuid = sqlx::query_scalar!(
        r#"INSERT INTO jobs (order_id, message_id, lane, body, correlation_id)
           VALUES ($1, gen_random_uuid(), 'standard', '{"not": "an order message"}', 'poison')
           RETURNING message_id"#,
        plain
    )
    .fetch_one(&system.pool)
    .await
    .unwrap();
    let doomed_message: Uuid =
        sqlx::query_scalar!("SELECT message_id FROM jobs WHERE order_id = $1", doomed)
            .fetch_one(&system.pool)
            .await
            .unwrap();

    system
        .wait_for(
            "the plain and flaky orders processed, the poison and doomed jobs dead",
            || async {
                let processed = test_support::count!(
                    &system.pool,
                    r#"SELECT count(*) AS "n!" FROM orders WHERE status = 'processed'"#
                );
                let dead = test_support::count!(
                    &system.pool,
                    r#"SELECT count(*) AS "n!" FROM jobs WHERE state = 'dead'"#
                );
                processed == 2 && dead == 2
            },
        )
        .await;
    let status = |id: Uuid| {
        let pool = system.pool.clone();
        async move {
            let row = sqlx::query!("SELECT status, reason FROM orders WHERE id = $1", id)
                .fetch_one(&pool)
                .await
                .unwrap();
            (row.status, row.reason)
        }
    };
    assert_eq!(status(plain).await.0, "processed");
    assert_eq!(status(flaky).await.0, "processed");
    let retries = system
        .log("processor-1")
        .lines()
        .filter(|l| l.contains("the job is retried in") && l.contains(&flaky.to_string()))
        .count();
    assert_eq!(
        retries, 2,
        "the flaky order was retried twice, then succeeded"
    );
    let heard = |order: Uuid, status: &str| {
        let order = order.to_string();
        live.lock()
            .unwrap()
            .iter()
            .filter(|(o, s)| *o == order && s == status)
            .count()
    };
    system
        .wait_for(
            "the live page to hear of the retries and the dead letter",
            || async { heard(flaky, "retrying") == 2 && heard(doomed, "held") == 1 },
        )
        .await;
    let (held, reason) = status(doomed).await;
    assert_eq!(held, "held", "the doomed order is held");
    assert!(
        reason
            .as_deref()
            .is_some_and(|r| r.starts_with("gave up after 3 attempts")),
        "held with the reason: {reason:?}"
    );

    let broker = test_support::broker(&system.topology.0);
    let letters = dead_letters::list(&broker, &system.pool).await.unwrap();
    let listed: Vec<(String, &str, u32, Option<&str>)> = letters
        .iter()
        .map(|l| {
            let reason = if l.reason.starts_with("gave up after 3 attempts") {
                "gave up after 3 attempts"
            } else if l.reason.starts_with("not an OrderPlaced message") {
                "not an OrderPlaced message"
            } else {
                l.reason.as_str()
            };
            (l.message_id.clone(), reason, l.attempts, l.queue.as_deref())
        })
        .collect();
    assert_eq!(
        listed,
        [
            (
                doomed_message.to_string(),
                "gave up after 3 attempts",
                3,
                Some(dead_letters::JOBS)
            ),
            (
                poison.to_string(),
                "not an OrderPlaced message",
                0,
                Some(dead_letters::JOBS)
            ),
        ],
        "the dead jobs listed, oldest first, with their reasons: {letters:?}"
    );

    println!(
        "dead: the poison job and the doomed order's; the provider restarted without demo \
         failures, and both replayed"
    );
    let stopped = system.provider.take().expect("the provider runs");
    let port = stopped.port;
    assert!(processes::stop(stopped).await.success());
    system.env.retain(|(k, _)| *k != "DEMO_FAILURES");
    let provider = processes::start_provider(port, &system.env, &system.books_url, &system.log_dir);
    processes::wait_ready([&provider]).await;
    system.provider = Some(provider);
    for message_id in [doomed_message, poison] {
        let replayed = dead_letters::replay(
            &broker,
            &system.pool,
            &dead_letters::Selection::MessageId(message_id.to_string()),
        )
        .await
        .unwrap();
        assert_eq!(
            replayed
                .iter()
                .map(|l| l.message_id.clone())
                .collect::<Vec<_>>(),
            [message_id.to_string()],
            "replayed"
        );
    }
    // The doomed order goes through now; the poison dies again.
    system.settle(1).await;
    assert_eq!(status(doomed).await, ("processed".to_owned(), None));
    let poison_row = sqlx::query!(
        "SELECT state, reason FROM jobs WHERE message_id = $1",
        poison
    )
    .fetch_one(&system.pool)
    .await
    .unwrap();
    assert_eq!(poison_row.state, "dead");
    assert!(
        poison_row
            .reason
            .is_some_and(|r| r.starts_with("not an OrderPlaced message")),
        "dead again, with its reason"
    );
    system.check_once("poison, doomed and flaky jobs", 1).await;
    system.stop_all().await;
}
