//! The transactional outbox: a message is written to Postgres in the same
//! transaction as the state change it announces, then published with
//! confirms and marked published. If the broker is down, or the process dies
//! between commit and publish, the relay publishes what is left, oldest
//! first. A crash between confirm and mark publishes twice: consumers dedupe.
//!
//! The publish right after the commit holds no transaction and no pooled
//! connection while it waits for the broker's confirm: the caller still has
//! the message, so it publishes it, and the relay marks the rows published
//! so far in one statement every [`MARK_INTERVAL`]. The relay's sweep leaves
//! rows younger than [`SWEEP_GRACE`] to that publish, so the two don't both
//! send a fresh row; a row whose mark was lost (a crash) is sent again and
//! deduped by its consumers.
//!
//! While the broker blocks publishers (a memory or disk alarm), nothing is
//! published: the rows wait in the table, committed, and the relay sends
//! them once the alarm clears. Publishing into a blocked connection would
//! only pile messages up in the client's buffer and hold the caller.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, bail};
use messaging::{Publisher, amqp::Envelope};
use sqlx::{PgPool, Row};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Messages the relay publishes per transaction.
const BATCH: i64 = 100;

/// How old an unpublished row must be before the relay's sweep takes it:
/// younger rows are still being published by the request or delivery that
/// wrote them.
pub const SWEEP_GRACE: Duration = Duration::from_secs(2);

/// How often the rows published since the last time are marked published.
pub const MARK_INTERVAL: Duration = Duration::from_millis(20);

/// A message written to the outbox, ready to be published once the
/// transaction that wrote it has committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outboxed {
    pub id: i64,
    exchange: String,
    routing_key: String,
    body: Vec<u8>,
    envelope: Envelope,
}

impl Outboxed {
    /// The message written to the outbox as row `id`: where it goes, its
    /// body (the row's payload) and its envelope.
    pub fn new(
        id: i64,
        exchange: String,
        routing_key: String,
        body: String,
        envelope: Envelope,
    ) -> Self {
        Self {
            id,
            exchange,
            routing_key,
            body: body.into_bytes(),
            envelope,
        }
    }
}

/// Publishes outbox rows and marks them published.
#[derive(Clone)]
pub struct Relay {
    pool: PgPool,
    publisher: Publisher,
    wake: Arc<Notify>,
    /// Published by `publish_now`, not yet marked in the table.
    unmarked: Arc<Mutex<Vec<i64>>>,
}

impl Relay {
    /// A relay publishing through `publisher`.
    pub fn new(pool: PgPool, publisher: Publisher) -> Self {
        Self {
            pool,
            publisher,
            wake: Arc::new(Notify::new()),
            unmarked: Arc::default(),
        }
    }

    /// Publish a message whose transaction has just committed, then mark
    /// its row published. On failure the row stays for the background relay,
    /// which is woken to retry; while the broker blocks publishers it stays
    /// for the relay without a try.
    pub async fn publish_now(&self, message: &Outboxed) -> anyhow::Result<()> {
        if self.publisher.is_blocked() {
            bail!("the broker is blocking publishers (resource alarm)");
        }
        let result = self.send(message).await;
        match &result {
            Ok(()) => self
                .unmarked
                .lock()
                .expect("the unmarked list is never poisoned")
                .push(message.id),
            Err(_) => self.wake.notify_one(),
        }
        result
    }

