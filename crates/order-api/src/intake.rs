//! Group commit: the orders of concurrent POSTs share one transaction.
//!
//! A request hands its validated order to the intake and waits for the
//! answer. A writer takes every order waiting since it last looked (never
//! waiting to fill a batch: at low load a batch is one order) and stores
//! them all in one transaction with set-based statements: their idempotency
//! keys claimed, their prices read, the orders with their first history
//! lines, their outbox messages and their keys' responses inserted. Each
//! request hears its answer only after that commit. [`WRITERS`] batches may
//! be committing at once; batches grow while they all are.
//!
//! Stripe's idempotency semantics hold inside a batch too: the key's
//! advisory lock is taken for the first request with it, so a second
//! request with the same key gets 409 exactly as if it had come from
//! another instance. If a batch fails as a whole, each of its orders is
//! stored again in a transaction of its own, so one order's failure is only
//! its own.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use messaging::{
    amqp::Envelope,
    contracts::{Lane, OrderPlaced, SCHEMA_VERSION},
};
use platform::outbox::Outboxed;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::{
    batch::Batcher,
    domain::{PricedLine, Shipping, ValidOrder},
    error::ApiError,
    idempotency::{self, Claim, IdempotencyKey, NextAction, SavedResponse},
};

/// Batches committing at once, at most: two, so that one commit stalled (a
/// checkpoint's fsync) does not hold every request up. More only make the
/// batches smaller: a writer starts a batch as soon as it is free, so with
/// four the machine spent as much CPU at half the full rate as at the full
/// rate (about 1.4 against 0.7 ms per order), and was saturated at both.
pub const WRITERS: usize = 2;

/// Orders in one transaction, at most.
pub const MAX_BATCH: usize = 128;

/// One request's order, as the intake stores it.
pub struct Placement {
    pub client: String,
    /// The request's idempotency key and the hash of its body.
    pub key: Option<(IdempotencyKey, String)>,
    pub order: ValidOrder,
    pub correlation_id: String,
}

/// An order as the intake stored it: accepted at the transaction's time,
/// with its first line of history.
pub struct StoredOrder {
    pub id: Uuid,
    pub customer_id: String,
    pub email: String,
    pub items: Vec<PricedLine>,
    pub total_cents: i64,
    pub currency: String,
    pub lane: Lane,
    pub callback_url: Option<String>,
    pub shipping: Option<Shipping>,
    pub correlation_id: String,
    pub created_at: DateTime<Utc>,
    /// Its first line of history.
    pub detail: String,
}

impl StoredOrder {
    /// The status a stored order starts in.
    pub const STATUS: &str = "accepted";
    /// Who its first line of history is by.
    pub const SERVICE: &str = "order-api";
}

/// How the answer to a stored order is written: the body saved with its
/// idempotency key and sent to the client (the HTTP layer's view of it).
pub type Answer = fn(&StoredOrder) -> serde_json::Result<Vec<u8>>;

/// What storing a placement did.
pub enum Placed {
    /// Stored now: the answer (saved with the key, if any), the order and
    /// its outbox message, to publish.
    Accepted {
        saved: SavedResponse,
        order: Box<StoredOrder>,
        message: Outboxed,
    },
    /// The key was used before with this body: its first answer.
    Replayed(SavedResponse),
}

/// Where requests hand their orders to the writers.
#[derive(Clone)]
pub struct Intake {
    writers: Batcher<Placement, Result<Placed, ApiError>>,
}

/// What the writers need.
struct Store {
    pool: PgPool,
    orders_exchange: String,
    idempotency_ttl: Duration,
    answer: Answer,
}

impl Intake {
    /// Start the writers, answering each stored order with `answer`; they
    /// stop once every handle is dropped.
    pub fn start(
        pool: PgPool,
        orders_exchange: String,
        idempotency_ttl: Duration,
        answer: Answer,
    ) -> Self {
        let store = Arc::new(Store {
            pool,
            orders_exchange,
            idempotency_ttl,
            answer,
        });
        let writers = Batcher::start(WRITERS, MAX_BATCH, move |batch| {
            let store = Arc::clone(&store);
            async move { store.commit(batch).await }
        });
        Self { writers }
    }

