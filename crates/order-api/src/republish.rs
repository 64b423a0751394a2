//! Postgres is the source of truth, not the broker's disk: an order still
//! `accepted` a while after its message was published, at a moment when the
//! order queues hold fewer ready messages than there are such orders, has
//! been forgotten by the broker (a purge, a broker recreated without its
//! data, a dead letter the broker made on its own). Its message is
//! published again from the outbox, with the same message id: the
//! processors dedupe, so a false alarm costs one skipped message (as when
//! the message was only in flight, delivered but not yet acked, which the
//! count of ready messages leaves out). A queue that is merely long holds at
//! least as many messages as there are waiting orders, so nothing is sent
//! into it. An order whose message the processor dead-lettered is `held`,
//! not accepted: it waits for the person who replays it.
//!
//! One order-api instance at a time does this (a Postgres advisory lock);
//! every re-published row gets a new `published_at`, so an order is sent
//! again at most once per waiting period.

use std::time::Duration;

use anyhow::Context;
use messaging::{Broker, Publisher, amqp::Envelope, declaration::queue_counts};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Orders published again per check, at most.
const BATCH: i64 = 100;

/// The advisory lock that lets one order-api instance check at a time
/// (any constant no other code of this database uses: "orderflow" in ASCII).
const LOCK_KEY: i64 = 0x6f72_6465_7266_6c6f;

/// Finds orders the broker forgot and publishes them again.
#[derive(Clone)]
pub struct Republisher {
    pool: PgPool,
    broker: Broker,
    publisher: Publisher,
    after: Duration,
}

impl Republisher {
    /// Re-publish orders still accepted `after` their message was last
    /// published.
    pub fn new(pool: PgPool, broker: Broker, publisher: Publisher, after: Duration) -> Self {
        Self {
            pool,
            broker,
            publisher,
            after,
        }
    }

    /// Check every half waiting period (at least every second, at most every
    /// 30 s) until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        platform::periodic::every(
            platform::periodic::half_of(self.after),
            shutdown,
            "check for orders the broker forgot",
            || self.check(),
        )
        .await;
    }

    /// One check; returns how many orders were published again (0 when
    /// another instance holds the lock or the broker blocks publishers).
    pub async fn check(&self) -> anyhow::Result<usize> {
        if self.publisher.is_blocked() {
            return Ok(0);
        }
        let mut tx = self.pool.begin().await.context("starting the check")?;
        let locked = sqlx::query_scalar!(
            r#"SELECT pg_try_advisory_xact_lock($1) AS "locked!""#,
            LOCK_KEY
        )
        .fetch_one(&mut *tx)
        .await
        .context("taking the re-publish lock")?;
        let sent = if locked {
            self.republish_missing(&mut tx).await
        } else {
            Ok(0)
        };
        // End the transaction now, releasing the lock for the next check
        // (a dropped transaction is rolled back only when its connection is
        // next used).
        match sent {
            Ok(sent) => {
                tx.commit().await.context("committing the re-publish")?;
                metrics::counter!("orders_republished_total").increment(sent as u64);
                Ok(sent)
            }
            Err(error) => {
                let _ = tx.rollback().await;
                Err(error)
            }
        }
    }

    /// Under the lock: compare what the broker holds with the orders
    /// waiting, and publish the oldest of them again for the difference.
    async fn republish_missing(&self, tx: &mut PgConnection) -> anyhow::Result<usize> {
        // The broker before Postgres: an order consumed in between is then
        // missing from both counts, never counted waiting but not held.
        let held = self.held_by_broker().await?;
        let exchange = self.broker.topology().orders_exchange();
        // Waiting: still accepted, their message (on the orders exchange)
        // last published over `after` ago.
        let waiting = sqlx::query_scalar!(
            r#"SELECT count(*) AS "waiting!"
               FROM orders o JOIN outbox m ON m.order_id = o.id
               WHERE o.status = 'accepted' AND m.exchange = $1
                 AND m.published_at < now() - make_interval(secs => $2)"#,
            exchange,
            self.after.as_secs_f64(),
        )
        .fetch_one(&mut *tx)
        .await
        .context("counting orders waiting")?;
        let missing = waiting - i64::try_from(held).unwrap_or(i64::MAX);
        if missing <= 0 {
            return Ok(0);
        }
        tracing::warn!(
            waiting,
            held,
            "{waiting} order(s) accepted and published over {:?} ago are not final, but the broker \
             holds only {held} order message(s): publishing up to {missing} again from Postgres",
            self.after
        );
        // The oldest of those same orders.
        let rows = sqlx::query!(
            r#"SELECT m.id, m.message_id, m.routing_key, m.payload, m.correlation_id, m.order_id,
                      extract(epoch FROM now() - m.published_at)::float8 AS "silent_secs!"
               FROM orders o JOIN outbox m ON m.order_id = o.id
               WHERE o.status = 'accepted' AND m.exchange = $1
                 AND m.published_at < now() - make_interval(secs => $2)
               ORDER BY m.published_at LIMIT $3"#,
            exchange,
            self.after.as_secs_f64(),
            missing.min(BATCH),
        )
        .fetch_all(&mut *tx)
        .await
        .context("reading the waiting orders")?;

        let mut sent: Vec<i64> = Vec::with_capacity(rows.len());
        for row in rows {
            let envelope = Envelope {
                message_id: row.message_id,
                correlation_id: row.correlation_id,
                order_id: row.order_id,
            };
            let published = self
                .publisher
                .publish(
                    &exchange,
                    &row.routing_key,
                    &serde_json::to_vec(&row.payload)?,
                    envelope.properties(),
                )
                .await;
            if let Err(error) = published {
                tracing::warn!(
                    order_id = %envelope.order_id, error.message = %format!("{error:#}"),
                    "could not publish a forgotten order again; the next check retries"
                );
                break;
            }
            log_republished(envelope.order_id, envelope.message_id, row.silent_secs);
            sent.push(row.id);
        }
        sqlx::query!(
            "UPDATE outbox SET published_at = now() WHERE id = ANY($1)",
            &sent
        )
        .execute(&mut *tx)
        .await
        .context("recording the re-publish")?;
        Ok(sent.len())
    }

    /// Ready messages in the queues that can hold an order message. The
    /// dead letters are not among them: an order whose message the
    /// processor dead-lettered is `held`, not waiting; one the broker
    /// dead-lettered on its own (the delivery limit reached through lost
    /// channels) is still accepted, and is sent again like any order the
    /// broker forgot.
    async fn held_by_broker(&self) -> anyhow::Result<u64> {
        let connection = self.broker.connect_once().await?;
        let topology = self.broker.topology();
        let mut held = 0;
        for queue in topology.order_queues() {
            // A queue that does not exist (a broker recreated empty, before
            // the topology is declared again) makes the count meaningless.
            let (ready, _) = queue_counts(&connection, &queue)
                .await?
                .with_context(|| format!("{queue} does not exist"))?;
            held += u64::from(ready);
        }
        Ok(held)
    }
}

fn log_republished(order_id: Uuid, message_id: Uuid, silent_secs: f64) {
    tracing::warn!(
        order_id = %order_id, message_id = %message_id,
        "order still accepted {silent_secs:.0} s after its message was published, with too few \
         order messages on the broker: published again (same message id)"
    );
}
