//! What the settle loop waits for, and, when the system does not settle,
//! what was left: the counts compared, every queue's ready and unacked
//! messages and consumers, the jobs waiting or running in Postgres, the
//! event log's readers, the dead letters (the queue's and the dead jobs),
//! and the orders concerned with their rows (status history, outbox rows,
//! jobs, processed messages, payment).
//! A quiet system with work left in it must say where the work sits.

use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::PgPool;

use super::{System, Transport};

/// The counts the settle loop compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub orders: i64,
    /// Orders `accepted` or `held`: not final.
    pub not_final: i64,
    pub notified: i64,
    pub audited: i64,
    pub unpublished: i64,
    /// Ready messages in every queue but the dead letters.
    pub queued: u64,
    /// Rows of the `jobs` table waiting or running (work in Postgres); the
    /// dead ones are dead letters.
    pub jobs: i64,
    /// Queues whose depth could not be read.
    pub unreadable: usize,
}

impl Counts {
    pub async fn read(system: &System, amqp: &lapin::Connection) -> Self {
        let pool = &system.pool;
        let (mut queued, mut unreadable) = (0, 0);
        let topology = system.topology();
        // With work and events in Postgres no service declares the queues:
        // there are none to read.
        let queues = match system.transport {
            Transport::Rabbitmq => topology.all_queues(),
            Transport::Postgres => Vec::new(),
        };
        for queue in queues {
            if queue != topology.dead_letters() {
                match test_support::ready_messages(amqp, &queue).await {
                    Some(ready) => queued += u64::from(ready),
                    None => unreadable += 1,
                }
            }
        }
        Self {
            orders: sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM orders"#)
                .fetch_one(pool)
                .await
                .unwrap(),
            not_final: sqlx::query_scalar!(
                r#"SELECT count(*) AS "n!" FROM orders WHERE status IN ('accepted', 'held')"#
            )
            .fetch_one(pool)
            .await
            .unwrap(),
            notified: sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM notifications"#)
                .fetch_one(pool)
                .await
                .unwrap(),
            audited: sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM audit_log"#)
                .fetch_one(pool)
                .await
                .unwrap(),
            unpublished: sqlx::query_scalar!(
                r#"SELECT count(*) AS "n!" FROM outbox WHERE published_at IS NULL"#
            )
            .fetch_one(pool)
            .await
            .unwrap(),
            queued,
            jobs: sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM jobs WHERE state <> 'dead'"#)
                .fetch_one(pool)
                .await
                .unwrap(),
            unreadable,
        }
    }

    /// Every order final, notified and audited once, nothing unpublished
    /// and nothing waiting in a queue or the `jobs` table.
    pub fn settled(&self) -> bool {
        self.not_final == 0
            && self.notified == self.orders
            && self.audited == self.orders
            && self.unpublished == 0
            && self.queued == 0
            && self.jobs == 0
            && self.unreadable == 0
    }
}

