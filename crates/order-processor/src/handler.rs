//! One order, from its message to its final status, with the money moved
//! as payment providers move it:
//!
//! ```text
//! authorising ──authorise──▶ authorised ──reserve stock──▶ capturing ──capture──▶ captured  (processed)
//!      │                         │                                                     
//!      └──declined──▶ declined   └──out of stock──▶ voiding ──void──▶ voided  (rejected)
//!                    (rejected)
//! ```
//!
//! Every arrow is one step: a provider call (idempotent by a key per order
//! and step) followed by one Postgres transaction that records its result,
//! guarded by the state it leaves. The payment's state is the only memory
//! between steps, so a crash between any two of them leaves a state the next
//! delivery of the message (or the sweeper, for a message that is gone)
//! continues from, and a provider call repeated after a crash gets the
//! provider's first answer. `captured`, `voided` and `declined` are written
//! in the transaction that gives the order its final status and queues its
//! event, so the event tells what really happened to the money.

use chrono::Utc;
use messaging::{
    Topology,
    amqp::Envelope,
    contracts::{
        Lane, OrderEvent, OrderLine, OrderPlaced, Outcome, PaymentOutcome, SCHEMA_VERSION,
        display_amount,
    },
};
use platform::outbox::{self, Outboxed};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::payment::{Answer, Charge, Operation, PaymentProvider, ProviderError};

/// Name under which this service records the messages it handled.
pub const CONSUMER: &str = "order-processor";

/// Steps one order can take at most; more means the states went round.
const MAX_STEPS: usize = 8;

/// What handling one message did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    /// The order reached a final status; the event id is in the outbox.
    Decided {
        outcome: Outcome,
        payment: PaymentOutcome,
        event: Outboxed,
    },
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

impl From<ProviderError> for HandleError {
    fn from(error: ProviderError) -> Self {
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

/// An order whose payment is under way, as Postgres has it.
#[derive(sqlx::FromRow)]
struct Pending {
    state: String,
    reason: Option<String>,
    message_id: Uuid,
    status: String,
    customer_id: String,
    email: String,
    items: sqlx::types::Json<Vec<OrderLine>>,
    total_cents: i64,
    currency: String,
    lane: String,
    callback_url: Option<String>,
    correlation_id: String,
}

impl Pending {
    fn charge(&self, order_id: Uuid) -> Charge<'_> {
        Charge {
            reference: order_id,
            customer_id: &self.customer_id,
            amount_cents: self.total_cents,
            currency: &self.currency,
        }
    }

    fn amount(&self) -> String {
        display_amount(self.total_cents, &self.currency)
    }
}

/// Where a step left the order.
enum Step {
    /// The payment moved on (or someone else moved it): look again.
    Moved,
    /// Nothing more to do.
    Done(Handled),
}

impl Processor {
    /// Handle one decoded order message: start the order's payment if it
    /// has none, then take it to the order's final status. Commits before
    /// returning; the caller acks.
    pub async fn handle(&self, order: &OrderPlaced) -> Result<Handled, HandleError> {
        match self.start(order).await? {
            Some(handled) => Ok(handled),
            None => self.settle(order.order_id).await,
        }
    }

    /// Give the order of this message a payment, `authorising`, unless it
    /// has one; `Some(Duplicate)` if the message or the order was handled
    /// before.
    pub async fn start(&self, order: &OrderPlaced) -> Result<Option<Handled>, HandleError> {
        // The amount is the one order-api stored, not the message's.
        let (status, seen): (Option<String>, bool) = sqlx::query_as(
            "WITH ordered AS (SELECT id, status, total_cents, currency FROM orders WHERE id = $1),
             started AS (
                 INSERT INTO payments (order_id, message_id, amount_cents, currency, state)
                 SELECT id, $2, total_cents, currency, 'authorising' FROM ordered
                 WHERE status = 'accepted'
                 ON CONFLICT (order_id) DO NOTHING)
             SELECT (SELECT status FROM ordered),
                    EXISTS (SELECT 1 FROM processed_messages WHERE consumer = $3 AND message_id = $2)",
        )
        .bind(order.order_id)
        .bind(order.message_id)
        .bind(CONSUMER)
        .fetch_one(&self.pool)
        .await?;
        match status.as_deref() {
            None => Err(HandleError::Poison(format!(
                "order {} does not exist",
                order.order_id
            ))),
            // A redelivery, or another message for an order already decided
            // (a replay): keep the first decision.
            Some(status) if status != "accepted" || seen => Ok(Some(Handled::Duplicate)),
            Some(_) => Ok(None),
        }
    }

