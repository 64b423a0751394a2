//! The order events on Postgres (`EVENT_BUS=postgres`): instead of the
//! RabbitMQ fanout, an `events` table appended in the transaction that
//! decides each order, which every subscriber reads from a position of its
//! own (`event_readers`), woken by the `NOTIFY` the append sends.
//!
//! A reader pages by (transaction id, id) and reads only rows whose
//! transaction precedes every transaction still running (see the
//! migration `events.sql`): an id is taken at INSERT and seen at COMMIT, so
//! a reader following ids alone would pass an event still committing and
//! never read it. The cost: one long transaction anywhere on the Postgres
//! server (snapshots span its databases) holds every reader back until it
//! ends.
//!
//! Handling is at least once (the position is stored after the handler has
//! committed) and the effects exactly once: the subscribers' handlers
//! record each event id in the transaction of its effects, as they do for
//! events from RabbitMQ, and skip one seen before.

use std::{pin::pin, sync::Arc, time::Duration};

use anyhow::Context;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::{
    subscriber::{EventHandler, Received, count_handled},
    wakeup,
};

/// The channel the `events` table's trigger notifies.
pub const CHANNEL: &str = "orderflow_events";

/// How long a reader waits, at most, before it looks again on its own:
/// the safety net under a notification lost while it was not listening.
const POLL: Duration = Duration::from_secs(2);

/// How soon a reader looks again when events are appended but not yet
/// readable (an older transaction is still running).
const HORIZON_PAUSE: Duration = Duration::from_millis(20);

/// How long a reader waits after its handler failed.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// How the order events travel.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EventBus {
    /// RabbitMQ's order-events fanout exchange.
    #[default]
    Rabbitmq,
    /// Postgres's `events` table.
    Postgres,
}

/// A place in the log: the writing transaction's id and the row's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub transaction_id: i64,
    pub id: i64,
}

/// One event of the log.
#[derive(Debug, Clone)]
pub struct Entry {
    pub position: Position,
    /// An `OrderEvent`, as JSON.
    pub body: String,
    pub correlation_id: String,
}

/// `reader`'s position, the start of the log for a new reader.
pub async fn position(pool: &PgPool, reader: &str) -> sqlx::Result<Position> {
    let row = sqlx::query!(
        r#"WITH added AS (
             INSERT INTO event_readers (reader) VALUES ($1) ON CONFLICT DO NOTHING
             RETURNING transaction_id, id)
           SELECT transaction_id::text::int8 AS "transaction_id!", id AS "id!" FROM added
           UNION ALL
           SELECT transaction_id::text::int8, id FROM event_readers WHERE reader = $1"#,
        reader,
    )
    .fetch_one(pool)
    .await?;
    Ok(Position {
        transaction_id: row.transaction_id,
        id: row.id,
    })
}

/// Start `reader` again from the beginning of the log.
pub async fn rewind(pool: &PgPool, reader: &str) -> sqlx::Result<()> {
    sqlx::query!("DELETE FROM event_readers WHERE reader = $1", reader)
        .execute(pool)
        .await?;
    Ok(())
}

/// Up to `limit` events after `after`, in log order, of transactions that
/// every running transaction follows; and whether more were appended that
/// cannot be read yet.
pub async fn read(pool: &PgPool, after: Position, limit: u16) -> sqlx::Result<(Vec<Entry>, bool)> {
    let entries = sqlx::query!(
        r#"SELECT transaction_id::text::int8 AS "transaction_id!", id, body::text AS "body!",
                  correlation_id
           FROM events
           WHERE (transaction_id, id) > ($1::int8::text::xid8, $2)
             AND transaction_id < pg_snapshot_xmin(pg_current_snapshot())
           ORDER BY transaction_id, id
           LIMIT $3"#,
        after.transaction_id,
        after.id,
        i64::from(limit),
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|row| Entry {
        position: Position {
            transaction_id: row.transaction_id,
            id: row.id,
        },
        body: row.body,
        correlation_id: row.correlation_id,
    })
    .collect::<Vec<_>>();
    if !entries.is_empty() {
        return Ok((entries, false));
    }
    let waiting = sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM events
                          WHERE (transaction_id, id) > ($1::int8::text::xid8, $2)) AS "waiting!""#,
        after.transaction_id,
        after.id,
    )
    .fetch_one(pool)
    .await?;
    Ok((entries, waiting))
}

