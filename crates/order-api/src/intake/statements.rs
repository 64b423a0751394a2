//! The intake's statements: the prices of a batch's lines, and the write
//! of its new orders.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use messaging::amqp::Envelope;
use sqlx::PgConnection;
use uuid::Uuid;

use super::placement::{Placement, StoredOrder};
use crate::{
    domain::{PricedLine, ValidOrder},
    error::ApiError,
    idempotency::{IdempotencyKey, SavedResponse},
};

/// A new order of a batch with everything stored with it.
pub(super) struct Accepted<'a> {
    /// Its placement's place in the batch.
    pub(super) index: usize,
    pub(super) placement: &'a Placement,
    pub(super) order: StoredOrder,
    /// Its answer, saved with its idempotency key if it has one.
    pub(super) saved: SavedResponse,
    pub(super) envelope: Envelope,
    /// Its message's body: an `OrderPlaced`.
    pub(super) body: String,
}

/// Every order's lines with their prices, and the transaction's time (the
/// orders': `now()` is the same all through a transaction), in one query;
/// an order naming a SKU that does not exist gets the client's error.
pub(super) async fn price<'a>(
    conn: &mut PgConnection,
    orders: impl Iterator<Item = &'a ValidOrder>,
) -> sqlx::Result<(DateTime<Utc>, Vec<Result<Vec<PricedLine>, ApiError>>)> {
    let orders: Vec<&ValidOrder> = orders.collect();
    let skus: Vec<&str> = orders
        .iter()
        .flat_map(|o| o.items.iter().map(|l| l.sku.as_str()))
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let row = sqlx::query!(
        r#"SELECT now() AS "at!", array_agg(sku) AS found, array_agg(price_cents) AS prices
           FROM inventory WHERE sku = ANY($1)"#,
        &skus as &[&str],
    )
    .fetch_one(&mut *conn)
    .await?;
    let (at, found, prices) = (row.at, row.found, row.prices);
    let prices: HashMap<String, i64> = found
        .unwrap_or_default()
        .into_iter()
        .zip(prices.unwrap_or_default())
        .collect();
    let priced = orders
        .into_iter()
        .map(|order| {
            let unknown: Vec<String> = order
                .items
                .iter()
                .filter(|l| !prices.contains_key(&l.sku))
                .map(|l| l.sku.clone())
                .collect();
            if !unknown.is_empty() {
                return Err(ApiError::UnknownSku(unknown));
            }
            Ok(order
                .items
                .iter()
                .map(|line| PricedLine {
                    sku: line.sku.clone(),
                    quantity: line.quantity,
                    unit_price_cents: prices[&line.sku],
                })
                .collect())
        })
        .collect();
    Ok((at, priced))
}