    /// Take the payment of `order_id` from wherever it stands to the order's
    /// final status: what a delivery does, and what the sweeper does for a
    /// payment left half done.
    pub async fn settle(&self, order_id: Uuid) -> Result<Handled, HandleError> {
        for _ in 0..MAX_STEPS {
            if let Some(handled) = self.step(order_id).await? {
                return Ok(handled);
            }
        }
        Err(HandleError::Transient(anyhow::anyhow!(
            "the payment of order {order_id} did not settle in {MAX_STEPS} steps"
        )))
    }

    /// One step of the payment of `order_id` from its recorded state (the
    /// unit a crash falls between); `None` when there is more to do.
    pub async fn step(&self, order_id: Uuid) -> Result<Option<Handled>, HandleError> {
        Ok(match self.next(order_id).await? {
            Step::Moved => None,
            Step::Done(handled) => Some(handled),
        })
    }

    async fn next(&self, order_id: Uuid) -> Result<Step, HandleError> {
        let Some(pending) = sqlx::query_as::<_, Pending>(
            "SELECT p.state, p.reason, p.message_id, o.status, o.customer_id, o.email, o.items,
                    o.total_cents, o.currency, o.lane, o.callback_url, o.correlation_id
             FROM payments p JOIN orders o ON o.id = p.order_id WHERE p.order_id = $1",
        )
        .bind(order_id)
        .fetch_optional(&self.pool)
        .await?
        else {
            return Err(HandleError::Poison(format!(
                "order {order_id} has no payment"
            )));
        };
        if pending.status != "accepted" {
            return Ok(Step::Done(Handled::Duplicate));
        }
        let charge = pending.charge(order_id);
        match pending.state.as_str() {
            "authorising" => {
                match self
                    .payments
                    .call(
                        Operation::Authorise,
                        &charge,
                        &Operation::Authorise.key(order_id),
                    )
                    .await?
                {
                    Answer::Authorised => {
                        let detail = format!("{} authorised", pending.amount());
                        if move_payment(
                            &self.pool,
                            order_id,
                            &["authorising"],
                            "authorised",
                            None,
                            &detail,
                            CONSUMER,
                        )
                        .await?
                        {
                            tracing::info!("payment of {} authorised", pending.amount());
                        }
                        Ok(Step::Moved)
                    }
                    Answer::Declined => {
                        let outcome = Outcome::Rejected {
                            reason: "payment_declined".into(),
                        };
                        self.finish(
                            order_id,
                            &pending,
                            "authorising",
                            PaymentOutcome::Declined,
                            outcome,
                        )
                        .await
                    }
                    answer => {
                        self.refused(order_id, "authorising", Operation::Authorise, answer)
                            .await
                    }
                }
            }
            "authorised" => self.decide(order_id, &pending).await,
            "capturing" => {
                match self
                    .payments
                    .call(
                        Operation::Capture,
                        &charge,
                        &Operation::Capture.key(order_id),
                    )
                    .await?
                {
                    Answer::Captured => {
                        self.finish(
                            order_id,
                            &pending,
                            "capturing",
                            PaymentOutcome::Captured,
                            Outcome::Processed,
                        )
                        .await
                    }
                    answer => {
                        self.refused(order_id, "capturing", Operation::Capture, answer)
                            .await
                    }
                }
            }
            "voiding" => {
                match self
                    .payments
                    .call(Operation::Void, &charge, &Operation::Void.key(order_id))
                    .await?
                {
                    Answer::Voided => {
                        let outcome = Outcome::Rejected {
                            reason: pending.reason.clone().unwrap_or_else(|| "voided".into()),
                        };
                        self.finish(
                            order_id,
                            &pending,
                            "voiding",
                            PaymentOutcome::Voided,
                            outcome,
                        )
                        .await
                    }
                    answer => {
                        self.refused(order_id, "voiding", Operation::Void, answer)
                            .await
                    }
                }
            }
            settled => Err(HandleError::Poison(format!(
                "order {order_id} is still accepted but its payment is {settled}"
            ))),
        }
    }

