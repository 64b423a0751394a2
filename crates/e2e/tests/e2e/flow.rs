//! The whole flow with the real binaries: order-api, three competing
//! order-processors, notification-service and logging-service, on a private
//! database and topology, with 300 POSTs of which 30 reuse an earlier key.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::{StreamExt, stream};
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::processes::Stack;

const DISTINCT: usize = 270;
const REPEATED: usize = 30;

/// Order `i`: mostly ordinary; some express, some for the scarce item (5 in
/// stock), some above the payment limit, so every path is exercised.
fn order(i: usize) -> Value {
    let items = match i % 27 {
        0 => json!([{"sku": "LIMITED-EDITION", "quantity": 1}]),
        1 => json!([{"sku": "GIZMO", "quantity": 20}]),
        n => json!([{"sku": "WIDGET", "quantity": 1 + n % 3}, {"sku": "GADGET", "quantity": 1}]),
    };
    json!({
        "customer_id": format!("c-{}", i % 17),
        "email": format!("customer{i}@example.com"),
        "items": items,
        "express": i.is_multiple_of(5),
    })
}

struct Posted {
    status: u16,
    replayed: bool,
    body: Vec<u8>,
}

async fn post(client: &reqwest::Client, url: &str, body: &Value, key: &str) -> Posted {
    let response = client
        .post(url)
        .header("Idempotency-Key", key)
        .json(body)
        .send()
        .await
        .expect("POST /orders");
    Posted {
        status: response.status().as_u16(),
        replayed: response.headers().get("idempotent-replayed").is_some(),
        body: response.bytes().await.unwrap().to_vec(),
    }
}