/// Write the orders with their first history lines, their keys' answers
/// and their messages in one statement: each message to the outbox (for
/// `exchange`, routed by lane), or as a job when `as_jobs`; each order's
/// outbox or job row, by order id.
pub(super) async fn insert_all(
    conn: &mut PgConnection,
    accepted: &[Accepted<'_>],
    exchange: &str,
    as_jobs: bool,
) -> Result<HashMap<Uuid, i64>, ApiError> {
    if accepted.is_empty() {
        return Ok(HashMap::new());
    }
    let orders: Vec<&StoredOrder> = accepted.iter().map(|a| &a.order).collect();
    let keys: Vec<Option<&(IdempotencyKey, String)>> =
        accepted.iter().map(|a| a.placement.key.as_ref()).collect();
    let written = sqlx::query!(
        r#"WITH input AS (
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int8[],
                                  $6::text[], $7::text[], $8::text[], $9::text[], $10::text[],
                                  $11::text[], $12::text[], $13::timestamptz[], $14::uuid[],
                                  $15::text[], $16::text[], $17::text[], $18::int2[], $19::bytea[])
                 AS i(id, customer_id, email, items, total_cents,
                      currency, lane, shipping, callback_url, correlation_id,
                      client, detail, created_at, message_id,
                      message, idempotency_key, request_hash, response_status, response_body)),
         placed AS (
             INSERT INTO orders (id, customer_id, email, items, total_cents, currency, lane,
                                 shipping, callback_url, status, correlation_id, client, created_at)
             SELECT id, customer_id, email, items::jsonb, total_cents, currency, lane,
                    shipping::jsonb, callback_url, 'accepted', correlation_id, client, created_at
             FROM input),
         history AS (
             INSERT INTO order_status_history (order_id, status, detail, service, at)
             SELECT id, 'accepted', detail, 'order-api', created_at FROM input),
         saved AS (
             INSERT INTO idempotency_keys (client, idempotency_key, request_hash, response_status,
                                           response_body, order_id)
             SELECT client, idempotency_key, request_hash, response_status, response_body, id
             FROM input WHERE idempotency_key IS NOT NULL),
         outboxed AS (
             INSERT INTO outbox (message_id, exchange, routing_key, payload, correlation_id, order_id)
             SELECT message_id, $20, lane, message::jsonb, correlation_id, id FROM input
             WHERE NOT $21
             RETURNING order_id, id),
         queued AS (
             INSERT INTO jobs (order_id, message_id, lane, body, correlation_id)
             SELECT id, message_id, lane, message::jsonb, correlation_id FROM input
             WHERE $21
             RETURNING order_id, id)
         SELECT order_id AS "order_id!", id AS "id!" FROM outboxed
         UNION ALL SELECT order_id, id FROM queued"#,
        &orders.iter().map(|o| o.id).collect::<Vec<_>>(),
        &orders
            .iter()
            .map(|o| o.customer_id.as_str())
            .collect::<Vec<_>>() as &[&str],
        &orders.iter().map(|o| o.email.as_str()).collect::<Vec<_>>() as &[&str],
        &orders
            .iter()
            .map(|o| json(&o.items))
            .collect::<Result<Vec<_>, _>>()?,
        &orders.iter().map(|o| o.total_cents).collect::<Vec<_>>(),
        &orders
            .iter()
            .map(|o| o.currency.as_str())
            .collect::<Vec<_>>() as &[&str],
        &orders.iter().map(|o| o.lane.as_str()).collect::<Vec<_>>() as &[&str],
        &orders
            .iter()
            .map(|o| o.shipping.as_ref().map(json).transpose())
            .collect::<Result<Vec<_>, _>>()? as &[Option<String>],
        &orders
            .iter()
            .map(|o| o.callback_url.as_deref())
            .collect::<Vec<_>>() as &[Option<&str>],
        &orders
            .iter()
            .map(|o| o.correlation_id.as_str())
            .collect::<Vec<_>>() as &[&str],
        &accepted
            .iter()
            .map(|a| a.placement.client.as_str())
            .collect::<Vec<_>>() as &[&str],
        &orders.iter().map(|o| o.detail.as_str()).collect::<Vec<_>>() as &[&str],
        &orders.iter().map(|o| o.created_at).collect::<Vec<_>>(),
        &accepted
            .iter()
            .map(|a| a.envelope.message_id)
            .collect::<Vec<_>>(),
        &accepted.iter().map(|a| a.body.as_str()).collect::<Vec<_>>() as &[&str],
        &keys
            .iter()
            .map(|k| k.map(|(key, _)| key.as_ref()))
            .collect::<Vec<_>>() as &[Option<&str>],
        &keys
            .iter()
            .map(|k| k.map(|(_, hash)| hash.as_str()))
            .collect::<Vec<_>>() as &[Option<&str>],
        &accepted
            .iter()
            .map(|a| a.saved.status as i16)
            .collect::<Vec<_>>(),
        // Only a keyed order's answer is saved: the others' are not sent.
        &accepted
            .iter()
            .zip(&keys)
            .map(|(a, key)| key.map(|_| a.saved.body.as_slice()))
            .collect::<Vec<_>>() as &[Option<&[u8]>],
        exchange,
        as_jobs,
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(written
        .into_iter()
        .map(|row| (row.order_id, row.id))
        .collect())
}

/// A value as JSON text, for a `jsonb` column filled from a text array.
fn json(value: &impl serde::Serialize) -> Result<String, ApiError> {
    serde_json::to_string(value).map_err(|error| ApiError::Unexpected(error.into()))
}
