//! One order message: dedupe, reserve stock, take payment, record the
//! outcome and its event, all in one Postgres transaction.

use chrono::Utc;
use messaging::{
    Topology,
    amqp::Envelope,
    contracts::{OrderEvent, OrderLine, OrderPlaced, Outcome, SCHEMA_VERSION},
};
use platform::{
    dedupe,
    outbox::{self, Outboxed},
};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::payment::PaymentProvider;

/// Name under which this service records the messages it handled.
pub const CONSUMER: &str = "order-processor";

/// What handling one message did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    /// The order reached a final status; the event id is in the outbox.
    Decided { outcome: Outcome, event: Outboxed },
    /// This message (or this order) was handled before; nothing changed.
    Duplicate,
}

/// Why a message was not handled.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// The message can never succeed: dead-letter it.
    #[error("poison message: {0}")]
    Poison(String),
    /// Something failed that may work next time.
    #[error(transparent)]
    Transient(#[from] anyhow::Error),
}

impl From<sqlx::Error> for HandleError {
    fn from(error: sqlx::Error) -> Self {
        HandleError::Transient(error.into())
    }
}

/// Everything the handler needs.
#[derive(Clone)]
pub struct Processor {
    pub pool: PgPool,
    pub topology: Topology,
    pub payments: PaymentProvider,
    pub instance_id: String,
}

/// Parse the message body; a body that is not an order is poison.
pub fn decode(body: &[u8]) -> Result<OrderPlaced, HandleError> {
    let order: OrderPlaced = serde_json::from_slice(body)
        .map_err(|e| HandleError::Poison(format!("not an OrderPlaced message: {e}")))?;
    if order.schema_version > SCHEMA_VERSION {
        return Err(HandleError::Poison(format!(
            "unknown schema version {}",
            order.schema_version
        )));
    }
    Ok(order)
}

