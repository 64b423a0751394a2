//! What a request hands the intake, and what it gets back.

use chrono::{DateTime, Utc};
use messaging::contracts::Lane;
use platform::outbox::Outboxed;
use uuid::Uuid;

use crate::{
    domain::{PricedLine, Shipping, ValidOrder},
    idempotency::{IdempotencyKey, SavedResponse},
};

/// One request's order, as the intake stores it.
pub struct Placement {
    pub client: String,
    /// The request's idempotency key and the hash of its body.
    pub key: Option<(IdempotencyKey, String)>,
    pub order: ValidOrder,
    pub correlation_id: String,
}

/// An order as the intake stored it: accepted at the transaction's time,
/// with its first line of history.
pub struct StoredOrder {
    pub id: Uuid,
    /// The client of the key that placed it.
    pub client: String,
    pub customer_id: String,
    pub email: String,
    pub items: Vec<PricedLine>,
    pub total_cents: i64,
    pub currency: String,
    pub lane: Lane,
    pub callback_url: Option<String>,
    pub shipping: Option<Shipping>,
    pub correlation_id: String,
    pub created_at: DateTime<Utc>,
    /// Its first line of history.
    pub detail: String,
}

impl StoredOrder {
    /// The status a stored order starts in.
    pub const STATUS: &str = "accepted";
    /// Who its first line of history is by.
    pub const SERVICE: &str = "order-api";
}

/// How the answer to a stored order is written: the body saved with its
/// idempotency key and sent to the client (the HTTP layer's view of it).
pub type Answer = fn(&StoredOrder) -> serde_json::Result<Vec<u8>>;

/// What storing a placement did.
pub enum Placed {
    /// Stored now: the answer (saved with the key, if any), the order and
    /// its outbox message, to publish (none when its job was written in
    /// Postgres instead).
    Accepted {
        saved: SavedResponse,
        order: Box<StoredOrder>,
        message: Option<Outboxed>,
    },
    /// The key was used before with this body: its first answer.
    Replayed(SavedResponse),
}
