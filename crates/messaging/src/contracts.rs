//! Wire contracts. Services are deployed separately, so an old consumer sees
//! new messages: only ever add fields with `#[serde(default)]`, never rename.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// AMQP header carrying the correlation id from the HTTP request onwards.
pub const CORRELATION_HEADER: &str = "x-correlation-id";
/// AMQP header naming the order a message is about.
pub const ORDER_ID_HEADER: &str = "x-order-id";
/// Version of the message schema, written into every message.
pub const SCHEMA_VERSION: u16 = 1;

/// Which queue an order travels on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Lane {
    /// The default lane.
    #[default]
    Standard,
    /// Orders with `express: true`.
    Express,
}

impl Lane {
    /// The routing key and queue suffix of this lane.
    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Standard => "standard",
            Lane::Express => "express",
        }
    }
}

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    /// Stock keeping unit.
    pub sku: String,
    /// How many, always ≥ 1.
    pub quantity: i32,
}

/// Published by order-api onto the orders exchange once an order is accepted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderPlaced {
    /// Schema version of this message.
    pub schema_version: u16,
    /// Unique per message; consumers dedupe on it.
    pub message_id: Uuid,
    /// When the order was accepted.
    pub occurred_at: DateTime<Utc>,
    /// The order.
    pub order_id: Uuid,
    /// Who placed it.
    pub customer_id: String,
    /// Where the confirmation goes.
    pub email: String,
    /// The lines, at least one.
    pub items: Vec<OrderLine>,
    /// Total in minor units of `currency`.
    pub total_cents: i64,
    /// ISO 4217 code.
    pub currency: String,
    /// Which lane the order took.
    pub lane: Lane,
    /// Optional webhook the client asked to be called.
    #[serde(default)]
    pub callback_url: Option<String>,
}

/// What happened to an order; announced on the order-events fanout exchange.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Outcome {
    /// Stock reserved and payment captured.
    #[serde(rename = "order.processed")]
    Processed,
    /// The order cannot be fulfilled; `reason` says why.
    #[serde(rename = "order.rejected")]
    Rejected {
        /// Machine-readable reason, e.g. `out_of_stock`.
        reason: String,
    },
}

impl Outcome {
    /// The order status this outcome leads to.
    pub fn status(&self) -> &'static str {
        match self {
            Outcome::Processed => "processed",
            Outcome::Rejected { .. } => "rejected",
        }
    }
}

/// An amount as people read it: `39.98 EUR` for 3998 cents of EUR.
pub fn display_amount(cents: i64, currency: &str) -> String {
    format!("{}.{:02} {currency}", cents / 100, cents % 100)
}

/// What became of an order's money, as the payment provider confirmed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PaymentOutcome {
    /// The authorised amount was taken.
    Captured,
    /// The authorisation was released: nothing was taken.
    Voided,
    /// The provider refused to authorise: nothing was held or taken.
    Declined,
}

impl PaymentOutcome {
    /// The word used in the payment's history and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            PaymentOutcome::Captured => "captured",
            PaymentOutcome::Voided => "voided",
            PaymentOutcome::Declined => "declined",
        }
    }
}

/// An event about an order, published by order-processor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderEvent {
    /// Schema version of this message.
    pub schema_version: u16,
    /// The event id; subscribers dedupe on it.
    pub message_id: Uuid,
    /// When the outcome was decided.
    pub occurred_at: DateTime<Utc>,
    /// What happened.
    #[serde(flatten)]
    pub outcome: Outcome,
    /// The order.
    pub order_id: Uuid,
    /// Who placed it.
    pub customer_id: String,
    /// Where the confirmation goes.
    pub email: String,
    /// Total in minor units of `currency`.
    pub total_cents: i64,
    /// ISO 4217 code.
    pub currency: String,
    /// Which lane the order took.
    pub lane: Lane,
    /// Which processor instance decided.
    pub processed_by: String,
    /// Optional webhook the client asked to be called.
    #[serde(default)]
    pub callback_url: Option<String>,
    /// What became of the money (absent in events from before payments
    /// were two steps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment: Option<PaymentOutcome>,
    /// What was ordered (absent in events from before the event log read
    /// them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<OrderLine>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(outcome: Outcome) -> OrderEvent {
        OrderEvent {
            schema_version: SCHEMA_VERSION,
            message_id: Uuid::new_v4(),
            occurred_at: Utc::now(),
            outcome,
            order_id: Uuid::new_v4(),
            customer_id: "c-1".into(),
            email: "ada@example.com".into(),
            total_cents: 1999,
            currency: "EUR".into(),
            lane: Lane::Express,
            processed_by: "p-1".into(),
            callback_url: None,
            payment: Some(PaymentOutcome::Voided),
            items: Vec::new(),
        }
    }

    #[test]
    fn a_rejected_event_carries_its_type_and_reason_on_the_wire() {
        let json = serde_json::to_value(event(Outcome::Rejected {
            reason: "out_of_stock".into(),
        }))
        .unwrap();
        assert_eq!(json["type"], "order.rejected");
        assert_eq!(json["reason"], "out_of_stock");
        assert_eq!(json["lane"], "express");
    }

    #[test]
    fn events_round_trip_through_json() {
        for outcome in [
            Outcome::Processed,
            Outcome::Rejected {
                reason: "payment_declined".into(),
            },
        ] {
            let e = event(outcome);
            let back: OrderEvent =
                serde_json::from_slice(&serde_json::to_vec(&e).unwrap()).unwrap();
            assert_eq!(back, e);
        }
    }

    #[test]
    fn an_old_message_without_optional_fields_still_decodes() {
        let json = serde_json::json!({
            "schema_version": 1, "message_id": Uuid::new_v4(), "occurred_at": Utc::now(),
            "order_id": Uuid::new_v4(), "customer_id": "c", "email": "a@b.c",
            "items": [{"sku": "WIDGET", "quantity": 1}], "total_cents": 1, "currency": "EUR",
            "lane": "standard"
        });
        let placed: OrderPlaced = serde_json::from_value(json).unwrap();
        assert_eq!(placed.callback_url, None);
    }
}