impl Processor {
    /// Handle one decoded order on its `attempt`-th try (counting from 1).
    /// Commits before returning; the caller acks.
    pub async fn handle(
        &self,
        order: &OrderPlaced,
        correlation_id: &str,
        attempt: u32,
    ) -> Result<Handled, HandleError> {
        // A redelivery of a message already handled must not reach the
        // payment provider again; the check inside the transaction below is
        // the one that counts, this one saves the provider a call.
        if self.already_decided(order).await? {
            return Ok(Handled::Duplicate);
        }
        // Payment outside the transaction: its latency must not hold stock
        // row locks that every other processor is waiting for. The order id
        // is the provider's idempotency key, so a racing duplicate is not
        // charged twice.
        let paid = self
            .payments
            .authorise(
                order.order_id,
                &order.customer_id,
                order.total_cents,
                attempt,
            )
            .await
            .map_err(|e| HandleError::Transient(e.into()))?;

        let mut tx = self.pool.begin().await?;
        if !dedupe::first_delivery(&mut tx, CONSUMER, order.message_id).await? {
            return Ok(Handled::Duplicate);
        }
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM orders WHERE id = $1 FOR UPDATE")
                .bind(order.order_id)
                .fetch_optional(&mut *tx)
                .await?;
        match status.as_deref() {
            None => {
                return Err(HandleError::Poison(format!(
                    "order {} does not exist",
                    order.order_id
                )));
            }
            // Another message for an order already decided (a replay): keep
            // the first decision.
            Some(status) if status != "accepted" => {
                tx.commit().await?;
                return Ok(Handled::Duplicate);
            }
            Some(_) => {}
        }

        let outcome = if !paid {
            Outcome::Rejected {
                reason: "payment_declined".into(),
            }
        } else {
            match reserve(&mut tx, &order.items).await? {
                Ok(()) => Outcome::Processed,
                Err(sku) => Outcome::Rejected {
                    reason: format!("out_of_stock: {sku}"),
                },
            }
        };
        let detail = match &outcome {
            Outcome::Processed => "stock reserved, payment captured".to_owned(),
            Outcome::Rejected { reason } => reason.clone(),
        };
        // The decision and its history line in one round trip.
        sqlx::query(
            "WITH decided AS (
                 UPDATE orders SET status = $2, reason = $3, processed_by = $4, updated_at = now()
                 WHERE id = $1 RETURNING id)
             INSERT INTO order_status_history (order_id, status, detail, service)
             SELECT id, $2, $5, 'order-processor' FROM decided",
        )
        .bind(order.order_id)
        .bind(outcome.status())
        .bind(match &outcome {
            Outcome::Rejected { reason } => Some(reason.as_str()),
            Outcome::Processed => None,
        })
        .bind(&self.instance_id)
        .bind(&detail)
        .execute(&mut *tx)
        .await?;
        let event = self
            .enqueue_event(&mut tx, order, &outcome, correlation_id)
            .await?;
        tx.commit().await?;
        Ok(Handled::Decided { outcome, event })
    }

    async fn already_decided(&self, order: &OrderPlaced) -> Result<bool, HandleError> {
        let decided: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM processed_messages WHERE consumer = $1 AND message_id = $2)
                 OR EXISTS (SELECT 1 FROM orders WHERE id = $3 AND status <> 'accepted')",
        )
        .bind(CONSUMER)
        .bind(order.message_id)
        .bind(order.order_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(decided)
    }

    async fn enqueue_event(
        &self,
        conn: &mut PgConnection,
        order: &OrderPlaced,
        outcome: &Outcome,
        correlation_id: &str,
    ) -> Result<Outboxed, HandleError> {
        let event = OrderEvent {
            schema_version: SCHEMA_VERSION,
            message_id: Uuid::new_v4(),
            occurred_at: Utc::now(),
            outcome: outcome.clone(),
            order_id: order.order_id,
            customer_id: order.customer_id.clone(),
            email: order.email.clone(),
            total_cents: order.total_cents,
            currency: order.currency.clone(),
            lane: order.lane,
            processed_by: self.instance_id.clone(),
            callback_url: order.callback_url.clone(),
        };
        let envelope = Envelope {
            message_id: event.message_id,
            correlation_id: correlation_id.to_owned(),
            order_id: order.order_id,
        };
        let payload = serde_json::to_value(&event).map_err(anyhow::Error::from)?;
        Ok(outbox::enqueue(
            conn,
            &self.topology.events_exchange(),
            "",
            &envelope,
            &payload,
        )
        .await?)
    }
}

/// Take every line's quantity from stock, or none of them: `Err(sku)` names
/// the first line that is short, and the savepoint undoes the others.
/// Lines are taken in SKU order so concurrent orders lock rows in the same
/// order and cannot deadlock.
async fn reserve(conn: &mut PgConnection, items: &[OrderLine]) -> sqlx::Result<Result<(), String>> {
    let mut lines: Vec<&OrderLine> = items.iter().collect();
    lines.sort_by(|a, b| a.sku.cmp(&b.sku));
    // With one line there is nothing to undo: spare the two round trips.
    let undoable = lines.len() > 1;
    if undoable {
        sqlx::query("SAVEPOINT reserve").execute(&mut *conn).await?;
    }
    for line in lines {
        let taken =
            sqlx::query("UPDATE inventory SET stock = stock - $2 WHERE sku = $1 AND stock >= $2")
                .bind(&line.sku)
                .bind(line.quantity)
                .execute(&mut *conn)
                .await?;
        if taken.rows_affected() == 0 {
            if undoable {
                sqlx::query("ROLLBACK TO SAVEPOINT reserve")
                    .execute(&mut *conn)
                    .await?;
            }
            return Ok(Err(line.sku.clone()));
        }
    }
    if undoable {
        sqlx::query("RELEASE SAVEPOINT reserve")
            .execute(&mut *conn)
            .await?;
    }
    Ok(Ok(()))
}
