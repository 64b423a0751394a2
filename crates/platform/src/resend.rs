//! A subscribing service's safety net for the events it must handle. An
//! event is written to the outbox in the transaction that decides its order
//! and marked published once the order-events exchange has confirmed it;
//! from then on only the broker holds this service's copy. If that copy
//! never reaches the handler (dead-lettered by the queue's delivery limit,
//! held by the broker's own dead-lettering after a node was lost, purged,
//! or checked out to a consumer that never received it), nothing else would
//! ever notice: the order would stay without its email or audit record, in
//! a quiet system.
//!
//! So each subscribing service compares, now and then, the events published
//! a while ago with those it has handled (its `processed_messages` rows),
//! and sends the missing ones again, with their message ids, to its own
//! queue only; the handler dedupes. A backlog is not a loss: only as many
//! are sent as the queue holds fewer ready messages than events are missing
//! (as order-api's republisher does for orders), and each missing event at
//! most once per check.
//!
//! Each instance keeps a position in the outbox below which every event has
//! been handled, so a check reads only the rows since (after a start, every
//! row once). The position never passes a row younger than the waiting
//! period: a row committed later than that by a transaction that began
//! before it would be missed. One instance of a service checks at a time
//! (a Postgres advisory lock per service).

use std::{
    sync::atomic::{AtomicI64, Ordering},
    time::Duration,
};

use anyhow::Context;
use messaging::{Broker, Publisher, amqp::Envelope, declaration::queue_counts};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

/// Events sent again per check, at most.
const BATCH: i64 = 100;

/// Sends a subscribing service the events its queue lost.
pub struct Resender {
    pool: PgPool,
    broker: Broker,
    publisher: Publisher,
    /// The service: its `processed_messages` consumer and its queue's name.
    service: &'static str,
    after: Duration,
    /// Every event at or below this outbox id has been handled.
    handled_up_to: AtomicI64,
}

impl Resender {
    /// Send `service` again the events published over `after` ago that it
    /// has not handled.
    pub fn new(
        pool: PgPool,
        broker: Broker,
        publisher: Publisher,
        service: &'static str,
        after: Duration,
    ) -> Self {
        Self {
            pool,
            broker,
            publisher,
            service,
            after,
            handled_up_to: AtomicI64::new(0),
        }
    }

