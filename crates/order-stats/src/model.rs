//! The read model: orders, units and revenue per minute, and the reader's
//! position in the log, all moved together in one transaction per batch.

use chrono::{DateTime, Utc};
use messaging::contracts::{OrderEvent, Outcome};
use serde::Serialize;
use sqlx::PgPool;

/// One entry read from the log: its offset, and the event it holds, or why
/// it holds none.
#[derive(Debug)]
pub struct Entry {
    pub offset: i64,
    pub event: Result<OrderEvent, String>,
    pub payload: Vec<u8>,
}

impl Entry {
    /// The entry at `offset` holding `payload`. Why it is not an event is
    /// said without quoting it (serde's messages can quote a value, and the
    /// reason is logged); the payload itself is kept with the record.
    pub fn decode(offset: i64, payload: Vec<u8>) -> Self {
        let event = serde_json::from_slice::<OrderEvent>(&payload).map_err(|error| {
            format!(
                "not an order event: {:?} error at line {} column {}",
                error.classify(),
                error.line(),
                error.column()
            )
        });
        Self {
            offset,
            event,
            payload,
        }
    }
}

/// What a batch changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// Events counted now.
    pub counted: u64,
    /// Events in the batch counted before (the same event twice in the log).
    pub duplicates: u64,
    /// Entries skipped as not order events.
    pub skipped: u64,
}

/// Where the reader of `stream` stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Position {
    pub stream: String,
    pub next_offset: i64,
    pub events: i64,
    pub skipped: i64,
}

/// The stored position in `stream`, if the read model has one.
pub async fn position(pool: &PgPool, stream: &str) -> sqlx::Result<Option<Position>> {
    sqlx::query_as!(
        Position,
        "SELECT stream, next_offset, events, skipped FROM event_log_positions WHERE stream = $1",
        stream,
    )
    .fetch_optional(pool)
    .await
}

/// Where `reader` of the event log in Postgres stands (`EVENT_BUS=postgres`),
/// if it has read anything: the events counted and the last place read.
pub async fn log_position(pool: &PgPool, reader: &str) -> sqlx::Result<Option<serde_json::Value>> {
    let row = sqlx::query!(
        r#"SELECT events, transaction_id::text::int8 AS "transaction_id!", id
           FROM event_readers WHERE reader = $1"#,
        reader,
    )
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|row| {
        serde_json::json!({
            "reader": reader,
            "events": row.events,
            "transaction_id": row.transaction_id,
            "id": row.id,
        })
    }))
}

