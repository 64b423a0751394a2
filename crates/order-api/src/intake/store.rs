//! One batch's transaction: the keys claimed, the prices read, and every
//! new order written with its answer and its message; a batch that fails
//! is stored again order by order.

use std::{collections::HashSet, time::Duration};

use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use messaging::{
    amqp::Envelope,
    contracts::{OrderPlaced, SCHEMA_VERSION},
};
use platform::{
    jobs::{self, WorkQueue},
    outbox::Outboxed,
};
use sqlx::PgPool;
use uuid::Uuid;

use super::{
    placement::{Answer, Placed, Placement, StoredOrder},
    statements::{Accepted, insert_all, price},
};
use crate::{
    domain::PricedLine,
    error::ApiError,
    idempotency::{self, Claim, NextAction, SavedResponse},
};

/// What the writers need.
pub(super) struct Store {
    pub(super) pool: PgPool,
    pub(super) orders_exchange: String,
    /// Where the orders' messages go: the outbox, or the `jobs` table.
    pub(super) work_queue: WorkQueue,
    pub(super) idempotency_ttl: Duration,
    pub(super) answer: Answer,
}

impl Store {
    /// Store a batch: one answer per placement. A batch that fails is
    /// stored again order by order.
    pub(super) async fn commit(&self, placements: Vec<Placement>) -> Vec<Result<Placed, ApiError>> {
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
        let as_jobs = self.work_queue == WorkQueue::Postgres;
        let outboxed = insert_all(&mut tx, &accepted, &self.orders_exchange, as_jobs).await?;
        if as_jobs && !accepted.is_empty() {
            jobs::notify(&mut tx).await?;
        }
        tx.commit().await?;

        for accepted in accepted {
            let message = (!as_jobs).then(|| {
                Outboxed::new(
                    outboxed[&accepted.order.id],
                    self.orders_exchange.clone(),
                    accepted.order.lane.as_str().into(),
                    accepted.body,
                    accepted.envelope,
                )
            });
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
        client: placement.client.clone(),
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