/// Per SKU: processed orders, units, rejected orders, over all minutes, as
/// order-stats' read model holds them.
async fn read_model(pool: &PgPool) -> Vec<(String, i64, i64, i64)> {
    sqlx::query!(
        r#"SELECT sku, sum(orders)::bigint AS "orders!", sum(units)::bigint AS "units!",
                  sum(rejected)::bigint AS "rejected!"
           FROM sales_per_minute GROUP BY sku ORDER BY sku"#
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .map(|r| (r.sku, r.orders, r.units, r.rejected))
    .collect()
}

/// Wait until the order-stats reading into `pool` has counted `events`.
async fn all_counted(pool: &PgPool, events: i64, who: &str) {
    test_support::eventually(
        Duration::from_secs(60),
        &format!("{who} to count every event"),
        || async {
            // Every event counted is recorded as seen, whichever bus it
            // came by.
            let counted = sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM event_log_seen"#)
                .fetch_one(pool)
                .await
                .unwrap();
            (counted == events).then_some(())
        },
    )
    .await;
}

/// What a live page watching has been sent so far: the ids of the orders
/// whose final status `GET /events` sent, and the transports the first
/// queue-depth sample named.
#[derive(Default)]
struct LivePage {
    decided: Mutex<HashSet<String>>,
    transports: Mutex<Option<Value>>,
}

/// Open the live page's two streams with `client` (an admin's).
fn watch_live_page(
    client: &reqwest::Client,
    api: &test_support::process::Service,
) -> Arc<LivePage> {
    let page = Arc::new(LivePage::default());
    let events = client.get(api.url("/events")).send();
    let queues = client.get(api.url("/dashboard/queues")).send();
    let (seen, named) = (page.clone(), page.clone());
    tokio::spawn(async move {
        let response = events.await.expect("GET /events");
        assert_eq!(response.status(), 200);
        crate::processes::server_events(response, |_, event| {
            if matches!(event["status"].as_str(), Some("processed" | "rejected")) {
                let id = event["order_id"].as_str().unwrap_or_default().to_owned();
                seen.decided.lock().unwrap().insert(id);
            }
        })
        .await;
    });
    tokio::spawn(async move {
        let response = queues.await.expect("GET /dashboard/queues");
        crate::processes::server_events(response, |name, sample| {
            if name == "queues" {
                named
                    .transports
                    .lock()
                    .unwrap()
                    .get_or_insert(sample["transports"].clone());
            }
        })
        .await;
    });
    page
}

/// A count whose statement is built at run time.
async fn scalar(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

#[tokio::test]
async fn three_hundred_orders_flow_through_every_service_exactly_once() {
    flow("rabbitmq").await;
}

#[tokio::test]
async fn three_hundred_orders_flow_exactly_once_with_work_and_events_on_postgres() {
    flow("postgres").await;
}

/// 300 orders (30 of them repeated with their idempotency keys) through
/// three processors, both subscribers and order-stats, with the work queue
/// and the event bus on `transport` (`WORK_QUEUE`, `EVENT_BUS`); on
/// RabbitMQ, order-stats is also rebuilt from the event log.
async fn flow(transport: &str) {
    let mut settings = vec![
        ("PAYMENT_DECLINE_OVER_CENTS", "200000".into()),
        // The flow posts as fast as it can; the limit has its own tests.
        ("RATE_LIMIT_PER_SECOND", "100000".into()),
        ("RATE_LIMIT_BURST", "100000".into()),
        ("WORK_QUEUE", transport.into()),
        ("EVENT_BUS", transport.into()),
    ];
    if transport == "postgres" {
        // Postgres alone: a RabbitMQ no service can reach (nothing listens
        // on port 1 of the loopback address).
        settings.push(("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f".into()));
        settings.push((
            "RABBITMQ_MANAGEMENT_URL",
            "http://guest:guest@127.0.0.1:1".into(),
        ));
    }
    let Stack {
        api,
        provider: _provider,
        workers,
        log_dir,
        pool,
        books,
        database_url,
        env,
        _topology,
    } = Stack::start(&settings).await;

    let stock_before: HashMap<String, i64> = sqlx::query!("SELECT sku, stock FROM inventory")
        .fetch_all(&pool)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.sku, i64::from(r.stock)))
        .collect();

    let client = crate::processes::keyed_client(
        &crate::processes::api_key(&database_url, "e2e-shop", "client"),
        Duration::from_secs(60),
    );
    let admin = crate::processes::keyed_client(
        &crate::processes::api_key(&database_url, "e2e-operator", "admin"),
        Duration::from_secs(600),
    );
    let ready: Value = client
        .get(api.url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        ready.get("rabbitmq").is_some(),
        transport == "rabbitmq",
        "RabbitMQ is part of readiness only when something travels through it: {ready}"
    );
    let live = watch_live_page(&admin, &api);
    test_support::eventually(
        Duration::from_secs(30),
        "the live page to be sent its first queue depths",
        || async { live.transports.lock().unwrap().is_some().then_some(()) },
    )
    .await;
    assert_eq!(
        live.transports.lock().unwrap().clone(),
        Some(json!({"work_queue": transport, "event_bus": transport})),
        "the live page says which way orders and events travel"
    );
    let url = api.url("/orders");
    let originals: Vec<Posted> = stream::iter(0..DISTINCT)
        .map(|i| {
            let (client, url) = (&client, &url);
            async move { post(client, url, &order(i), &format!("order-{i}")).await }
        })
        .buffered(16)
        .collect()
        .await;
    // The repeats: a client retrying an earlier request with the same key.
    let repeats: Vec<Posted> = stream::iter(0..REPEATED)
        .map(|j| {
            let (client, url) = (&client, &url);
            let i = j * 9;
            async move { post(client, url, &order(i), &format!("order-{i}")).await }
        })
        .buffered(8)
        .collect()
        .await;

    assert!(
        originals.iter().all(|p| p.status == 202 && !p.replayed),
        "every distinct order accepted"
    );
    for (j, repeat) in repeats.iter().enumerate() {
        assert_eq!(repeat.status, 202);
        assert!(repeat.replayed, "repeat {j} carries Idempotent-Replayed");
        assert_eq!(
            repeat.body,
            originals[j * 9].body,
            "repeat {j} replays the first response"
        );
    }

    test_support::eventually(
        Duration::from_secs(90),
        "every order final, notified and audited",
        || async {
            let final_orders = sqlx::query_scalar!(
                r#"SELECT count(*) AS "n!" FROM orders WHERE status IN ('processed', 'rejected')"#
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            let notified = sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM notifications"#)
                .fetch_one(&pool)
                .await
                .unwrap();
            let audited = sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM audit_log"#)
                .fetch_one(&pool)
                .await
                .unwrap();
            (final_orders == DISTINCT as i64
                && notified == DISTINCT as i64
                && audited == DISTINCT as i64)
                .then_some(())
        },
    )
    .await;
    test_support::eventually(
        Duration::from_secs(30),
        "the live page to hear of every order's final status",
        || async { (live.decided.lock().unwrap().len() == DISTINCT).then_some(()) },
    )
    .await;
    // Let anything that would be a duplicate arrive before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;

    assert_eq!(
        sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM orders"#)
            .fetch_one(&pool)
            .await
            .unwrap(),
        DISTINCT as i64,
        "exactly 270 orders"
    );
    assert_eq!(
        sqlx::query_scalar!(
            r#"SELECT count(*) AS "n!" FROM (SELECT order_id FROM order_status_history
             WHERE status IN ('processed', 'rejected') GROUP BY order_id HAVING count(*) = 1) once"#
        )
        .fetch_one(&pool)
        .await
        .unwrap(),
        DISTINCT as i64,
        "each order reached exactly one final status"
    );
    assert_eq!(
        sqlx::query_scalar!(
            r#"SELECT count(*) AS "n!" FROM processed_messages WHERE consumer = 'order-processor'"#
        )
        .fetch_one(&pool)
        .await
        .unwrap(),
        DISTINCT as i64,
        "each order message processed once"
    );
    // Stock reserved exactly once per processed order, and never negative.
    let reserved: HashMap<String, i64> = sqlx::query!(
        r#"SELECT line->>'sku' AS "sku!", sum((line->>'quantity')::bigint)::bigint AS "units!"
         FROM orders, jsonb_array_elements(items) AS line
         WHERE status = 'processed' GROUP BY 1"#,
    )
    .fetch_all(&pool)
    .await
    .unwrap()
    .into_iter()
    .map(|r| (r.sku, r.units))
    .collect();
    let stock_after: Vec<(String, i32)> = sqlx::query!("SELECT sku, stock FROM inventory")
        .fetch_all(&pool)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.sku, r.stock))
        .collect();
    for (sku, after) in stock_after {
        assert!(after >= 0, "{sku} went negative");
        let taken = stock_before[&sku] - i64::from(after);
        assert_eq!(
            taken,
            reserved.get(&sku).copied().unwrap_or(0),
            "stock of {sku} reserved once per processed order"
        );
    }
    assert_eq!(
        sqlx::query_scalar!(
            r#"SELECT count(*) AS "n!" FROM orders
             WHERE status = 'processed' AND items @> '[{"sku": "LIMITED-EDITION"}]'"#
        )
        .fetch_one(&pool)
        .await
        .unwrap(),
        5,
        "the scarce item sold out exactly"
    );
    assert_eq!(
        sqlx::query_scalar!(
            r#"SELECT count(*) AS "n!" FROM orders WHERE reason = 'payment_declined'"#
        )
        .fetch_one(&pool)
        .await
        .unwrap(),
        (0..DISTINCT).filter(|i| i % 27 == 1).count() as i64,
        "the deterministic decline rule held"
    );
    println!(
        "money: {}",
        crate::chaos::check_money(&pool, &books, "flow").await
    );
    // Each kind of ending, as GET /orders/{id} and the email tell it.
    for (condition, steps, email) in [
        (
            "status = 'processed'",
            vec!["capturing", "captured"],
            "has been charged",
        ),
        (
            "reason LIKE 'out_of_stock%'",
            vec!["voiding", "voided"],
            "has been released",
        ),
        (
            "reason = 'payment_declined'",
            vec!["declined"],
            "was declined",
        ),
    ] {
        // Built at run time: the condition is part of the statement's text.
        let id: uuid::Uuid =
            sqlx::query_scalar(&format!("SELECT id FROM orders WHERE {condition} LIMIT 1"))
                .fetch_one(&pool)
                .await
                .unwrap();
        let view: Value = client
            .get(api.url(&format!("/orders/{id}")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let history: Vec<&str> = view["payment"]["history"]
            .as_array()
            .unwrap_or_else(|| panic!("{condition}: no payment history in {view}"))
            .iter()
            .map(|step| step["state"].as_str().unwrap())
            .collect();
        assert_eq!(history, steps, "{condition}: {view}");
        assert_eq!(view["payment"]["state"], *steps.last().unwrap());
        let body: String =
            sqlx::query_scalar!("SELECT body FROM notifications WHERE order_id = $1", id)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert!(body.contains(email), "{condition}: {body}");
    }

    let per_processor: Vec<(String, i64)> = sqlx::query!(
        r#"SELECT processed_by AS "processed_by!", count(*) AS "orders!"
             FROM orders GROUP BY 1 ORDER BY 1"#
    )
    .fetch_all(&pool)
    .await
    .unwrap()
    .into_iter()
    .map(|r| (r.processed_by, r.orders))
    .collect();
    println!("orders per processor: {per_processor:?}");
    assert_eq!(
        per_processor.len(),
        3,
        "every processor handled some orders: {per_processor:?}"
    );

    for (table, what) in [
        ("notifications", "notification"),
        ("audit_log", "audit record"),
    ] {
        // Built at run time: the table name cannot be a bound parameter.
        assert_eq!(
            scalar(
                &pool,
                &format!("SELECT count(DISTINCT event_id) FROM {table}")
            )
            .await,
            DISTINCT as i64,
            "one {what} per event"
        );
        assert_eq!(
            scalar(
                &pool,
                &format!("SELECT count(DISTINCT order_id) FROM {table}")
            )
            .await,
            DISTINCT as i64,
            "one {what} per order"
        );
    }
    assert_eq!(
        sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM outbox WHERE published_at IS NULL"#)
            .fetch_one(&pool)
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM events"#)
            .fetch_one(&pool)
            .await
            .unwrap(),
        if transport == "postgres" {
            DISTINCT as i64
        } else {
            0
        },
        "one event per order in the event log in Postgres, and only there"
    );

    // order-stats read every event from the log once: its read model holds
    // what the orders table says.
    let from_orders: Vec<(String, i64, i64, i64)> = sqlx::query!(
        r#"SELECT l->>'sku' AS "sku!",
                count(*) FILTER (WHERE o.status = 'processed') AS "orders!",
                coalesce(sum((l->>'quantity')::bigint) FILTER (WHERE o.status = 'processed'), 0)::bigint
                    AS "units!",
                count(*) FILTER (WHERE o.status = 'rejected') AS "rejected!"
         FROM orders o, jsonb_array_elements(o.items) l GROUP BY 1 ORDER BY 1"#,
    )
    .fetch_all(&pool)
    .await
    .unwrap()
    .into_iter()
    .map(|r| (r.sku, r.orders, r.units, r.rejected))
    .collect();
    let finished = i64::try_from(DISTINCT).unwrap();
    all_counted(&pool, finished, "order-stats").await;
    let stats_service = workers
        .iter()
        .find(|w| w.name == "order-stats")
        .expect("order-stats runs");
    let stats: Value = reqwest::get(stats_service.url("/stats"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        stats["log"]["events"], finished,
        "/stats says how far it has read the log it reads: {stats}"
    );
    assert_eq!(
        read_model(&pool).await,
        from_orders,
        "order-stats' read model"
    );

    assert_eq!(
        sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM jobs"#)
            .fetch_one(&pool)
            .await
            .unwrap(),
        0,
        "every job handled and deleted"
    );

    // A second order-stats on an empty database rebuilds the same numbers
    // from the beginning of the log (which the work queue has no part in).
    if transport == "rabbitmq" {
        rebuild_stats(&env, &log_dir, &from_orders).await;
    }

    // Every service stops cleanly on SIGTERM.
    for service in workers.into_iter().chain([api]) {
        let name = service.name.clone();
        let status = crate::processes::stop(service).await;
        assert!(status.success(), "{name} exited with {status}");
    }
    let _ = std::fs::remove_dir_all(&log_dir);
}

/// A second order-stats, on an empty database, counts what `from_orders`
/// says from the beginning of the event log.
async fn rebuild_stats(
    env: &[(&'static str, String)],
    log_dir: &std::path::Path,
    from_orders: &[(String, i64, i64, i64)],
) {
    let finished = i64::try_from(DISTINCT).unwrap();
    let (rebuild_url, rebuild_pool) = test_support::fresh_database().await;
    let mut env = env.to_vec();
    env.retain(|(k, _)| *k != "DATABASE_URL");
    env.push(("DATABASE_URL", rebuild_url));
    let rebuild = crate::processes::start("order-stats", "order-stats-rebuild", &env, log_dir);
    all_counted(&rebuild_pool, finished, "the rebuild").await;
    assert_eq!(
        read_model(&rebuild_pool).await,
        from_orders,
        "rebuilt from the log"
    );
    assert!(crate::processes::stop(rebuild).await.success());
}
