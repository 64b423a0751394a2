//! One order, from its message to its final status, with the money moved
//! as payment providers move it; the states it passes through, and the next
//! step from each, are in [`crate::state`].
//!
//! A step is a provider call (idempotent by a key per order and step)
//! followed by one Postgres transaction that records its result, guarded by
//! the state it leaves; an authorisation is recorded with the decision it
//! leads to (`authorised` then `capturing` or `voiding`, stock reserved), so
//! an order takes two steps, or one when declined. Orders whose messages
//! came together take their steps together: their provider calls run
//! concurrently and one transaction records a round of results with
//! set-based statements. The payment's state is the only memory between
//! steps, so a crash between any two of them leaves a state the next
//! delivery of the message (or the sweeper, for a message that is gone)
//! continues from, and a provider call repeated after a crash gets the
//! provider's first answer. `captured`, `voided` and `declined` are written
//! in the transaction that gives the order its final status and queues its
//! event, so the event tells what really happened to the money.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

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

use crate::{
    payment::{Answer, Call, Charge, Operation, PaymentProvider, ProviderError},
    state::{self, OrderStatus, PaymentState, Step},
};

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
    order_id: Uuid,
    #[sqlx(try_from = "String")]
    state: PaymentState,
    reason: Option<String>,
    message_id: Uuid,
    #[sqlx(try_from = "String")]
    status: OrderStatus,
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

/// One order's result: `None` while there is more to do.
type Stepped = Option<Result<Handled, HandleError>>;

/// A payment moving on to `to`, with its line of history (and, given one,
/// the reason it is being voided).
pub(crate) struct Move {
    pub order_id: Uuid,
    pub to: PaymentState,
    pub reason: Option<String>,
    pub detail: String,
}

/// A payment the provider has settled, to be recorded with the order's
/// final status.
struct Finish<'a> {
    index: usize,
    order_id: Uuid,
    pending: &'a Pending,
    from: PaymentState,
    payment: PaymentOutcome,
    outcome: Outcome,
}

