//! An order whose payment is under way: what a round knows of it.

use messaging::contracts::{OrderLine, display_amount};
use sqlx::types::Json;
use uuid::Uuid;

use crate::{
    payment::Charge,
    state::{OrderStatus, PaymentState},
};

/// An order whose payment is under way, as Postgres has it.
pub(super) struct Pending {
    pub(super) order_id: Uuid,
    pub(super) state: PaymentState,
    pub(super) reason: Option<String>,
    pub(super) message_id: Uuid,
    pub(super) status: OrderStatus,
    pub(super) customer_id: String,
    pub(super) email: String,
    pub(super) items: Json<Vec<OrderLine>>,
    pub(super) total_cents: i64,
    pub(super) currency: String,
    pub(super) lane: String,
    pub(super) callback_url: Option<String>,
    pub(super) correlation_id: String,
}

impl Pending {
    pub(super) fn charge(&self, order_id: Uuid) -> Charge<'_> {
        Charge {
            reference: order_id,
            customer_id: &self.customer_id,
            amount_cents: self.total_cents,
            currency: &self.currency,
        }
    }

    pub(super) fn amount(&self) -> String {
        display_amount(self.total_cents, &self.currency)
    }
}
