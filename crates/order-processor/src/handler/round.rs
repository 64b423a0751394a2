//! One round of a batch: where each order stands, the provider calls its
//! state asks for (made concurrently), and what they answered, recorded
//! (see [`super::record`]).

use std::collections::HashMap;

use messaging::contracts::{Outcome, PaymentOutcome};
use uuid::Uuid;

use super::{
    HandleError, Handled, Processor, Stepped,
    pending::Pending,
    record::{Finish, decide_all},
};
use crate::{
    payment::{self, Answer, Call, Operation},
    state::{self, PaymentState, Step},
};

/// What a round does with one order, given its recorded state.
enum Next {
    Call(Operation),
    Decide,
    Over(Result<Handled, HandleError>),
}

impl Processor {
    /// One step of each order's payment: read where they stand, make their
    /// provider calls concurrently, then record what they answered: the
    /// authorisations with the decisions they lead to and the stock those
    /// reserve, in one transaction; the final statuses with their events, in
    /// one statement. Each change is guarded by the state it leaves.
    ///
    /// `known` holds what the previous round left each order in, where its
    /// own guarded change made it so; the rest are read now.
    pub(super) async fn step_all(
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
        let answers = payment::call_all(&*self.payments, &requests).await;

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
                // Decided in the transaction that records it: the payment
                // goes from `authorising` to `capturing` or `voiding`.
                (Operation::Authorise, Ok(Answer::Authorised)) => {
                    to_decide.push((order_id, pending))
                }
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

        let decisions = if to_decide.is_empty() {
            Vec::new()
        } else {
            let mut tx = self.pool.begin().await?;
            let decisions = decide_all(&mut tx, &to_decide).await?;
            tx.commit().await?;
            decisions
        };
        let decided = self.finish_all(&finishes).await?;

        let spans: HashMap<Uuid, &tracing::Span> =
            orders.iter().map(|(id, span)| (*id, span)).collect();
        let span_of = |order_id: Uuid| spans[&order_id];
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
        let mut advanced: HashMap<Uuid, (PaymentState, Option<String>)> = decisions
            .into_iter()
            .map(|m| (m.order_id, (m.to, m.reason)))
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