    /// Store `placement` with whatever else is waiting; answers after the
    /// commit.
    pub async fn place(&self, placement: Placement) -> Result<Placed, ApiError> {
        let _pending = Pending::count();
        let started = std::time::Instant::now();
        let placed = self.writers.call(placement).await;
        metrics::histogram!("order_intake_seconds").record(started.elapsed().as_secs_f64());
        placed.ok_or_else(|| anyhow::anyhow!("the order intake dropped the order"))?
    }
}

/// Counts a request in `order_intake_pending` until it has its answer (or
/// its client went away).
struct Pending;

impl Pending {
    fn count() -> Self {
        metrics::gauge!("order_intake_pending").increment(1.0);
        Self
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        metrics::gauge!("order_intake_pending").decrement(1.0);
    }
}

impl Store {
    /// Store a batch: one answer per placement. A batch that fails is
    /// stored again order by order.
    async fn commit(&self, placements: Vec<Placement>) -> Vec<Result<Placed, ApiError>> {
        metrics::histogram!("order_intake_batch_size").record(placements.len() as f64);
        match self.place_all(&placements).await {
            Ok(placed) => placed,
            Err(error) if placements.len() == 1 => vec![Err(error)],
            // Not any one order's fault: storing them one by one would make
            // the last wait out the acquire timeout once per order before it.
            Err(error) if error.outage_again().is_some() => placements
                .iter()
                .map(|_| Err(error.outage_again().expect("an outage")))
                .collect(),
            Err(error) => {
                metrics::counter!("order_intake_batches_split_total").increment(1);
                tracing::warn!(error.message = %format!("{error:#}"), "an order batch failed; storing its orders one by one");
                let mut answers = Vec::with_capacity(placements.len());
                for placement in &placements {
                    answers.push(
                        match self.place_all(std::slice::from_ref(placement)).await {
                            Ok(mut placed) => placed.pop().expect("one answer per order"),
                            Err(error) => Err(error),
                        },
                    );
                }
                answers
            }
        }
    }

    /// Store `placements` in one transaction: one answer per placement, or
    /// `Err` when the transaction failed and stored none of them.
    async fn place_all(
        &self,
        placements: &[Placement],
    ) -> Result<Vec<Result<Placed, ApiError>>, ApiError> {
        let mut answers: Vec<Option<Result<Placed, ApiError>>> =
            placements.iter().map(|_| None).collect();
        let mut tx = self.pool.begin().await?;

        // Keys: a repeat within the batch is in flight, as it would be
        // from anywhere else.
        let mut claimed = HashSet::new();
        let mut claims = Vec::new();
        let mut claimants = Vec::new();
        for (index, placement) in placements.iter().enumerate() {
            let Some((key, hash)) = &placement.key else {
                continue;
            };
            if !claimed.insert((placement.client.as_str(), key.as_ref())) {
                answers[index] = Some(Err(ApiError::IdempotencyKeyInFlight));
                continue;
            }
            claims.push(Claim {
                client: &placement.client,
                key,
                request_hash: hash,
            });
            claimants.push(index);
        }
        let claimed = idempotency::claim_all(&mut tx, &claims, self.idempotency_ttl).await?;
        for (index, next) in claimants.into_iter().zip(claimed) {
            match next {
                Ok(NextAction::StartProcessing) => {}
                Ok(NextAction::ReturnSavedResponse(saved)) => {
                    answers[index] = Some(Ok(Placed::Replayed(saved)));
                }
                Err(error) => answers[index] = Some(Err(error)),
            }
        }

        // Prices: an unknown SKU is the client's error, and only its own.
        let open: Vec<usize> = (0..placements.len())
            .filter(|&i| answers[i].is_none())
            .collect();
        let mut stored = Vec::new();
        if !open.is_empty() {
            let (at, priced) = price(&mut tx, open.iter().map(|&i| &placements[i].order)).await?;
            for (index, lines) in open.into_iter().zip(priced) {
                match lines {
                    Ok(lines) => stored.push((accepted(&placements[index], lines, at), index)),
                    Err(error) => answers[index] = Some(Err(error)),
                }
            }
        }

        let accepted = stored
            .into_iter()
            .map(|(order, index)| self.accept(index, &placements[index], order))
            .collect::<Result<Vec<_>, ApiError>>()?;
        let outboxed = insert_all(&mut tx, &accepted, &self.orders_exchange).await?;
        tx.commit().await?;

        for accepted in accepted {
            let message = Outboxed::new(
                outboxed[&accepted.order.id],
                self.orders_exchange.clone(),
                accepted.order.lane.as_str().into(),
                accepted.body,
                accepted.envelope,
            );
            answers[accepted.index] = Some(Ok(Placed::Accepted {
                saved: accepted.saved,
                order: Box::new(accepted.order),
                message,
            }));
        }
        Ok(answers
            .into_iter()
            .map(|answer| answer.expect("an answer for every order"))
            .collect())
    }