    /// Publish one outbox message and wait for its confirm.
    async fn send(&self, message: &Outboxed) -> anyhow::Result<()> {
        let started = std::time::Instant::now();
        self.publisher
            .publish(
                &message.exchange,
                &message.routing_key,
                &message.body,
                message.envelope.properties(),
            )
            .await
            .with_context(|| {
                format!("publishing outbox message {}", message.envelope.message_id)
            })?;
        metrics::histogram!("publish_confirm_seconds").record(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Mark the rows `publish_now` has published since the last call, in
    /// one statement; on failure they are kept for the next call.
    pub async fn mark_published(&self) -> anyhow::Result<()> {
        let ids = std::mem::take(
            &mut *self
                .unmarked
                .lock()
                .expect("the unmarked list is never poisoned"),
        );
        if ids.is_empty() {
            return Ok(());
        }
        let marked = sqlx::query(
            "UPDATE outbox SET published_at = now() WHERE id = ANY($1) AND published_at IS NULL",
        )
        .bind(&ids)
        .execute(&self.pool)
        .await;
        if let Err(error) = marked {
            self.unmarked
                .lock()
                .expect("the unmarked list is never poisoned")
                .extend(ids);
            return Err(error).context("marking outbox rows published");
        }
        Ok(())
    }

    /// Publish every unpublished row older than `grace`, oldest first;
    /// returns how many.
    pub async fn publish_pending(&self, grace: Duration) -> anyhow::Result<usize> {
        let mut total = 0;
        loop {
            let published = self.publish_older_than(grace).await?;
            total += published;
            if published < BATCH as usize {
                return Ok(total);
            }
        }
    }

    /// Unpublished rows, for readiness and tests.
    pub async fn backlog(&self) -> sqlx::Result<i64> {
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
            .fetch_one(&self.pool)
            .await
    }

    async fn publish_older_than(&self, grace: Duration) -> anyhow::Result<usize> {
        let mut tx = self
            .pool
            .begin()
            .await
            .context("starting the outbox transaction")?;
        // SKIP LOCKED: several relays (one per service instance) share the
        // table without publishing the same row at the same time.
        let rows = sqlx::query(
            "SELECT id, message_id, exchange, routing_key, payload, correlation_id, order_id
             FROM outbox
             WHERE published_at IS NULL AND created_at < now() - make_interval(secs => $1)
             ORDER BY id LIMIT $2
             FOR UPDATE SKIP LOCKED",
        )
        .bind(grace.as_secs_f64())
        .bind(BATCH)
        .fetch_all(&mut *tx)
        .await
        .context("reading the outbox")?;
        let pending = rows
            .into_iter()
            .map(|row| -> anyhow::Result<Outboxed> {
                let payload: serde_json::Value = row.get("payload");
                Ok(Outboxed {
                    id: row.get("id"),
                    exchange: row.get("exchange"),
                    routing_key: row.get("routing_key"),
                    body: serde_json::to_vec(&payload)?,
                    envelope: Envelope {
                        message_id: row.get("message_id"),
                        correlation_id: row.get("correlation_id"),
                        order_id: row.get("order_id"),
                    },
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;

        // All at once on the one channel, their confirms joined; only the
        // confirmed are marked, the rest stay for the next pass.
        let (published, failure) = if self.publisher.is_blocked() {
            let blocked = anyhow::anyhow!("the broker is blocking publishers (resource alarm)");
            (Vec::new(), Some(blocked))
        } else {
            let sent = futures_util::future::join_all(pending.iter().map(|m| self.send(m))).await;
            let mut published: Vec<i64> = Vec::with_capacity(pending.len());
            let mut failure = None;
            for (message, sent) in pending.iter().zip(sent) {
                match sent {
                    Ok(()) => published.push(message.id),
                    Err(error) => failure = failure.or(Some(error)),
                }
            }
            (published, failure)
        };
        sqlx::query("UPDATE outbox SET published_at = now() WHERE id = ANY($1)")
            .bind(&published)
            .execute(&mut *tx)
            .await
            .context("marking outbox rows published")?;
        tx.commit().await.context("committing the outbox")?;
        match failure {
            Some(error) => Err(error),
            None => Ok(published.len()),
        }
    }

    /// Mark what was published every [`MARK_INTERVAL`], and publish
    /// leftovers every `interval` (and soon after a failed publish) until
    /// `stop`; then flush both so nothing committed stays behind. Cancel
    /// `stop` only once every request and delivery that writes to the outbox
    /// has finished, or what they commit after the flush waits for the next
    /// start.
    pub async fn run(self, interval: Duration, stop: CancellationToken) {
        let mut mark = tokio::time::interval(MARK_INTERVAL);
        mark.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sweep = tokio::time::interval(interval);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut blocked = false;
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = mark.tick() => {
                    if let Err(error) = self.mark_published().await {
                        tracing::warn!(error.message = %format!("{error:#}"), "could not mark published outbox rows; will retry");
                    }
                }
                _ = sweep.tick() => self.sweep(&mut blocked).await,
                () = self.wake.notified() => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    self.sweep(&mut blocked).await;
                }
            }
        }
        // Every request and delivery has finished: nothing is in flight.
        // Mark first, or the flush would send the marked rows again.
        if let Err(error) = self.mark_published().await {
            tracing::warn!(error.message = %format!("{error:#}"), "final outbox mark failed; those rows will be sent again");
        }
        if let Err(error) = self.publish_pending(Duration::ZERO).await {
            tracing::warn!(error.message = %error, "final outbox flush failed; the next start publishes the rest");
        }
    }

    /// One pass of the relay; `blocked` remembers whether the last pass
    /// found the broker blocking publishers, to log each change once.
    async fn sweep(&self, blocked: &mut bool) {
        if let Ok(backlog) = self.backlog().await {
            metrics::gauge!("outbox_backlog").set(backlog as f64);
        }
        let now_blocked = self.publisher.is_blocked();
        if now_blocked != *blocked {
            *blocked = now_blocked;
            if now_blocked {
                tracing::warn!(
                    "the broker is blocking publishers: the outbox keeps what is accepted until the alarm clears"
                );
            } else {
                tracing::info!("the broker accepts publishes again: the outbox relay catches up");
            }
        }
        if now_blocked {
            return;
        }
        match self.publish_pending(SWEEP_GRACE).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(published = n, "outbox relay published leftovers"),
            Err(error) => tracing::warn!(
                error.cause_chain = ?error, error.message = %error,
                "outbox relay could not publish; will retry"
            ),
        }
    }
}