/// What a round does with one order, given its recorded state.
enum Next {
    Call(Operation),
    Decide,
    Over(Result<Handled, HandleError>),
}

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
        let started = self.start_all(&messages).await?;
        let open: Vec<(Uuid, tracing::Span)> = orders
            .iter()
            .zip(&started)
            .filter(|(_, started)| matches!(started, Ok(None)))
            .map(|((order, span), _)| (order.order_id, span.clone()))
            .collect();
        let mut settled = self.settle_all(&open).await?.into_iter();
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
        let mut started = self.start_all(&[order]).await?;
        started.pop().expect("one answer per order")
    }

    /// [`Self::start`] for several messages, in one statement.
    async fn start_all(
        &self,
        orders: &[&OrderPlaced],
    ) -> Result<Vec<Result<Option<Handled>, HandleError>>, HandleError> {
        if orders.is_empty() {
            return Ok(Vec::new());
        }
        // The amount is the one order-api stored, not the message's.
        let found: Vec<(Option<String>, bool)> = sqlx::query_as(
            "WITH input AS (
                 SELECT * FROM unnest($1::uuid[], $2::uuid[]) WITH ORDINALITY AS i(order_id, message_id, n)),
             ordered AS (
                 SELECT i.n, i.message_id, o.id, o.status, o.total_cents, o.currency
                 FROM input i JOIN orders o ON o.id = i.order_id),
             started AS (
                 INSERT INTO payments (order_id, message_id, amount_cents, currency, state)
                 SELECT id, message_id, total_cents, currency, 'authorising' FROM ordered
                 WHERE status IN ('accepted', 'held')
                 ON CONFLICT (order_id) DO NOTHING)
             SELECT o.status,
                    EXISTS (SELECT 1 FROM processed_messages m
                            WHERE m.consumer = $3 AND m.message_id = i.message_id)
             FROM input i LEFT JOIN ordered o ON o.n = i.n
             ORDER BY i.n",
        )
        .bind(orders.iter().map(|o| o.order_id).collect::<Vec<_>>())
        .bind(orders.iter().map(|o| o.message_id).collect::<Vec<_>>())
        .bind(CONSUMER)
        .fetch_all(&self.pool)
        .await?;
        Ok(orders
            .iter()
            .zip(found)
            .map(
                |(order, (status, seen))| match status.map(OrderStatus::try_from) {
                    None => Err(HandleError::Poison(format!(
                        "order {} does not exist",
                        order.order_id
                    ))),
                    // An open order (a held one too: its message dead-lettered,
                    // now replayed) is taken up, unless this message was handled.
                    Some(Ok(status)) if status.is_open() && !seen => Ok(None),
                    // A redelivery, or another message for an order already
                    // decided (a replay): keep the first decision.
                    Some(_) => Ok(Some(Handled::Duplicate)),
                },
            )
            .collect())
    }

    /// Take the payment of `order_id` from wherever it stands to the order's
    /// final status: what a delivery does, and what the sweeper does for a
    /// payment left half done.
    pub async fn settle(&self, order_id: Uuid) -> Result<Handled, HandleError> {
        let mut settled = self
            .settle_all(&[(order_id, tracing::Span::current())])
            .await?;
        settled.pop().expect("one result per order")
    }

    /// [`Self::settle`] for several orders, round by round.
    async fn settle_all(
        &self,
        orders: &[(Uuid, tracing::Span)],
    ) -> Result<Vec<Result<Handled, HandleError>>, HandleError> {
        let mut results: Vec<Stepped> = orders.iter().map(|_| None).collect();
        let mut known = HashMap::new();
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

    /// One step of each order's payment: read where they stand, make their
    /// provider calls concurrently, then record every result in one
    /// transaction (authorisations with the decisions they lead to and the
    /// stock those reserve, and final statuses with their events), each
    /// change guarded by the state it leaves.
    ///
    /// `known` holds what the previous round left each order in, where its
    /// own guarded change made it so; the rest are read now.
    async fn step_all(
        &self,
        orders: &[(Uuid, tracing::Span)],
        known: &mut HashMap<Uuid, Pending>,
    ) -> Result<Vec<Stepped>, HandleError> {
        let unknown: Vec<Uuid> = orders
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| !known.contains_key(id))
            .collect();
        if !unknown.is_empty() {
            let read: Vec<Pending> = sqlx::query_as(
                "SELECT p.order_id, p.state, p.reason, p.message_id, o.status, o.customer_id, o.email,
                        o.items, o.total_cents, o.currency, o.lane, o.callback_url, o.correlation_id
                 FROM payments p JOIN orders o ON o.id = p.order_id WHERE p.order_id = ANY($1)",
            )
            .bind(&unknown)
            .fetch_all(&self.pool)
            .await?;
            known.extend(read.into_iter().map(|pending| (pending.order_id, pending)));
        }
        let pending = &*known;

        let mut results: Vec<Stepped> = orders.iter().map(|_| None).collect();
        let mut calls = Vec::new();
        let mut keys = Vec::new();
        let mut to_decide: Vec<(Uuid, &Pending)> = Vec::new();
        for (index, (order_id, _)) in orders.iter().enumerate() {
            match next(*order_id, pending.get(order_id)) {
                Next::Over(result) => results[index] = Some(result),
                Next::Decide => to_decide.push((*order_id, &pending[order_id])),
                Next::Call(operation) => {
                    calls.push((index, operation, pending[order_id].charge(*order_id)));
                    keys.push(operation.key(*order_id));
                }
            }
        }
        let requests: Vec<Call<'_>> = calls
            .iter()
            .zip(&keys)
            .map(|((_, operation, charge), key)| Call {
                operation: *operation,
                charge: *charge,
                idempotency_key: key,
            })
            .collect();
        let answers = self.payments.call_all(&requests).await?;

        let mut authorisations = Vec::new();
        let mut finishes = Vec::new();
        let mut refusals = Vec::new();
        for ((index, operation, _), answer) in calls.into_iter().zip(answers) {
            let order_id = orders[index].0;
            let pending = &pending[&order_id];
            let finish = |from, payment, outcome| Finish {
                index,
                order_id,
                pending,
                from,
                payment,
                outcome,
            };
            match (operation, answer) {
                (_, Err(error)) => results[index] = Some(Err(error.into())),
                (Operation::Authorise, Ok(Answer::Authorised)) => authorisations.push(Move {
                    order_id,
                    to: PaymentState::Authorised,
                    reason: None,
                    detail: format!("{} authorised", pending.amount()),
                }),
                (Operation::Authorise, Ok(Answer::Declined)) => finishes.push(finish(
                    PaymentState::Authorising,
                    PaymentOutcome::Declined,
                    Outcome::Rejected {
                        reason: "payment_declined".into(),
                    },
                )),
                (Operation::Capture, Ok(Answer::Captured)) => finishes.push(finish(
                    PaymentState::Capturing,
                    PaymentOutcome::Captured,
                    Outcome::Processed,
                )),
                (Operation::Void, Ok(Answer::Voided)) => finishes.push(finish(
                    PaymentState::Voiding,
                    PaymentOutcome::Voided,
                    Outcome::Rejected {
                        reason: pending.reason.clone().unwrap_or_else(|| "voided".into()),
                    },
                )),
                (operation, Ok(answer)) => refusals.push((index, operation, answer)),
            }
        }

        let (authorised, decided, decisions) =
            if authorisations.is_empty() && finishes.is_empty() && to_decide.is_empty() {
                (Vec::new(), Vec::new(), Vec::new())
            } else {
                let mut tx = self.pool.begin().await?;
                let authorised = move_payments(
                    &mut *tx,
                    &authorisations,
                    &[PaymentState::Authorising],
                    CONSUMER,
                )
                .await?;
                let decided = self.finish_all(&mut tx, &finishes).await?;
                // An authorisation is decided in the transaction that records
                // it: one commit fewer on every order's way.
                to_decide.extend(authorised.iter().map(|id| (*id, &pending[id])));
                // Last, so the stock rows stay locked only until the commit.
                let decisions = decide_all(&mut tx, &to_decide).await?;
                tx.commit().await?;
                (authorised, decided, decisions)
            };

        let spans: HashMap<Uuid, &tracing::Span> =
            orders.iter().map(|(id, span)| (*id, span)).collect();
        let span_of = |order_id: Uuid| spans[&order_id];
        for moved in &authorised {
            let amount = pending[moved].amount();
            span_of(*moved).in_scope(|| tracing::info!("payment of {amount} authorised"));
        }
        for decision in &decisions {
            span_of(decision.order_id).in_scope(|| tracing::info!("{}", decision.detail));
        }
        for (finish, event) in finishes.into_iter().zip(decided) {
            let Some(event) = event else { continue };
            span_of(finish.order_id)
                .in_scope(|| announce(finish.pending, &finish.outcome, finish.payment));
            results[finish.index] = Some(Ok(Handled::Decided {
                outcome: finish.outcome,
                payment: finish.payment,
                event,
            }));
        }
        for (index, operation, answer) in refusals {
            let (order_id, from) = (orders[index].0, pending[&orders[index].0].state);
            if let Err(error) = self.refused(order_id, from, operation, answer).await {
                results[index] = Some(Err(error));
            }
        }

        // What this round's own changes made of the orders; any other is
        // read again next round.
        let mut advanced: HashMap<Uuid, (PaymentState, Option<String>)> = authorised
            .iter()
            .map(|id| (*id, (PaymentState::Authorised, None)))
            .chain(
                decisions
                    .into_iter()
                    .map(|m| (m.order_id, (m.to, m.reason))),
            )
            .collect();
        for (order_id, _) in orders {
            match (advanced.remove(order_id), known.get_mut(order_id)) {
                (Some((state, reason)), Some(pending)) => {
                    pending.state = state;
                    pending.reason = reason.or(pending.reason.take());
                }
                _ => {
                    known.remove(order_id);
                }
            }
        }
        Ok(results)
    }

    /// An answer the step cannot use: if the payment has moved on meanwhile
    /// (the sweeper voided it), follow it; otherwise the message is poison
    /// and the payment waits, as it is, for the sweeper.
    async fn refused(
        &self,
        order_id: Uuid,
        from: PaymentState,
        operation: Operation,
        answer: Answer,
    ) -> Result<(), HandleError> {
        let state: String = sqlx::query_scalar("SELECT state FROM payments WHERE order_id = $1")
            .bind(order_id)
            .fetch_one(&self.pool)
            .await?;
        if state != from.as_str() {
            return Ok(());
        }
        Err(HandleError::Poison(format!(
            "payment provider answered {answer:?} to {operation} for order {order_id}"
        )))
    }

    /// The money has moved as the provider confirmed: for each payment still
    /// where the provider found it, its final state, the order's final
    /// status, its history, its event and the message's record as handled.
    /// The event of each finish, or `None` where someone else finished it.
    async fn finish_all(
        &self,
        tx: &mut PgConnection,
        finishes: &[Finish<'_>],
    ) -> Result<Vec<Option<Outboxed>>, HandleError> {
        if finishes.is_empty() {
            return Ok(Vec::new());
        }
        let moved: HashSet<Uuid> = sqlx::query_scalar(
            "UPDATE payments p SET state = i.state, updated_at = now()
             FROM unnest($1::uuid[], $2::text[], $3::text[]) AS i(order_id, from_state, state), orders o
             WHERE p.order_id = i.order_id AND p.state = i.from_state
               AND o.id = p.order_id AND o.status IN ('accepted', 'held')
             RETURNING p.order_id",
        )
        .bind(finishes.iter().map(|f| f.order_id).collect::<Vec<_>>())
        .bind(finishes.iter().map(|f| f.from.as_str()).collect::<Vec<_>>())
        .bind(finishes.iter().map(|f| f.payment.as_str()).collect::<Vec<_>>())
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect();
        let done: Vec<&Finish<'_>> = finishes
            .iter()
            .filter(|f| moved.contains(&f.order_id))
            .collect();
        if done.is_empty() {
            return Ok(finishes.iter().map(|_| None).collect());
        }
        let details: Vec<(String, String)> = done.iter().map(|f| f.details()).collect();
        // The decisions, both histories and the messages' records in one
        // round trip; the guarded UPDATE above let one transaction through.
        sqlx::query(
            "WITH input AS (
                 SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[],
                                      $6::text[], $7::uuid[])
                     AS i(order_id, status, reason, order_detail, payment_state, payment_detail, message_id)),
             decided AS (
                 UPDATE orders o SET status = i.status, reason = i.reason, processed_by = $8, updated_at = now()
                 FROM input i WHERE o.id = i.order_id RETURNING o.id),
             paid AS (
                 INSERT INTO payment_history (order_id, state, detail, service)
                 SELECT i.order_id, i.payment_state, i.payment_detail, 'order-processor'
                 FROM input i JOIN decided d ON d.id = i.order_id),
             handled AS (
                 INSERT INTO processed_messages (consumer, message_id)
                 SELECT $9, message_id FROM input
                 ON CONFLICT DO NOTHING)
             INSERT INTO order_status_history (order_id, status, detail, service)
             SELECT i.order_id, i.status, i.order_detail, 'order-processor'
             FROM input i JOIN decided d ON d.id = i.order_id",
        )
        .bind(done.iter().map(|f| f.order_id).collect::<Vec<_>>())
        .bind(done.iter().map(|f| f.outcome.status()).collect::<Vec<_>>())
        .bind(done.iter().map(|f| f.reason()).collect::<Vec<_>>())
        .bind(details.iter().map(|(_, order)| order.as_str()).collect::<Vec<_>>())
        .bind(done.iter().map(|f| f.payment.as_str()).collect::<Vec<_>>())
        .bind(details.iter().map(|(payment, _)| payment.as_str()).collect::<Vec<_>>())
        .bind(done.iter().map(|f| f.pending.message_id).collect::<Vec<_>>())
        .bind(&self.instance_id)
        .bind(CONSUMER)
        .execute(&mut *tx)
        .await?;
        let events: Vec<(OrderEvent, Envelope, serde_json::Value)> = done
            .iter()
            .map(|f| self.event(f))
            .collect::<Result<_, _>>()?;
        let exchange = self.topology.events_exchange();
        let messages = events
            .iter()
            .map(|(_, envelope, payload)| outbox::Message {
                exchange: &exchange,
                routing_key: "",
                envelope: envelope.clone(),
                payload,
            })
            .collect();
        let mut queued = outbox::enqueue_all(tx, messages).await?.into_iter();
        Ok(finishes
            .iter()
            .map(|f| {
                moved
                    .contains(&f.order_id)
                    .then(|| queued.next().expect("one event per finish"))
            })
            .collect())
    }

    /// The event announcing a finished order, its envelope and its payload.
    fn event(
        &self,
        finish: &Finish<'_>,
    ) -> Result<(OrderEvent, Envelope, serde_json::Value), HandleError> {
        let pending = finish.pending;
        let lane = match pending.lane.as_str() {
            "express" => Lane::Express,
            _ => Lane::Standard,
        };
        let event = OrderEvent {
            schema_version: SCHEMA_VERSION,
            message_id: Uuid::new_v4(),
            occurred_at: Utc::now(),
            outcome: finish.outcome.clone(),
            order_id: finish.order_id,
            customer_id: pending.customer_id.clone(),
            email: pending.email.clone(),
            total_cents: pending.total_cents,
            currency: pending.currency.clone(),
            lane,
            processed_by: self.instance_id.clone(),
            callback_url: pending.callback_url.clone(),
            payment: Some(finish.payment),
            items: pending.items.0.clone(),
        };
        let envelope = Envelope {
            message_id: event.message_id,
            correlation_id: pending.correlation_id.clone(),
            order_id: finish.order_id,
        };
        let payload = serde_json::to_value(&event).map_err(anyhow::Error::from)?;
        Ok((event, envelope, payload))
    }
}

