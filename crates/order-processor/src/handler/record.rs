//! What a round records: authorisations with the decisions they lead to
//! (stock reserved, or not), in one transaction of two statements (lock the
//! stock, then record); finished payments with the order's final status and
//! its event, in one statement. Every change is guarded by the state it
//! leaves, so a change someone else made first is not made twice.

use std::collections::{BTreeSet, HashMap, HashSet};

use chrono::Utc;
use messaging::{
    amqp::Envelope,
    contracts::{Lane, OrderEvent, Outcome, PaymentOutcome, SCHEMA_VERSION},
};
use platform::{event_log::EventBus, outbox::Outboxed};
use sqlx::PgConnection;
use uuid::Uuid;

use super::{CONSUMER, Event, HandleError, Processor, pending::Pending};
use crate::state::{self, PaymentState};

/// A payment moving from `from` on to `to`, with its line of history (and,
/// given one, the reason it is being voided).
pub(super) struct Move {
    pub(super) order_id: Uuid,
    pub(super) from: PaymentState,
    pub(super) to: PaymentState,
    pub(super) reason: Option<String>,
    pub(super) detail: String,
}

/// A payment the provider has settled, to be recorded with the order's
/// final status.
pub(super) struct Finish<'a> {
    pub(super) order_id: Uuid,
    pub(super) pending: &'a Pending,
    pub(super) from: PaymentState,
    pub(super) payment: PaymentOutcome,
    pub(super) outcome: Outcome,
}