    /// An answer the step cannot use: if the payment has moved on meanwhile
    /// (the sweeper voided it), follow it; otherwise the message is poison
    /// and the payment waits, as it is, for the sweeper.
    async fn refused(
        &self,
        order_id: Uuid,
        from: &str,
        operation: Operation,
        answer: Answer,
    ) -> Result<Step, HandleError> {
        let state: String = sqlx::query_scalar("SELECT state FROM payments WHERE order_id = $1")
            .bind(order_id)
            .fetch_one(&self.pool)
            .await?;
        if state != from {
            return Ok(Step::Moved);
        }
        Err(HandleError::Poison(format!(
            "payment provider answered {answer:?} to {operation} for order {order_id}"
        )))
    }

    /// The authorisation is held: reserve the stock and decide to capture,
    /// or, short of stock, to void. The decision is the payment's next
    /// state, committed with the reservation.
    async fn decide(&self, order_id: Uuid, pending: &Pending) -> Result<Step, HandleError> {
        let mut tx = self.pool.begin().await?;
        let state: Option<String> = sqlx::query_scalar(
            "SELECT p.state FROM orders o JOIN payments p ON p.order_id = o.id
             WHERE o.id = $1 AND o.status = 'accepted' FOR UPDATE",
        )
        .bind(order_id)
        .fetch_optional(&mut *tx)
        .await?;
        if state.as_deref() != Some("authorised") {
            return Ok(Step::Moved);
        }
        let (next, reason, detail) = match reserve(&mut tx, &pending.items).await? {
            Ok(()) => (
                "capturing",
                None,
                format!("stock reserved; capturing {}", pending.amount()),
            ),
            Err(sku) => {
                let reason = format!("out_of_stock: {sku}");
                let detail = format!(
                    "{reason}; voiding the authorisation of {}",
                    pending.amount()
                );
                ("voiding", Some(reason), detail)
            }
        };
        // The row is locked and was `authorised`: this moves it.
        move_payment(
            &mut *tx,
            order_id,
            &["authorised"],
            next,
            reason.as_deref(),
            &detail,
            CONSUMER,
        )
        .await?;
        tx.commit().await?;
        tracing::info!("{detail}");
        Ok(Step::Moved)
    }

    /// The money has moved as the provider confirmed: in one transaction,
    /// the payment's final state, the order's final status, its history,
    /// its event and the message's record as handled.
    async fn finish(
        &self,
        order_id: Uuid,
        pending: &Pending,
        from: &str,
        payment: PaymentOutcome,
        outcome: Outcome,
    ) -> Result<Step, HandleError> {
        let mut tx = self.pool.begin().await?;
        let moved: Option<Uuid> = sqlx::query_scalar(
            "UPDATE payments p SET state = $3, updated_at = now()
             FROM orders o
             WHERE p.order_id = $1 AND p.state = $2 AND o.id = p.order_id AND o.status = 'accepted'
             RETURNING p.order_id",
        )
        .bind(order_id)
        .bind(from)
        .bind(payment.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        if moved.is_none() {
            return Ok(Step::Moved);
        }
        let amount = pending.amount();
        let (payment_detail, order_detail) = match (&outcome, payment) {
            (Outcome::Processed, _) => (
                format!("{amount} captured"),
                format!("stock reserved, payment of {amount} captured"),
            ),
            (Outcome::Rejected { reason }, PaymentOutcome::Declined) => {
                (format!("{amount} declined by the provider"), reason.clone())
            }
            (Outcome::Rejected { reason }, _) => (
                format!("authorisation of {amount} voided: {reason}"),
                format!("{reason}; authorisation of {amount} voided, nothing charged"),
            ),
        };
        let reason = match &outcome {
            Outcome::Rejected { reason } => Some(reason.as_str()),
            Outcome::Processed => None,
        };
        // The decision, both histories and the message's record in one
        // round trip; the guarded UPDATE above let one transaction through.
        sqlx::query(
            "WITH decided AS (
                 UPDATE orders SET status = $2, reason = $3, processed_by = $4, updated_at = now()
                 WHERE id = $1 RETURNING id),
             paid AS (
                 INSERT INTO payment_history (order_id, state, detail, service)
                 SELECT id, $6, $7, 'order-processor' FROM decided),
             handled AS (
                 INSERT INTO processed_messages (consumer, message_id) VALUES ($8, $9)
                 ON CONFLICT DO NOTHING)
             INSERT INTO order_status_history (order_id, status, detail, service)
             SELECT id, $2, $5, 'order-processor' FROM decided",
        )
        .bind(order_id)
        .bind(outcome.status())
        .bind(reason)
        .bind(&self.instance_id)
        .bind(&order_detail)
        .bind(payment.as_str())
        .bind(&payment_detail)
        .bind(CONSUMER)
        .bind(pending.message_id)
        .execute(&mut *tx)
        .await?;
        let event = self
            .enqueue_event(&mut tx, order_id, pending, &outcome, payment)
            .await?;
        tx.commit().await?;
        decided(pending, &outcome, payment);
        Ok(Step::Done(Handled::Decided {
            outcome,
            payment,
            event,
        }))
    }