    /// A new order with what is stored beside it: its answer, and its
    /// message for the processors.
    fn accept<'a>(
        &self,
        index: usize,
        placement: &'a Placement,
        order: StoredOrder,
    ) -> Result<Accepted<'a>, ApiError> {
        let saved = SavedResponse {
            status: StatusCode::ACCEPTED.as_u16(),
            body: (self.answer)(&order).map_err(anyhow::Error::from)?,
            order_id: order.id,
        };
        let envelope = Envelope {
            message_id: Uuid::new_v4(),
            correlation_id: order.correlation_id.clone(),
            order_id: order.id,
        };
        let valid = &placement.order;
        let message = OrderPlaced {
            schema_version: SCHEMA_VERSION,
            message_id: envelope.message_id,
            occurred_at: order.created_at,
            order_id: order.id,
            customer_id: valid.customer_id.clone(),
            email: valid.email.clone(),
            items: valid.items.clone(),
            total_cents: order.total_cents,
            currency: valid.currency.clone(),
            lane: valid.lane,
            callback_url: valid.callback_url.clone(),
        };
        // Through a `Value`, as the body has always been written: its keys
        // sorted.
        let body = serde_json::to_value(&message)
            .and_then(|value| serde_json::to_string(&value))
            .map_err(anyhow::Error::from)?;
        Ok(Accepted {
            index,
            placement,
            order,
            saved,
            envelope,
            body,
        })
    }
}

/// A new order of a batch with everything stored with it.
struct Accepted<'a> {
    /// Its placement's place in the batch.
    index: usize,
    placement: &'a Placement,
    order: StoredOrder,
    /// Its answer, saved with its idempotency key if it has one.
    saved: SavedResponse,
    envelope: Envelope,
    /// Its message's body: an `OrderPlaced`.
    body: String,
}

/// Every order's lines with their prices, and the transaction's time (the
/// orders': `now()` is the same all through a transaction), in one query;
/// an order naming a SKU that does not exist gets the client's error.
async fn price<'a>(
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

/// A new order as it is stored at `at`: accepted, with its first line of
/// history.
fn accepted(placement: &Placement, items: Vec<PricedLine>, at: DateTime<Utc>) -> StoredOrder {
    let order = &placement.order;
    let total_cents = items
        .iter()
        .map(|l| i64::from(l.quantity) * l.unit_price_cents)
        .sum();
    StoredOrder {
        id: Uuid::new_v4(),
        customer_id: order.customer_id.clone(),
        email: order.email.clone(),
        total_cents,
        items,
        currency: order.currency.clone(),
        lane: order.lane,
        callback_url: order.callback_url.clone(),
        shipping: order.shipping.clone(),
        correlation_id: placement.correlation_id.clone(),
        created_at: at,
        detail: format!("queued on the {} lane", order.lane.as_str()),
    }
}

/// Write the orders with their first history lines, their keys' answers
/// and their messages (to `exchange`, routed by lane) in one statement; each
/// order's outbox row, by order id.
async fn insert_all(
    conn: &mut PgConnection,
    accepted: &[Accepted<'_>],
    exchange: &str,
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
             FROM input WHERE idempotency_key IS NOT NULL)
         INSERT INTO outbox (message_id, exchange, routing_key, payload, correlation_id, order_id)
         SELECT message_id, $20, lane, message::jsonb, correlation_id, id FROM input
         RETURNING order_id, id"#,
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