/// Store that `reader` has handled the log up to `to`, `events` more.
pub async fn advance(pool: &PgPool, reader: &str, to: Position, events: i64) -> sqlx::Result<()> {
    sqlx::query!(
        r#"UPDATE event_readers
           SET transaction_id = $2::int8::text::xid8, id = $3, events = events + $4, updated_at = now()
           WHERE reader = $1"#,
        reader,
        to.transaction_id,
        to.id,
        events,
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Read the log as `reader` from its stored position until `shutdown`,
/// `batch` events at a time, handing them to `handler` together and storing
/// the position after each page; an event that is not an `OrderEvent` is
/// skipped with a warning (a log has no dead letters: it is the record).
pub async fn follow<E: EventHandler>(
    pool: PgPool,
    reader: &'static str,
    batch: u16,
    shutdown: CancellationToken,
    handler: E,
) -> anyhow::Result<()> {
    let from = position(&pool, reader)
        .await
        .context("reading the event log position")?;
    tracing::info!(reader, position = ?from, "ready: reading the event log in Postgres");
    let store = pool.clone();
    pages(pool, from, batch, shutdown, |entries| {
        let (handler, store) = (&handler, &store);
        async move {
            if let Err(error) = handle(handler, &entries).await {
                tracing::warn!(error.message = %format!("{error:#}"), "handling events from the log failed; trying again");
                return false;
            }
            let last = entries.last().expect("a page").position;
            let count = i64::try_from(entries.len()).unwrap_or(i64::MAX);
            if let Err(error) = advance(store, reader, last, count).await {
                // Handled and recorded: read again after a restart, they are
                // skipped as duplicates.
                tracing::warn!(error.message = %error, "could not store the event log position");
            }
            true
        }
    })
    .await;
    Ok(())
}

/// The position after the last event that can be read now: where a reader
/// that wants only what comes next starts.
pub async fn end(pool: &PgPool) -> sqlx::Result<Position> {
    let last = sqlx::query!(
        r#"SELECT transaction_id::text::int8 AS "transaction_id!", id FROM events
           WHERE transaction_id < pg_snapshot_xmin(pg_current_snapshot())
           ORDER BY transaction_id DESC, id DESC LIMIT 1"#,
    )
    .fetch_optional(pool)
    .await?;
    Ok(last.map_or(
        Position {
            transaction_id: 0,
            id: 0,
        },
        |row| Position {
            transaction_id: row.transaction_id,
            id: row.id,
        },
    ))
}

/// Read the log after `from` until `shutdown`, `batch` events at a time,
/// handing each page to `page`, which answers whether it is done with it
/// (if not, the page is read again after a pause). Between pages it waits
/// for the `NOTIFY` of an append, or a short pause when appended events are
/// not readable yet, or the safety poll.
pub async fn pages<F, Fut>(
    pool: PgPool,
    from: Position,
    batch: u16,
    shutdown: CancellationToken,
    mut page: F,
) where
    F: FnMut(Vec<Entry>) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let wake = Arc::new(Notify::new());
    let listening = tokio::spawn(wakeup::listen(
        pool.clone(),
        CHANNEL,
        wake.clone(),
        shutdown.child_token(),
    ));
    let mut at = from;
    while !shutdown.is_cancelled() {
        let mut woken = pin!(wake.notified());
        woken.as_mut().enable();
        let pause = match read(&pool, at, batch).await {
            Ok((entries, _)) if !entries.is_empty() => {
                let last = entries.last().expect("a page").position;
                if page(entries).await {
                    at = last;
                    continue;
                }
                RETRY_PAUSE
            }
            Ok((_, true)) => HORIZON_PAUSE,
            Ok((_, false)) => POLL,
            Err(error) => {
                tracing::warn!(error.message = %error, "could not read the event log; trying again");
                RETRY_PAUSE
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = woken => {}
            () = tokio::time::sleep(pause) => {}
        }
    }
    let _ = listening.await;
}

/// Hand a page of the log to `handler`, together.
async fn handle<E: EventHandler>(handler: &E, entries: &[Entry]) -> anyhow::Result<()> {
    let mut events = Vec::with_capacity(entries.len());
    for entry in entries {
        match serde_json::from_str(&entry.body) {
            Ok(event) => events.push(Received {
                event,
                correlation_id: entry.correlation_id.clone(),
            }),
            Err(error) => tracing::warn!(
                position = ?entry.position, error.message = %error,
                "skipping an entry of the event log that is not an OrderEvent"
            ),
        }
    }
    let answers = handler.handle_batch(&events).await?;
    for (received, now) in events.iter().zip(answers) {
        received.span().in_scope(|| count_handled(now));
    }
    Ok(())
}
