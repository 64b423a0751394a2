//! Order events for the subscriber services' tests.

use chrono::Utc;
use messaging::contracts::{Lane, OrderEvent, Outcome, PaymentOutcome, SCHEMA_VERSION};
use sqlx::PgPool;
use uuid::Uuid;

/// An event about a new order (stored nowhere) decided as `outcome`: its
/// payment is captured if it was processed, voided if it was rejected.
pub fn order_event(outcome: Outcome) -> OrderEvent {
    let payment = match outcome {
        Outcome::Processed => PaymentOutcome::Captured,
        Outcome::Rejected { .. } => PaymentOutcome::Voided,
    };
    OrderEvent {
        schema_version: SCHEMA_VERSION,
        message_id: Uuid::new_v4(),
        occurred_at: Utc::now(),
        outcome,
        order_id: Uuid::new_v4(),
        customer_id: "c-7".into(),
        email: "grace@example.com".into(),
        total_cents: 4950,
        currency: "EUR".into(),
        lane: Lane::Standard,
        processed_by: "processor-1".into(),
        callback_url: None,
        payment: Some(payment),
        items: vec![messaging::contracts::OrderLine {
            sku: "WIDGET".into(),
            quantity: 2,
        }],
    }
}

/// An event about an order that exists (as processed or rejected) in `pool`
/// (see [`order_event`]).
pub async fn event_for_stored_order(pool: &PgPool, outcome: Outcome) -> OrderEvent {
    let event = order_event(outcome);
    sqlx::query(
        "INSERT INTO orders (id, customer_id, email, items, total_cents, currency, lane, status, correlation_id)
         VALUES ($1, $2, $3, '[]', $4, $5, 'standard', $6, 'test')",
    )
    .bind(event.order_id)
    .bind(&event.customer_id)
    .bind(&event.email)
    .bind(event.total_cents)
    .bind(&event.currency)
    .bind(event.outcome.status())
    .execute(pool)
    .await
    .expect("inserting the order");
    event
}

/// `event` as a subscriber receives it, with `correlation_id`.
pub fn received(event: &OrderEvent, correlation_id: &str) -> platform::worker::Received {
    platform::worker::Received {
        event: event.clone(),
        correlation_id: correlation_id.to_owned(),
    }
}
