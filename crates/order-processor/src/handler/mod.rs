//! One order, from its message to its final status, with the money moved
//! as payment providers move it; the states it passes through, and the next
//! step from each, are in [`crate::state`].
//!
//! A step is a provider call (idempotent by a key per order and step)
//! followed by one Postgres transaction that records its result, guarded by
//! the state it leaves; an authorisation is recorded with the decision it
//! leads to (`capturing` with the stock reserved, or `voiding`), so an order
//! takes two steps, or one when declined. Orders whose messages came
//! together take their steps together: one statement starts their payments
//! and reads what the steps need, their provider calls run concurrently, and
//! set-based statements record a round's results: one transaction for the
//! decisions, one statement for the final statuses. The payment's state is
//! the only memory between steps, so a crash between any two of them leaves
//! a state the next delivery of the message (or the sweeper, for a message
//! that is gone) continues from, and a provider call repeated after a crash
//! gets the provider's first answer. `captured`, `voided` and `declined` are written
//! in the transaction that gives the order its final status and queues its
//! event, so the event tells what really happened to the money.
//!
//! Read it in this order: [`Processor::handle_all`] here (start the
//! payments, then settle them round by round), [`round`] (one round: where
//! each order stands, its provider call, what to record), [`record`] (how
//! a round's results are recorded), [`pending`] (what a round knows of an
//! order), and [`crate::state`] (the states, the next step from each, what
//! an answer makes of a payment and what the stock allows an order).

mod pending;
mod record;
mod round;

use std::{collections::HashMap, sync::Arc};

use messaging::{
    Topology,
    contracts::{OrderLine, OrderPlaced, Outcome, PaymentOutcome, SCHEMA_VERSION},
};
use pending::Pending;
use platform::{event_log::EventBus, outbox::Outboxed};
use sqlx::{PgPool, types::Json};
use uuid::Uuid;

pub(crate) use record::move_payment;

use crate::{
    payment::{PaymentProvider, ProviderError},
    state::{OrderStatus, PaymentState},
};

/// Name under which this service records the messages it handled.
pub const CONSUMER: &str = "order-processor";

/// Steps one order can take at most; more means the states went round.
const MAX_STEPS: usize = 8;

/// A decided order's event: in the outbox, to publish, or `None` when it
/// was appended to the event log in Postgres (`EVENT_BUS=postgres`), where
/// its readers find it.
pub type Event = Option<Outboxed>;