    async fn enqueue_event(
        &self,
        conn: &mut PgConnection,
        order_id: Uuid,
        pending: &Pending,
        outcome: &Outcome,
        payment: PaymentOutcome,
    ) -> Result<Outboxed, HandleError> {
        let lane = match pending.lane.as_str() {
            "express" => Lane::Express,
            _ => Lane::Standard,
        };
        let event = OrderEvent {
            schema_version: SCHEMA_VERSION,
            message_id: Uuid::new_v4(),
            occurred_at: Utc::now(),
            outcome: outcome.clone(),
            order_id,
            customer_id: pending.customer_id.clone(),
            email: pending.email.clone(),
            total_cents: pending.total_cents,
            currency: pending.currency.clone(),
            lane,
            processed_by: self.instance_id.clone(),
            callback_url: pending.callback_url.clone(),
            payment: Some(payment),
        };
        let envelope = Envelope {
            message_id: event.message_id,
            correlation_id: pending.correlation_id.clone(),
            order_id,
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

/// Move the payment of `order_id` from one of `from` to `to` with a
/// line of history by `service` (and, given one, the reason it is being
/// voided), in one statement; `false` if it was in none of `from`.
pub(crate) async fn move_payment(
    conn: impl sqlx::PgExecutor<'_>,
    order_id: Uuid,
    from: &[&str],
    to: &str,
    reason: Option<&str>,
    detail: &str,
    service: &str,
) -> sqlx::Result<bool> {
    let moved = sqlx::query(
        "WITH moved AS (
             UPDATE payments SET state = $3, reason = coalesce($4, reason), updated_at = now()
             WHERE order_id = $1 AND state = ANY($2) RETURNING order_id)
         INSERT INTO payment_history (order_id, state, detail, service)
         SELECT order_id, $3, $5, $6 FROM moved",
    )
    .bind(order_id)
    .bind(from)
    .bind(to)
    .bind(reason)
    .bind(detail)
    .bind(service)
    .execute(conn)
    .await?;
    Ok(moved.rows_affected() == 1)
}

/// Count the decision and say in the log what happened, money included.
fn decided(pending: &Pending, outcome: &Outcome, payment: PaymentOutcome) {
    metrics::counter!("orders_decided_total", "outcome" => outcome.status()).increment(1);
    metrics::counter!("payments_settled_total", "outcome" => payment.as_str()).increment(1);
    let (amount, lane, items) = (pending.amount(), &pending.lane, pending.items.len());
    match (outcome, payment) {
        (Outcome::Processed, _) => tracing::info!(
            lane = %lane, items,
            "order processed: stock reserved, payment of {amount} captured"
        ),
        (Outcome::Rejected { reason }, PaymentOutcome::Declined) => tracing::warn!(
            lane = %lane, items, reason = %reason,
            "order rejected: payment of {amount} declined, nothing charged"
        ),
        (Outcome::Rejected { reason }, _) => tracing::warn!(
            lane = %lane, items, reason = %reason,
            "order rejected ({reason}): authorisation of {amount} voided, nothing charged"
        ),
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