impl Finish<'_> {
    fn reason(&self) -> Option<&str> {
        match &self.outcome {
            Outcome::Rejected { reason } => Some(reason.as_str()),
            Outcome::Processed => None,
        }
    }

    /// The payment's line of history and the order's.
    fn details(&self) -> (String, String) {
        let amount = self.pending.amount();
        match (&self.outcome, self.payment) {
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
        }
    }
}

/// What to do with an order in its recorded state.
fn next(order_id: Uuid, pending: Option<&Pending>) -> Next {
    let Some(pending) = pending else {
        return Next::Over(Err(HandleError::Poison(format!(
            "order {order_id} has no payment"
        ))));
    };
    match state::next(pending.status, pending.state) {
        Step::Call(operation) => Next::Call(operation),
        Step::Decide => Next::Decide,
        Step::Done => Next::Over(Ok(Handled::Duplicate)),
        Step::Inconsistent => Next::Over(Err(HandleError::Poison(format!(
            "order {order_id} is not final but its payment is {}",
            pending.state
        )))),
    }
}

/// The authorisations are held: reserve each order's stock and decide to
/// capture, or, short of stock, to void. The decision is the payment's next
/// state, recorded with the reservation. The payments are locked in order
/// id order and the stock rows of the whole batch in SKU order, so
/// processors cannot deadlock; each order takes all its lines or none, in
/// the order the orders came. Returns the decisions made.
async fn decide_all(tx: &mut PgConnection, orders: &[(Uuid, &Pending)]) -> sqlx::Result<Vec<Move>> {
    if orders.is_empty() {
        return Ok(Vec::new());
    }
    let mut ids: Vec<Uuid> = orders.iter().map(|(id, _)| *id).collect();
    ids.sort();
    let locked: HashSet<Uuid> = sqlx::query_scalar(
        "SELECT o.id FROM orders o JOIN payments p ON p.order_id = o.id
         WHERE o.id = ANY($1) AND o.status IN ('accepted', 'held') AND p.state = 'authorised'
         ORDER BY o.id FOR UPDATE",
    )
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .collect();
    let orders: Vec<&(Uuid, &Pending)> = orders
        .iter()
        .filter(|(id, _)| locked.contains(id))
        .collect();
    let skus: BTreeSet<&str> = orders
        .iter()
        .flat_map(|(_, pending)| pending.items.iter().map(|line| line.sku.as_str()))
        .collect();
    let mut stock: HashMap<String, i64> = sqlx::query_as::<_, (String, i32)>(
        "SELECT sku, stock FROM inventory WHERE sku = ANY($1) ORDER BY sku FOR UPDATE",
    )
    .bind(skus.into_iter().collect::<Vec<_>>())
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(|(sku, stock)| (sku, i64::from(stock)))
    .collect();

    let mut taken: BTreeMap<String, i64> = BTreeMap::new();
    let mut decisions = Vec::with_capacity(orders.len());
    for (order_id, pending) in orders {
        let mut needed: BTreeMap<&str, i64> = BTreeMap::new();
        for line in pending.items.iter() {
            *needed.entry(line.sku.as_str()).or_default() += i64::from(line.quantity);
        }
        let short = needed
            .iter()
            .find(|(sku, quantity)| stock.get(**sku).is_none_or(|left| left < *quantity));
        let amount = pending.amount();
        decisions.push(match short {
            None => {
                for (sku, quantity) in needed {
                    *stock.get_mut(sku).expect("a locked stock row") -= quantity;
                    *taken.entry(sku.to_owned()).or_default() += quantity;
                }
                Move {
                    order_id: *order_id,
                    to: PaymentState::Capturing,
                    reason: None,
                    detail: format!("stock reserved; capturing {amount}"),
                }
            }
            Some((sku, _)) => {
                let reason = format!("out_of_stock: {sku}");
                Move {
                    order_id: *order_id,
                    to: PaymentState::Voiding,
                    detail: format!("{reason}; voiding the authorisation of {amount}"),
                    reason: Some(reason),
                }
            }
        });
    }
    if !taken.is_empty() {
        let (skus, quantities): (Vec<String>, Vec<i64>) = taken.into_iter().unzip();
        // The rows are locked and hold enough: the guard only restates it.
        sqlx::query(
            "UPDATE inventory i SET stock = i.stock - t.taken
             FROM unnest($1::text[], $2::int8[]) AS t(sku, taken)
             WHERE i.sku = t.sku AND i.stock >= t.taken",
        )
        .bind(&skus)
        .bind(&quantities)
        .execute(&mut *tx)
        .await?;
    }
    // The payments are locked and were `authorised`: this moves them.
    move_payments(&mut *tx, &decisions, &[PaymentState::Authorised], CONSUMER).await?;
    Ok(decisions)
}

