//! The transactional outbox: a message is written to Postgres in the same
//! transaction as the state change it announces, then published with
//! confirms and marked published. If the broker is down, or the process dies
//! between commit and publish, the relay publishes what is left, oldest
//! first. A crash between confirm and mark publishes twice: consumers dedupe.

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use messaging::{Publisher, amqp::Envelope};
use sqlx::{PgConnection, PgPool, Row};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Messages the relay publishes per transaction.
const BATCH: i64 = 100;

/// Add a message to the outbox inside the caller's transaction.
pub async fn enqueue(
    conn: &mut PgConnection,
    exchange: &str,
    routing_key: &str,
    envelope: &Envelope,
    payload: &serde_json::Value,
) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "INSERT INTO outbox (message_id, exchange, routing_key, payload, correlation_id, order_id)
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
    )
    .bind(envelope.message_id)
    .bind(exchange)
    .bind(routing_key)
    .bind(payload)
    .bind(&envelope.correlation_id)
    .bind(envelope.order_id)
    .fetch_one(conn)
    .await
}

/// Publishes outbox rows and marks them published.
#[derive(Clone)]
pub struct Relay {
    pool: PgPool,
    publisher: Publisher,
    wake: Arc<Notify>,
}

struct Pending {
    id: i64,
    exchange: String,
    routing_key: String,
    payload: serde_json::Value,
    envelope: Envelope,
}

impl Relay {
    /// A relay publishing through `publisher`.
    pub fn new(pool: PgPool, publisher: Publisher) -> Self {
        Self {
            pool,
            publisher,
            wake: Arc::new(Notify::new()),
        }
    }

    /// Publish the row `id` now, unless another publisher has it or it is
    /// already published. On failure the row stays for the background relay,
    /// which is woken to retry.
    pub async fn publish_now(&self, id: i64) -> anyhow::Result<()> {
        let result = self.publish_where(Some(id)).await;
        if result.is_err() {
            self.wake.notify_one();
        }
        result.map(|_| ())
    }

    /// Publish every unpublished row, oldest first; returns how many.
    pub async fn publish_pending(&self) -> anyhow::Result<usize> {
        let mut total = 0;
        loop {
            let published = self.publish_where(None).await?;
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

    async fn publish_where(&self, only: Option<i64>) -> anyhow::Result<usize> {
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
             WHERE published_at IS NULL AND ($1::bigint IS NULL OR id = $1)
             ORDER BY id LIMIT $2
             FOR UPDATE SKIP LOCKED",
        )
        .bind(only)
        .bind(BATCH)
        .fetch_all(&mut *tx)
        .await
        .context("reading the outbox")?;
        let pending: Vec<Pending> = rows
            .into_iter()
            .map(|row| Pending {
                id: row.get("id"),
                exchange: row.get("exchange"),
                routing_key: row.get("routing_key"),
                payload: row.get("payload"),
                envelope: Envelope {
                    message_id: row.get("message_id"),
                    correlation_id: row.get("correlation_id"),
                    order_id: row.get("order_id"),
                },
            })
            .collect();

        let mut published: Vec<i64> = Vec::with_capacity(pending.len());
        let mut failure = None;
        for message in &pending {
            let body = serde_json::to_vec(&message.payload)?;
            let started = std::time::Instant::now();
            match self
                .publisher
                .publish(
                    &message.exchange,
                    &message.routing_key,
                    &body,
                    message.envelope.properties(),
                )
                .await
            {
                Ok(()) => {
                    metrics::histogram!("publish_confirm_seconds")
                        .record(started.elapsed().as_secs_f64());
                    published.push(message.id);
                }
                Err(error) => {
                    // Stop at the first failure to keep the order.
                    failure = Some(error.context(format!(
                        "publishing outbox message {}",
                        message.envelope.message_id
                    )));
                    break;
                }
            }
        }
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

    /// Publish leftovers every `interval` (and at once when woken) until
    /// `shutdown`; then flush once more so nothing committed stays behind.
    pub async fn run(self, interval: Duration, shutdown: CancellationToken) {
        loop {
            if let Ok(backlog) = self.backlog().await {
                metrics::gauge!("outbox_backlog").set(backlog as f64);
            }
            match self.publish_pending().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(published = n, "outbox relay published leftovers"),
                Err(error) => tracing::warn!(
                    error.cause_chain = ?error, error.message = %error,
                    "outbox relay could not publish; will retry"
                ),
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = self.wake.notified() => tokio::time::sleep(Duration::from_millis(200)).await,
                () = tokio::time::sleep(interval) => {}
            }
        }
        if let Err(error) = self.publish_pending().await {
            tracing::warn!(error.message = %error, "final outbox flush failed; the next start publishes the rest");
        }
    }
}