/// Wait up to `limit` for the system to settle; if it does not, panic
/// with what was left.
pub async fn settle(system: &System, case: &str, limit: Duration) {
    let amqp = system.amqp().await;
    let started = Instant::now();
    let deadline = started + limit;
    loop {
        let counts = Counts::read(system, &amqp).await;
        if counts.settled() {
            println!("{case}: settled in {:.1?}", started.elapsed());
            return;
        }
        if Instant::now() >= deadline {
            let left = what_is_left(system, &counts).await;
            panic!("{case}: the system did not settle within {limit:?}; what was left:\n{left}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Everything known about what was left, as text for a failed test.
pub async fn what_is_left(system: &System, counts: &Counts) -> String {
    let mut out = format!(
        "counts: orders={} not_final={} notified={} audited={} unpublished_outbox={} \
         ready_in_queues={} jobs_waiting_or_running={} unreadable_queues={}\n",
        counts.orders,
        counts.not_final,
        counts.notified,
        counts.audited,
        counts.unpublished,
        counts.queued,
        counts.jobs,
        counts.unreadable
    );
    out += "queues (management API; its statistics lag a few seconds):\n";
    match system.management_api("queues/%2F", Value::is_array).await {
        Some(Value::Array(queues)) => {
            for queue in queues {
                out += &format!("  {}\n", queue_line(&queue));
            }
        }
        _ => out += "  no node's management API answered\n",
    }
    out += &jobs_left(&system.pool).await;
    out += &event_readers(&system.pool).await;
    match dead_letters::list(system.dead_letter_broker().as_ref(), &system.pool).await {
        Ok(letters) if letters.is_empty() => out += "dead letters: none\n",
        Ok(letters) => {
            out += &format!("dead letters ({}):\n", letters.len());
            for letter in letters {
                out += &format!("  {letter:?}\n");
            }
        }
        Err(error) => out += &format!("dead letters: could not list them: {error:#}\n"),
    }
    let orders = concerned_orders(&system.pool).await;
    out += &format!(
        "orders not final, not notified or audited exactly once, or with an unpublished \
         outbox row ({} shown, oldest first):\n",
        orders.len()
    );
    for order in orders {
        out += &format!("  {order}\n");
    }
    let unpublished: Vec<String> = sqlx::query_scalar!(
        r#"SELECT row_to_json(m)::text AS "row!" FROM (SELECT id, message_id, exchange, routing_key,
                order_id, created_at FROM outbox WHERE published_at IS NULL ORDER BY id LIMIT 20) m"#,
    )
    .fetch_all(&system.pool)
    .await
    .unwrap_or_default();
    out += &format!("unpublished outbox rows ({} shown):\n", unpublished.len());
    for row in unpublished {
        out += &format!("  {row}\n");
    }
    out
}

/// The jobs still waiting or running (up to 20, the next due first), and
/// how many are dead: the work in Postgres that was left.
async fn jobs_left(pool: &PgPool) -> String {
    let rows = sqlx::query_scalar!(
        r#"SELECT row_to_json(j)::text AS "row!" FROM (
             SELECT id, order_id, message_id, lane, state, run_at, attempts, claims, leased_by,
                    reason, created_at
             FROM jobs WHERE state <> 'dead' ORDER BY run_at, id LIMIT 20) j"#,
    )
    .fetch_all(pool)
    .await;
    let dead = sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM jobs WHERE state = 'dead'"#)
        .fetch_one(pool)
        .await;
    match (rows, dead) {
        (Ok(rows), Ok(dead)) => {
            let mut out = format!(
                "jobs waiting or running ({} shown, the next due first; now {}), dead jobs: {dead}\n",
                rows.len(),
                chrono::Utc::now().to_rfc3339(),
            );
            for row in rows {
                out += &format!("  {row}\n");
            }
            out
        }
        (Err(error), _) | (_, Err(error)) => format!("jobs: could not read them: {error}\n"),
    }
}

/// The event log in Postgres: how many events it holds, and where each
/// reader stands (events it handled, its position).
async fn event_readers(pool: &PgPool) -> String {
    let events = sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM events"#)
        .fetch_one(pool)
        .await;
    let readers = sqlx::query_scalar!(
        r#"SELECT row_to_json(r)::text AS "row!" FROM (
             SELECT reader, events, transaction_id::text AS transaction_id, id, updated_at
             FROM event_readers ORDER BY reader) r"#,
    )
    .fetch_all(pool)
    .await;
    match (events, readers) {
        (Ok(0), Ok(readers)) if readers.is_empty() => "event log in Postgres: unused\n".to_owned(),
        (Ok(events), Ok(readers)) => {
            let mut out = format!("event log in Postgres: {events} events; readers:\n");
            for reader in readers {
                out += &format!("  {reader}\n");
            }
            out
        }
        (Err(error), _) | (_, Err(error)) => {
            format!("event log: could not read it: {error}\n")
        }
    }
}

/// Up to 20 orders that keep the system from settling, each with its rows.
async fn concerned_orders(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar!(
        r#"WITH concerned AS (
             SELECT o.* FROM orders o
             WHERE o.status IN ('accepted', 'held')
                OR (SELECT count(*) FROM notifications n WHERE n.order_id = o.id) <> 1
                OR (SELECT count(*) FROM audit_log a WHERE a.order_id = o.id) <> 1
                OR EXISTS (SELECT 1 FROM outbox m WHERE m.order_id = o.id AND m.published_at IS NULL)
                OR EXISTS (SELECT 1 FROM jobs j WHERE j.order_id = o.id AND j.state <> 'dead')
             ORDER BY o.created_at LIMIT 20)
         SELECT json_build_object(
             'id', o.id, 'status', o.status, 'lane', o.lane, 'created_at', o.created_at,
             'history', (SELECT json_agg(json_build_object('status', h.status, 'service', h.service,
                             'detail', h.detail, 'at', h.at) ORDER BY h.id)
                         FROM order_status_history h WHERE h.order_id = o.id),
             'outbox', (SELECT json_agg(json_build_object('id', m.id, 'message_id', m.message_id,
                            'exchange', m.exchange, 'routing_key', m.routing_key,
                            'created_at', m.created_at, 'published_at', m.published_at) ORDER BY m.id)
                        FROM outbox m WHERE m.order_id = o.id),
             'jobs', (SELECT json_agg(json_build_object('id', j.id, 'message_id', j.message_id,
                          'state', j.state, 'run_at', j.run_at, 'attempts', j.attempts,
                          'claims', j.claims, 'leased_by', j.leased_by, 'reason', j.reason)
                          ORDER BY j.id)
                      FROM jobs j WHERE j.order_id = o.id),
             'processed_messages', (SELECT json_agg(json_build_object('consumer', p.consumer,
                                        'message_id', p.message_id, 'at', p.processed_at))
                                    FROM processed_messages p JOIN outbox m ON m.message_id = p.message_id
                                    WHERE m.order_id = o.id),
             'payment', (SELECT json_build_object('state', p.state, 'updated_at', p.updated_at)
                         FROM payments p WHERE p.order_id = o.id),
             'notifications', (SELECT count(*) FROM notifications n WHERE n.order_id = o.id),
             'audit_records', (SELECT count(*) FROM audit_log a WHERE a.order_id = o.id)
         )::text AS "order!"
         FROM concerned o ORDER BY o.created_at"#,
    )
    .fetch_all(pool)
    .await
    .unwrap_or_else(|error| vec![format!("could not read them: {error}")])
}

/// One queue's name, type, depths, consumers and replicas; for quorum
/// queues also the messages waiting to be dead-lettered, which `messages`
/// counts but neither `ready` nor `unacked` does.
fn queue_line(queue: &Value) -> String {
    let mut line = format!(
        "{} ({}): messages={} ready={} unacked={} consumers={}",
        queue["name"].as_str().unwrap_or("?"),
        queue["type"].as_str().unwrap_or("?"),
        queue["messages"],
        queue["messages_ready"],
        queue["messages_unacknowledged"],
        queue["consumers"],
    );
    if let Some(fields) = queue.as_object() {
        for (key, value) in fields {
            if key.contains("dlx")
                || ["leader", "online", "members", "state"].contains(&key.as_str())
            {
                line += &format!(" {key}={value}");
            }
        }
    }
    line
}