impl Processor {
    /// The money has moved as the provider confirmed: for each payment still
    /// where the provider found it, its final state, the order's final
    /// status, both histories, the message's record as handled and the
    /// order's event (in the outbox, or appended to the event log with
    /// `EVENT_BUS=postgres`), in one statement (and so one transaction).
    /// Each finish's event, or `None` where someone else finished it.
    pub(super) async fn finish_all(
        &self,
        finishes: &[&Finish<'_>],
    ) -> Result<Vec<Option<Event>>, HandleError> {
        if finishes.is_empty() {
            return Ok(Vec::new());
        }
        let details: Vec<(String, String)> = finishes.iter().map(|f| f.details()).collect();
        let events: Vec<(Envelope, String)> = finishes
            .iter()
            .map(|f| self.event(f))
            .collect::<Result<_, _>>()?;
        let exchange = self.topology.events_exchange();
        let logged = self.event_bus == EventBus::Postgres;
        // `moved` lets through only the payments still where the provider
        // found it, of orders still open; everything else follows it.
        let written = sqlx::query!(
            r#"WITH input AS (
                 SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[],
                                      $6::text[], $7::text[], $8::uuid[], $9::uuid[], $10::text[],
                                      $11::text[])
                     AS i(order_id, from_state, payment_state, status, reason, order_detail,
                          payment_detail, message_id, event_id, event, correlation_id)),
             moved AS (
                 UPDATE payments p SET state = i.payment_state, updated_at = now()
                 FROM input i, orders o
                 WHERE p.order_id = i.order_id AND p.state = i.from_state
                   AND o.id = p.order_id AND o.status IN ('accepted', 'held')
                 RETURNING p.order_id),
             decided AS (
                 UPDATE orders o SET status = i.status, reason = i.reason, processed_by = $12, updated_at = now()
                 FROM input i JOIN moved USING (order_id) WHERE o.id = i.order_id),
             paid AS (
                 INSERT INTO payment_history (order_id, state, detail, service)
                 SELECT order_id, i.payment_state, i.payment_detail, $13
                 FROM input i JOIN moved USING (order_id)),
             told AS (
                 INSERT INTO order_status_history (order_id, status, detail, service)
                 SELECT order_id, i.status, i.order_detail, $13
                 FROM input i JOIN moved USING (order_id)),
             handled AS (
                 INSERT INTO processed_messages (consumer, message_id)
                 SELECT $13, i.message_id FROM input i JOIN moved USING (order_id)
                 ON CONFLICT DO NOTHING),
             outboxed AS (
                 INSERT INTO outbox (message_id, exchange, routing_key, payload, correlation_id, order_id)
                 SELECT i.event_id, $14, '', i.event::jsonb, i.correlation_id, order_id
                 FROM input i JOIN moved USING (order_id) WHERE NOT $15
                 RETURNING order_id, id),
             logged AS (
                 INSERT INTO events (message_id, order_id, correlation_id, body)
                 SELECT i.event_id, order_id, i.correlation_id, i.event::jsonb
                 FROM input i JOIN moved USING (order_id) WHERE $15
                 RETURNING order_id, id)
             SELECT order_id AS "order_id!", id AS "id!" FROM outboxed
             UNION ALL SELECT order_id, id FROM logged"#,
            &finishes.iter().map(|f| f.order_id).collect::<Vec<_>>(),
            &finishes.iter().map(|f| f.from.as_str()).collect::<Vec<_>>() as &[&str],
            &finishes.iter().map(|f| f.payment.as_str()).collect::<Vec<_>>() as &[&str],
            &finishes.iter().map(|f| f.outcome.status()).collect::<Vec<_>>() as &[&str],
            &finishes.iter().map(|f| f.reason()).collect::<Vec<_>>() as &[Option<&str>],
            &details.iter().map(|(_, order)| order.as_str()).collect::<Vec<_>>() as &[&str],
            &details.iter().map(|(payment, _)| payment.as_str()).collect::<Vec<_>>() as &[&str],
            &finishes.iter().map(|f| f.pending.message_id).collect::<Vec<_>>(),
            &events.iter().map(|(envelope, _)| envelope.message_id).collect::<Vec<_>>(),
            &events.iter().map(|(_, body)| body.as_str()).collect::<Vec<_>>() as &[&str],
            &events.iter().map(|(envelope, _)| envelope.correlation_id.as_str()).collect::<Vec<_>>() as &[&str],
            &self.instance_id,
            CONSUMER,
            &exchange,
            logged,
        )
        .fetch_all(&self.pool)
        .await?;
        let ids: HashMap<Uuid, i64> = written
            .into_iter()
            .map(|row| (row.order_id, row.id))
            .collect();
        Ok(finishes
            .iter()
            .zip(events)
            .map(|(finish, (envelope, body))| {
                let id = *ids.get(&finish.order_id)?;
                Some(
                    (!logged).then(|| {
                        Outboxed::new(id, exchange.clone(), String::new(), body, envelope)
                    }),
                )
            })
            .collect())
    }

    /// The event announcing a finished order: its envelope and its body.
    fn event(&self, finish: &Finish<'_>) -> Result<(Envelope, String), HandleError> {
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
        let body = serde_json::to_string(&event).map_err(anyhow::Error::from)?;
        Ok((envelope, body))
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

/// The authorisations are held: reserve each order's stock and decide to
/// capture, or, short of stock, to void. The decision is the payment's next
/// state, recorded with the reservation in one statement, for the payments
/// still where the round found them: a payment someone else moved meanwhile
/// (the sweeper) is left to them, and its stock is not taken. The stock
/// rows of the whole batch are locked first, in SKU order, and only then
/// the payments, so processors cannot deadlock; each order takes all its
/// lines or none, in the order the orders came. Returns the decisions made.
pub(super) async fn decide_all(
    tx: &mut PgConnection,
    orders: &[(Uuid, &Pending)],
) -> sqlx::Result<Vec<Move>> {
    if orders.is_empty() {
        return Ok(Vec::new());
    }
    let skus: BTreeSet<&str> = orders
        .iter()
        .flat_map(|(_, pending)| pending.items.iter().map(|line| line.sku.as_str()))
        .collect();
    let mut stock: HashMap<String, i64> = sqlx::query!(
        "SELECT sku, stock FROM inventory WHERE sku = ANY($1) ORDER BY sku FOR UPDATE",
        &skus.into_iter().collect::<Vec<_>>() as &[&str],
    )
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(|row| (row.sku, i64::from(row.stock)))
    .collect();

    // What each order takes: (order, sku, quantity).
    let mut taken: Vec<(Uuid, &str, i64)> = Vec::new();
    let mut decisions = Vec::with_capacity(orders.len());
    for (order_id, pending) in orders {
        let lines = pending
            .items
            .iter()
            .map(|line| (line.sku.as_str(), i64::from(line.quantity)));
        let amount = pending.amount();
        decisions.push(match state::reserve(&mut stock, lines) {
            Ok(reserved) => {
                taken.extend(reserved.into_iter().map(|(sku, n)| (*order_id, sku, n)));
                Move {
                    order_id: *order_id,
                    from: pending.state,
                    to: PaymentState::Capturing,
                    reason: None,
                    detail: format!("{amount} authorised, stock reserved; capturing"),
                }
            }
            Err(sku) => {
                let reason = format!("out_of_stock: {sku}");
                Move {
                    order_id: *order_id,
                    from: pending.state,
                    to: PaymentState::Voiding,
                    detail: format!("{amount} authorised, but {reason}; voiding"),
                    reason: Some(reason),
                }
            }
        });
    }
    // The stock rows are locked and hold enough for every order: the
    // guard on the stock only restates it.
    let moved: HashSet<Uuid> = sqlx::query_scalar!(
        "WITH input AS (
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[])
                 AS i(order_id, from_state, state, reason, detail)),
         moved AS (
             UPDATE payments p SET state = i.state, reason = coalesce(i.reason, p.reason), updated_at = now()
             FROM input i, orders o
             WHERE p.order_id = i.order_id AND p.state = i.from_state
               AND o.id = p.order_id AND o.status IN ('accepted', 'held')
             RETURNING p.order_id, i.state, i.detail),
         taken AS (
             UPDATE inventory s SET stock = s.stock - t.quantity
             FROM (SELECT l.sku, sum(l.quantity) AS quantity
                   FROM unnest($6::uuid[], $7::text[], $8::int8[]) AS l(order_id, sku, quantity)
                   JOIN moved USING (order_id) GROUP BY l.sku) t
             WHERE s.sku = t.sku AND s.stock >= t.quantity)
         INSERT INTO payment_history (order_id, state, detail, service)
         SELECT order_id, state, detail, $9 FROM moved
         RETURNING order_id",
        &decisions.iter().map(|m| m.order_id).collect::<Vec<_>>(),
        &decisions.iter().map(|m| m.from.as_str()).collect::<Vec<_>>() as &[&str],
        &decisions.iter().map(|m| m.to.as_str()).collect::<Vec<_>>() as &[&str],
        &decisions.iter().map(|m| m.reason.as_deref()).collect::<Vec<_>>() as &[Option<&str>],
        &decisions.iter().map(|m| m.detail.as_str()).collect::<Vec<_>>() as &[&str],
        &taken.iter().map(|(id, _, _)| *id).collect::<Vec<_>>(),
        &taken.iter().map(|(_, sku, _)| *sku).collect::<Vec<_>>() as &[&str],
        &taken.iter().map(|(_, _, quantity)| *quantity).collect::<Vec<_>>(),
        CONSUMER,
    )
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .collect();
    decisions.retain(|decision| moved.contains(&decision.order_id));
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
    let moved = sqlx::query_scalar!(
        "WITH moved AS (
             UPDATE payments SET state = $2, reason = coalesce($3, reason), updated_at = now()
             WHERE order_id = $1 AND state = ANY($4)
             RETURNING order_id)
         INSERT INTO payment_history (order_id, state, detail, service)
         SELECT order_id, $2, $5, $6 FROM moved
         RETURNING order_id",
        order_id,
        to.as_str(),
        reason,
        &from.iter().map(|s| s.as_str()).collect::<Vec<_>>() as &[&str],
        detail,
        service,
    )
    .fetch_optional(conn)
    .await?;
    Ok(moved.is_some())
}