/// Empty the read model and forget the position, in one statement: the
/// next read starts at the beginning of the log.
pub async fn reset(pool: &PgPool) -> sqlx::Result<()> {
    sqlx::query!(
        "TRUNCATE sales_per_minute, revenue_per_minute, event_log_seen, event_log_skipped, \
         event_log_positions",
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Count `entries` (in log order) into the read model and move the position
/// past them, in one transaction. Entries before the stored position are
/// ignored, so a batch read again after a crash counts nothing twice; the
/// position row is locked first, so two readers of one database take turns.
pub async fn apply(pool: &PgPool, stream: &str, entries: &[Entry]) -> sqlx::Result<Applied> {
    let Some(last) = entries.iter().map(|e| e.offset).max() else {
        return Ok(Applied::default());
    };
    let mut tx = pool.begin().await?;
    let next = sqlx::query_scalar!(
        "INSERT INTO event_log_positions AS p (stream) VALUES ($1)
         ON CONFLICT (stream) DO UPDATE SET stream = p.stream
         RETURNING next_offset",
        stream,
    )
    .fetch_one(&mut *tx)
    .await?;
    let mut applied = Applied::default();
    let mut events = Vec::new();
    let mut skipped = (Vec::new(), Vec::new(), Vec::new());
    // The broker starts a reader at the beginning of the chunk holding its
    // offset: entries before the stored position were counted already.
    for entry in entries.iter().filter(|e| e.offset >= next) {
        match &entry.event {
            Ok(event) => events.push(event),
            Err(reason) => {
                skipped.0.push(entry.offset);
                skipped.1.push(reason.as_str());
                skipped.2.push(entry.payload.as_slice());
            }
        }
    }
    if last < next {
        return Ok(applied);
    }
    if !events.is_empty() {
        let counted = count(&mut tx, &events).await?.len() as u64;
        applied.counted = counted;
        applied.duplicates = events.len() as u64 - counted;
    }
    if !skipped.0.is_empty() {
        sqlx::query!(
            "INSERT INTO event_log_skipped (stream_offset, reason, payload)
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::bytea[])
             ON CONFLICT DO NOTHING",
            &skipped.0,
            &skipped.1 as &[&str],
            &skipped.2 as &[&[u8]],
        )
        .execute(&mut *tx)
        .await?;
        applied.skipped = skipped.0.len() as u64;
    }
    sqlx::query!(
        "UPDATE event_log_positions
         SET next_offset = $2, events = events + $3, skipped = skipped + $4, updated_at = now()
         WHERE stream = $1",
        stream,
        last + 1,
        i64::try_from(applied.counted).unwrap_or(i64::MAX),
        i64::try_from(applied.skipped).unwrap_or(i64::MAX),
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(applied)
}

/// Count `events` from the event log in Postgres (`EVENT_BUS=postgres`),
/// where the reader's position is stored apart (`platform::event_log`) and
/// the events seen before are what keeps a batch read again from being
/// counted twice: whether each was counted now.
pub async fn count_events(pool: &PgPool, events: &[&OrderEvent]) -> sqlx::Result<Vec<bool>> {
    let mut tx = pool.begin().await?;
    let counted = count(&mut tx, events).await?;
    tx.commit().await?;
    Ok(events
        .iter()
        .map(|event| counted.contains(&event.message_id))
        .collect())
}

/// Count the events not counted before, in one statement; returns the ids
/// of those counted now.
async fn count(
    tx: &mut sqlx::PgConnection,
    events: &[&OrderEvent],
) -> sqlx::Result<Vec<uuid::Uuid>> {
    let mut columns = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for event in events {
        columns.0.push(event.message_id);
        columns.1.push(event.occurred_at);
        columns.2.push(event.currency.as_str());
        columns.3.push(matches!(event.outcome, Outcome::Processed));
        columns.4.push(event.total_cents);
        columns
            .5
            .push(serde_json::to_value(&event.items).unwrap_or_default());
    }
    let counted = sqlx::query_scalar!(
        r#"WITH batch AS (
             SELECT DISTINCT ON (message_id) *
             FROM unnest($1::uuid[], $2::timestamptz[], $3::text[], $4::bool[], $5::bigint[], $6::jsonb[])
                 AS b(message_id, occurred_at, currency, processed, total_cents, items)
             ORDER BY message_id),
         fresh AS (
             INSERT INTO event_log_seen (message_id) SELECT message_id FROM batch
             ON CONFLICT DO NOTHING RETURNING message_id),
         counted AS (
             SELECT b.*, date_trunc('minute', b.occurred_at, 'UTC') AS minute
             FROM batch b JOIN fresh USING (message_id)),
         skus AS (
             INSERT INTO sales_per_minute AS s (minute, sku, orders, units, rejected)
             SELECT c.minute, l.sku,
                    count(*) FILTER (WHERE c.processed),
                    coalesce(sum(l.quantity) FILTER (WHERE c.processed), 0),
                    count(*) FILTER (WHERE NOT c.processed)
             FROM counted c CROSS JOIN LATERAL jsonb_to_recordset(c.items) AS l(sku text, quantity bigint)
             GROUP BY c.minute, l.sku
             ON CONFLICT (minute, sku) DO UPDATE SET orders = s.orders + EXCLUDED.orders,
                 units = s.units + EXCLUDED.units, rejected = s.rejected + EXCLUDED.rejected),
         revenue AS (
             INSERT INTO revenue_per_minute AS r (minute, currency, orders, rejected, revenue_cents)
             SELECT minute, currency,
                    count(*) FILTER (WHERE processed),
                    count(*) FILTER (WHERE NOT processed),
                    coalesce(sum(total_cents) FILTER (WHERE processed), 0)
             FROM counted GROUP BY minute, currency
             ON CONFLICT (minute, currency) DO UPDATE SET orders = r.orders + EXCLUDED.orders,
                 rejected = r.rejected + EXCLUDED.rejected,
                 revenue_cents = r.revenue_cents + EXCLUDED.revenue_cents)
         SELECT message_id AS "message_id!" FROM counted"#,
        &columns.0,
        &columns.1,
        &columns.2 as &[&str],
        &columns.3,
        &columns.4,
        &columns.5,
    )
    .fetch_all(&mut *tx)
    .await?;
    Ok(counted)
}

/// One SKU in one minute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SkuMinute {
    pub minute: DateTime<Utc>,
    pub sku: String,
    pub orders: i64,
    pub units: i64,
    pub rejected: i64,
}

/// One currency in one minute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RevenueMinute {
    pub minute: DateTime<Utc>,
    pub currency: String,
    pub orders: i64,
    pub rejected: i64,
    pub revenue_cents: i64,
}

/// The read model from `since` on, oldest minute first.
pub async fn since(
    pool: &PgPool,
    since: DateTime<Utc>,
) -> sqlx::Result<(Vec<SkuMinute>, Vec<RevenueMinute>)> {
    let skus = sqlx::query_as!(
        SkuMinute,
        "SELECT minute, sku, orders, units, rejected FROM sales_per_minute
         WHERE minute >= $1 ORDER BY minute, sku",
        since,
    )
    .fetch_all(pool)
    .await?;
    let revenue = sqlx::query_as!(
        RevenueMinute,
        "SELECT minute, currency, orders, rejected, revenue_cents FROM revenue_per_minute
         WHERE minute >= $1 ORDER BY minute, currency",
        since,
    )
    .fetch_all(pool)
    .await?;
    Ok((skus, revenue))
}
