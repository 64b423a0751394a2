//! One round of a batch: where each order stands, the provider calls its
//! state asks for (made concurrently), and what they answered, recorded
//! (see [`super::record`]).

use std::collections::HashMap;

use messaging::contracts::{OrderLine, Outcome, PaymentOutcome};
use sqlx::types::Json;
use uuid::Uuid;

use super::{
    Event, HandleError, Handled, Processor, Stepped,
    pending::Pending,
    record::{Finish, Move, decide_all},
};
use crate::{
    payment::{self, Answer, Call, Operation},
    state::{self, Answered, OrderStatus, PaymentState, Step},
};

/// One order in a round: what the round does with it, then what came of it.
enum Work<'a> {
    /// Nothing to do this round: the order's result.
    Over(Result<Handled, HandleError>),
    /// Ask the provider.
    Call(Operation, &'a Pending),
    /// Reserve its stock and decide (its authorisation is held).
    Decide(&'a Pending),
    /// Record that the provider settled the money.
    Finish(Finish<'a>),
    /// The provider refused the call the payment's state asked for.
    Refused(Operation, Answer, &'a Pending),
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
        self.read_unknown(orders, known).await?;
        let pending = &*known;

        // Where each order stands, and the provider's answers to the calls
        // that asks for.
        let mut work: Vec<Work<'_>> = orders
            .iter()
            .map(|(order_id, _)| plan(*order_id, pending.get(order_id)))
            .collect();
        self.call_provider(&mut work).await;

        // What the answers make of the payments, recorded.
        let to_decide: Vec<(Uuid, &Pending)> = work
            .iter()
            .filter_map(|work| match work {
                Work::Decide(pending) => Some((pending.order_id, *pending)),
                _ => None,
            })
            .collect();
        let mut decisions: HashMap<Uuid, Move> = if to_decide.is_empty() {
            HashMap::new()
        } else {
            let mut tx = self.pool.begin().await?;
            let decisions = decide_all(&mut tx, &to_decide).await?;
            tx.commit().await?;
            decisions.into_iter().map(|m| (m.order_id, m)).collect()
        };
        let finishes: Vec<&Finish<'_>> = work
            .iter()
            .filter_map(|work| match work {
                Work::Finish(finish) => Some(finish),
                _ => None,
            })
            .collect();
        let mut events: HashMap<Uuid, Event> = finishes
            .iter()
            .map(|finish| finish.order_id)
            .zip(self.finish_all(&finishes).await?)
            .filter_map(|(order_id, event)| Some((order_id, event?)))
            .collect();

        // Each order's result, told in its own log lines, and what this
        // round's own changes made of the orders (any other is read again
        // next round).
        let mut results = Vec::with_capacity(orders.len());
        let mut advanced: HashMap<Uuid, (PaymentState, Option<String>)> = HashMap::new();
        for ((order_id, span), work) in orders.iter().zip(work) {
            let stepped = match work {
                Work::Over(result) => Some(result),
                Work::Call(..) => unreachable!("every call was answered"),
                Work::Decide(_) => {
                    if let Some(decision) = decisions.remove(order_id) {
                        span.in_scope(|| tracing::info!("{}", decision.detail));
                        advanced.insert(*order_id, (decision.to, decision.reason));
                    }
                    None
                }
                // `None` where someone else finished it: read again.
                Work::Finish(finish) => events.remove(order_id).map(|event| {
                    span.in_scope(|| announce(finish.pending, &finish.outcome, finish.payment));
                    Ok(Handled::Decided {
                        outcome: finish.outcome,
                        payment: finish.payment,
                        event,
                    })
                }),
                Work::Refused(operation, answer, pending) => self
                    .refused(*order_id, pending.state, operation, answer)
                    .await
                    .err()
                    .map(Err),
            };
            results.push(stepped);
        }

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

    /// Read what the round needs of the orders not in `known`.
    async fn read_unknown(
        &self,
        orders: &[(Uuid, tracing::Span)],
        known: &mut HashMap<Uuid, Pending>,
    ) -> Result<(), HandleError> {
        let unknown: Vec<Uuid> = orders
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| !known.contains_key(id))
            .collect();
        if unknown.is_empty() {
            return Ok(());
        }
        let read = sqlx::query_as!(
            Pending,
            r#"SELECT p.order_id, p.state AS "state: PaymentState", p.reason, p.message_id,
                      o.status AS "status: OrderStatus", o.customer_id, o.email,
                      o.items AS "items: Json<Vec<OrderLine>>", o.total_cents, o.currency, o.lane,
                      o.callback_url, o.correlation_id
               FROM payments p JOIN orders o ON o.id = p.order_id WHERE p.order_id = ANY($1)"#,
            &unknown,
        )
        .fetch_all(&self.pool)
        .await?;
        known.extend(read.into_iter().map(|pending| (pending.order_id, pending)));
        Ok(())
    }

    /// Make the round's provider calls concurrently, and put in each
    /// call's place what its answer makes of the payment.
    async fn call_provider(&self, work: &mut [Work<'_>]) {
        let calls: Vec<(Operation, &Pending, String)> = work
            .iter()
            .filter_map(|work| match work {
                Work::Call(operation, pending) => {
                    Some((*operation, *pending, operation.key(pending.order_id)))
                }
                _ => None,
            })
            .collect();
        let requests: Vec<Call<'_>> = calls
            .iter()
            .map(|(operation, pending, key)| Call {
                operation: *operation,
                charge: pending.charge(pending.order_id),
                idempotency_key: key,
            })
            .collect();
        let mut answers = payment::call_all(&*self.payments, &requests)
            .await
            .into_iter();
        for work in work.iter_mut() {
            let Work::Call(operation, pending) = *work else {
                continue;
            };
            let answer = answers.next().expect("one answer per call");
            *work = match answer {
                Err(error) => Work::Over(Err(error.into())),
                Ok(answer) => {
                    match state::answered(operation, &answer, pending.reason.as_deref()) {
                        Answered::Decide => Work::Decide(pending),
                        Answered::Finish {
                            from,
                            payment,
                            outcome,
                        } => Work::Finish(Finish {
                            order_id: pending.order_id,
                            pending,
                            from,
                            payment,
                            outcome,
                        }),
                        Answered::Refused => Work::Refused(operation, answer, pending),
                    }
                }
            };
        }
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
        let state = sqlx::query_scalar!(
            r#"SELECT state AS "state: PaymentState" FROM payments WHERE order_id = $1"#,
            order_id
        )
        .fetch_one(&self.pool)
        .await?;
        if state != from {
            return Ok(());
        }
        Err(HandleError::Poison(format!(
            "payment provider answered {answer:?} to {operation} for order {order_id}"
        )))
    }
}

/// What a round does with an order in its recorded state.
fn plan(order_id: Uuid, pending: Option<&Pending>) -> Work<'_> {
    let Some(pending) = pending else {
        return Work::Over(Err(HandleError::Poison(format!(
            "order {order_id} has no payment"
        ))));
    };
    match state::next(pending.status, pending.state) {
        Step::Call(operation) => Work::Call(operation, pending),
        Step::Decide => Work::Decide(pending),
        Step::Done => Work::Over(Ok(Handled::Duplicate)),
        Step::Inconsistent => Work::Over(Err(HandleError::Poison(format!(
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