/// What handling one message did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    /// The order reached a final status, with its event.
    Decided {
        outcome: Outcome,
        payment: PaymentOutcome,
        event: Event,
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
    /// Where the orders' events go: the outbox, or the event log.
    pub event_bus: EventBus,
    pub payments: Arc<dyn PaymentProvider>,
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

/// One order's result: `None` while there is more to do.
type Stepped = Option<Result<Handled, HandleError>>;

impl Processor {
    /// Handle one decoded order message: start the order's payment if it
    /// has none, then take it to the order's final status. Commits before
    /// returning; the caller acks.
    pub async fn handle(&self, order: &OrderPlaced) -> Result<Handled, HandleError> {
        let mut handled = self
            .handle_all(&[(order.clone(), tracing::Span::current())])
            .await?;
        handled.pop().expect("one result per order")
    }

    /// Handle the messages of several orders together, each with the span
    /// its log lines go to: their payments are started in one statement,
    /// then taken to their final statuses in rounds (see [`Self::step_all`]).
    /// One result per order, in their order. `Err` when a statement failed:
    /// what the rounds before it committed stands, and every step is guarded
    /// by the state it leaves, so the messages can be handled again one by
    /// one.
    pub async fn handle_all(
        &self,
        orders: &[(OrderPlaced, tracing::Span)],
    ) -> Result<Vec<Result<Handled, HandleError>>, HandleError> {
        let messages: Vec<&OrderPlaced> = orders.iter().map(|(order, _)| order).collect();
        let (started, known) = self.start_all(&messages).await?;
        let open: Vec<(Uuid, tracing::Span)> = orders
            .iter()
            .zip(&started)
            .filter(|(_, started)| matches!(started, Ok(None)))
            .map(|((order, span), _)| (order.order_id, span.clone()))
            .collect();
        let mut settled = self.settle_all(&open, known).await?.into_iter();
        Ok(started
            .into_iter()
            .map(|started| match started {
                Ok(None) => settled.next().expect("one result per started order"),
                Ok(Some(handled)) => Ok(handled),
                Err(error) => Err(error),
            })
            .collect())
    }

    /// Give the order of this message a payment, `authorising`, unless it
    /// has one; `Some(Duplicate)` if the message or the order was handled
    /// before.
    pub async fn start(&self, order: &OrderPlaced) -> Result<Option<Handled>, HandleError> {
        let (mut started, _) = self.start_all(&[order]).await?;
        started.pop().expect("one answer per order")
    }

    /// [`Self::start`] for several messages, in one statement, which also
    /// reads what the rounds need of each open order and its payment.
    async fn start_all(
        &self,
        orders: &[&OrderPlaced],
    ) -> Result<
        (
            Vec<Result<Option<Handled>, HandleError>>,
            HashMap<Uuid, Pending>,
        ),
        HandleError,
    > {
        if orders.is_empty() {
            return Ok((Vec::new(), HashMap::new()));
        }
        // The amount is the one order-api stored, not the message's. A
        // payment started now is read from what the INSERT returns, one
        // started before from the table. An order that does not exist has no
        // row.
        let found = sqlx::query!(
            r#"WITH input AS (
                 SELECT * FROM unnest($1::uuid[], $2::uuid[]) WITH ORDINALITY AS i(order_id, message_id, n)),
             ordered AS (
                 SELECT i.n, i.message_id AS delivered, o.*,
                        EXISTS (SELECT 1 FROM processed_messages m
                                WHERE m.consumer = $3 AND m.message_id = i.message_id) AS seen
                 FROM input i JOIN orders o ON o.id = i.order_id),
             started AS (
                 INSERT INTO payments (order_id, message_id, amount_cents, currency, state)
                 SELECT id, delivered, total_cents, currency, 'authorising' FROM ordered
                 WHERE status IN ('accepted', 'held') AND NOT seen
                 ON CONFLICT (order_id) DO NOTHING
                 RETURNING order_id, state, reason, message_id)
             SELECT o.n AS "n!", o.seen AS "seen!", o.status AS "status!: OrderStatus",
                    o.id AS "order_id!", coalesce(s.state, p.state) AS "state: PaymentState",
                    coalesce(s.reason, p.reason) AS reason,
                    coalesce(s.message_id, p.message_id) AS message_id,
                    o.customer_id AS "customer_id!", o.email AS "email!",
                    o.items AS "items!: Json<Vec<OrderLine>>", o.total_cents AS "total_cents!",
                    o.currency AS "currency!", o.lane AS "lane!", o.callback_url,
                    o.correlation_id AS "correlation_id!"
             FROM ordered o
             LEFT JOIN started s ON s.order_id = o.id
             LEFT JOIN payments p ON p.order_id = o.id
             ORDER BY o.n"#,
            &orders.iter().map(|o| o.order_id).collect::<Vec<_>>(),
            &orders.iter().map(|o| o.message_id).collect::<Vec<_>>(),
            CONSUMER,
        )
        .fetch_all(&self.pool)
        .await?;
        let mut found = found.into_iter().peekable();
        let mut known = HashMap::new();
        let mut started = Vec::with_capacity(orders.len());
        for (n, order) in (1..).zip(orders) {
            started.push(match found.next_if(|row| row.n == n) {
                None => Err(HandleError::Poison(format!(
                    "order {} does not exist",
                    order.order_id
                ))),
                // An open order (a held one too: its message dead-lettered,
                // now replayed) is taken up, unless this message was handled.
                Some(row) if row.status.is_open() && !row.seen => {
                    // Another processor started the payment after this
                    // statement's snapshot was taken: try again.
                    let (Some(state), Some(message_id)) = (row.state, row.message_id) else {
                        return Err(anyhow::anyhow!(
                            "order {}: its payment was started meanwhile",
                            row.order_id
                        )
                        .into());
                    };
                    let pending = Pending {
                        order_id: row.order_id,
                        state,
                        reason: row.reason,
                        message_id,
                        status: row.status,
                        customer_id: row.customer_id,
                        email: row.email,
                        items: row.items,
                        total_cents: row.total_cents,
                        currency: row.currency,
                        lane: row.lane,
                        callback_url: row.callback_url,
                        correlation_id: row.correlation_id,
                    };
                    known.insert(order.order_id, pending);
                    Ok(None)
                }
                // A redelivery, or another message for an order already
                // decided (a replay): keep the first decision.
                Some(_) => Ok(Some(Handled::Duplicate)),
            });
        }
        Ok((started, known))
    }

    /// Take the payment of `order_id` from wherever it stands to the order's
    /// final status: what a delivery does, and what the sweeper does for a
    /// payment left half done.
    pub async fn settle(&self, order_id: Uuid) -> Result<Handled, HandleError> {
        let mut settled = self
            .settle_all(&[(order_id, tracing::Span::current())], HashMap::new())
            .await?;
        settled.pop().expect("one result per order")
    }

    /// [`Self::settle`] for several orders, round by round, given what is
    /// `known` of some of them already.
    async fn settle_all(
        &self,
        orders: &[(Uuid, tracing::Span)],
        mut known: HashMap<Uuid, Pending>,
    ) -> Result<Vec<Result<Handled, HandleError>>, HandleError> {
        let mut results: Vec<Stepped> = orders.iter().map(|_| None).collect();
        for _ in 0..MAX_STEPS {
            let open: Vec<usize> = (0..orders.len())
                .filter(|&i| results[i].is_none())
                .collect();
            if open.is_empty() {
                break;
            }
            let round: Vec<(Uuid, tracing::Span)> =
                open.iter().map(|&i| orders[i].clone()).collect();
            for (i, stepped) in open
                .into_iter()
                .zip(self.step_all(&round, &mut known).await?)
            {
                results[i] = stepped;
            }
        }
        Ok(results
            .into_iter()
            .zip(orders)
            .map(|(result, (order_id, _))| {
                result.unwrap_or_else(|| {
                    Err(HandleError::Transient(anyhow::anyhow!(
                        "the payment of order {order_id} did not settle in {MAX_STEPS} steps"
                    )))
                })
            })
            .collect())
    }

    /// One step of the payment of `order_id` from its recorded state (the
    /// unit a crash falls between); `None` when there is more to do.
    pub async fn step(&self, order_id: Uuid) -> Result<Option<Handled>, HandleError> {
        let mut stepped = self
            .step_all(&[(order_id, tracing::Span::current())], &mut HashMap::new())
            .await?;
        stepped.pop().expect("one result per order").transpose()
    }
}