    /// Check every half waiting period (at least every second, at most every
    /// 30 s) until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        crate::periodic::every(
            crate::periodic::half_of(self.after),
            shutdown,
            "check for events this service never got",
            || self.check(),
        )
        .await;
    }

    /// One check; returns how many events were sent again (0 when another
    /// instance of the service holds the lock or the broker blocks
    /// publishers).
    pub async fn check(&self) -> anyhow::Result<usize> {
        if self.publisher.is_blocked() {
            return Ok(0);
        }
        // The broker before Postgres: an event consumed in between is then
        // missing from both counts, never counted missing but not held.
        let queue = self.broker.topology().subscriber_queue(self.service);
        let held = self.ready(&queue).await?;
        let mut tx = self.pool.begin().await.context("starting the check")?;
        let locked: bool = sqlx::query_scalar!(
            r#"SELECT pg_try_advisory_xact_lock(hashtext('resend:' || $1)) AS "locked!""#,
            self.service
        )
        .fetch_one(&mut *tx)
        .await
        .context("taking the service's resend lock")?;
        if !locked {
            return Ok(0);
        }
        self.advance(&mut tx).await?;
        let sent = self.resend_missing(&mut tx, &queue, held).await?;
        tx.commit().await.context("ending the check")?;
        Ok(sent)
    }

    /// Ready messages in the service's queue.
    async fn ready(&self, queue: &str) -> anyhow::Result<i64> {
        let connection = self.broker.connect_once().await?;
        let (ready, _) = queue_counts(&connection, queue)
            .await?
            .with_context(|| format!("{queue} does not exist"))?;
        Ok(i64::from(ready))
    }

    /// Move the position up to the first row that is an event not handled
    /// yet, or younger than the waiting period.
    async fn advance(&self, tx: &mut PgConnection) -> anyhow::Result<()> {
        let from = self.handled_up_to.load(Ordering::Relaxed);
        let to = sqlx::query_scalar!(
            r#"WITH top AS (SELECT coalesce(max(id), 0) AS id FROM outbox)
             SELECT coalesce(
                 (SELECT m.id - 1 FROM outbox m
                  WHERE m.id > $1 AND m.id <= (SELECT id FROM top)
                    AND (m.created_at > now() - make_interval(secs => $2)
                         OR (m.exchange = $3 AND NOT EXISTS (
                                 SELECT 1 FROM processed_messages p
                                 WHERE p.consumer = $4 AND p.message_id = m.message_id)))
                  ORDER BY m.id LIMIT 1),
                 (SELECT id FROM top)) AS "to!""#,
            from,
            self.after.as_secs_f64(),
            self.broker.topology().events_exchange(),
            self.service,
        )
        .fetch_one(&mut *tx)
        .await
        .context("finding the events handled so far")?;
        self.handled_up_to.store(to.max(from), Ordering::Relaxed);
        Ok(())
    }

    /// Send the oldest missing events again, as many as the queue holds
    /// fewer ready messages than events are missing.
    async fn resend_missing(
        &self,
        tx: &mut PgConnection,
        queue: &str,
        held: i64,
    ) -> anyhow::Result<usize> {
        let rows = sqlx::query!(
            r#"SELECT m.message_id, m.payload, m.correlation_id, m.order_id,
                    extract(epoch FROM now() - m.published_at)::float8 AS "silent_secs!",
                    count(*) OVER () AS "missing!" -- before the LIMIT
             FROM outbox m
             WHERE m.id > $1 AND m.exchange = $2
               AND m.published_at < now() - make_interval(secs => $3)
               AND NOT EXISTS (SELECT 1 FROM processed_messages p
                               WHERE p.consumer = $4 AND p.message_id = m.message_id)
             ORDER BY m.id LIMIT $5"#,
            self.handled_up_to.load(Ordering::Relaxed),
            self.broker.topology().events_exchange(),
            self.after.as_secs_f64(),
            self.service,
            BATCH,
        )
        .fetch_all(&mut *tx)
        .await
        .context("reading the events not handled")?;
        let Some(missing) = rows.first().map(|row| row.missing) else {
            return Ok(0);
        };
        let to_send = missing - held;
        if to_send <= 0 {
            return Ok(0);
        }
        tracing::warn!(
            missing,
            held,
            "{missing} event(s) published over {:?} ago were never handled by {}, and {queue} \
             holds only {held} ready message(s): sending up to {to_send} again",
            self.after,
            self.service
        );
        let mut sent = 0;
        for row in rows.iter().take(usize::try_from(to_send).unwrap_or(0)) {
            let envelope = Envelope {
                message_id: row.message_id,
                correlation_id: row.correlation_id.clone(),
                order_id: row.order_id,
            };
            // The default exchange routes by queue name: this service's
            // copy only, not the other subscribers'.
            let published = self
                .publisher
                .publish(
                    "",
                    queue,
                    &serde_json::to_vec(&row.payload)?,
                    envelope.properties(),
                )
                .await;
            if let Err(error) = published {
                tracing::warn!(
                    order_id = %envelope.order_id, error.message = %format!("{error:#}"),
                    "could not send a missing event again; the next check retries"
                );
                break;
            }
            let silent_secs = row.silent_secs;
            tracing::warn!(
                order_id = %envelope.order_id, message_id = %envelope.message_id,
                "event published {silent_secs:.0} s ago was never handled here: sent again to \
                 {queue} (same message id)"
            );
            sent += 1;
        }
        metrics::counter!("events_resent_total").increment(sent as u64);
        Ok(sent)
    }
}