/// Move the payment of `order_id` from one of `from` to `to` with a
/// line of history by `service` (and, given one, the reason it is being
/// voided), in one statement; `false` if it was in none of `from`.
pub(crate) async fn move_payment(
    conn: impl sqlx::PgExecutor<'_>,
    order_id: Uuid,
    from: &[PaymentState],
    to: PaymentState,
    reason: Option<&str>,
    detail: &str,
    service: &str,
) -> sqlx::Result<bool> {
    let step = Move {
        order_id,
        to,
        reason: reason.map(str::to_owned),
        detail: detail.to_owned(),
    };
    Ok(!move_payments(conn, &[step], from, service)
        .await?
        .is_empty())
}

/// [`move_payment`] for several payments, in one statement; returns the
/// orders whose payments moved.
pub(crate) async fn move_payments(
    conn: impl sqlx::PgExecutor<'_>,
    moves: &[Move],
    from: &[PaymentState],
    service: &str,
) -> sqlx::Result<Vec<Uuid>> {
    if moves.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query_scalar(
        "WITH input AS (
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[])
                 AS i(order_id, state, reason, detail)),
         moved AS (
             UPDATE payments p SET state = i.state, reason = coalesce(i.reason, p.reason), updated_at = now()
             FROM input i WHERE p.order_id = i.order_id AND p.state = ANY($5)
             RETURNING p.order_id, i.state, i.detail)
         INSERT INTO payment_history (order_id, state, detail, service)
         SELECT order_id, state, detail, $6 FROM moved
         RETURNING order_id",
    )
    .bind(moves.iter().map(|m| m.order_id).collect::<Vec<_>>())
    .bind(moves.iter().map(|m| m.to.as_str()).collect::<Vec<_>>())
    .bind(moves.iter().map(|m| m.reason.as_deref()).collect::<Vec<_>>())
    .bind(moves.iter().map(|m| m.detail.as_str()).collect::<Vec<_>>())
    .bind(from.iter().map(|s| s.as_str()).collect::<Vec<_>>())
    .bind(service)
    .fetch_all(conn)
    .await
}

/// Count the decision and say in the log what happened, money included.
fn announce(pending: &Pending, outcome: &Outcome, payment: PaymentOutcome) {
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
