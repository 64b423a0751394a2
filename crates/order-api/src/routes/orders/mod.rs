//! `POST /orders`, `GET /orders/{id}` and their events, and the JSON view
//! of an order.

pub(crate) mod events;
pub(crate) mod get;
pub(crate) mod post;

pub use get::get_order;
pub use post::create_order;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, types::Json};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{
    domain::{PricedLine, Shipping},
    intake::StoredOrder,
};

/// An order as the API shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OrderView {
    pub id: Uuid,
    /// `accepted`, then `processed` or `rejected`; `held` while its message
    /// waits in the dead letters (the reason says why), until a replay
    /// accepts it again or the payment sweeper ends its payment.
    pub status: String,
    /// Why it was rejected, or why it is held.
    pub reason: Option<String>,
    pub customer_id: String,
    pub email: String,
    pub items: Vec<PricedLine>,
    pub total_cents: i64,
    pub currency: String,
    /// `standard` or `express`.
    pub lane: String,
    pub callback_url: Option<String>,
    pub shipping: Option<Shipping>,
    pub correlation_id: String,
    pub created_at: DateTime<Utc>,
    pub history: Vec<HistoryEntry>,
    /// The order's money, once a processor has started taking it.
    pub payment: Option<PaymentView>,
}

/// Where an order's payment stands, and how it got there.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PaymentView {
    /// `authorising`, `capturing` or `voiding` while under way (a payment
    /// an earlier release left undecided reads `authorised`); `captured`,
    /// `voided` or `declined` once settled.
    pub state: String,
    pub amount_cents: i64,
    pub currency: String,
    pub history: Vec<PaymentStep>,
}

/// One step of a payment.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PaymentStep {
    pub state: String,
    pub detail: String,
    pub service: String,
    pub at: DateTime<Utc>,
}

/// One step of the order's life.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HistoryEntry {
    /// `accepted`, `held`, `processed`, `rejected` or `notified`.
    pub status: String,
    pub detail: Option<String>,
    pub service: String,
    pub at: DateTime<Utc>,
}

impl OrderView {
    /// An order just stored, as its answer shows it.
    pub fn accepted(order: &StoredOrder) -> Self {
        Self {
            id: order.id,
            status: StoredOrder::STATUS.into(),
            reason: None,
            customer_id: order.customer_id.clone(),
            email: order.email.clone(),
            items: order.items.clone(),
            total_cents: order.total_cents,
            currency: order.currency.clone(),
            lane: order.lane.as_str().into(),
            callback_url: order.callback_url.clone(),
            shipping: order.shipping.clone(),
            correlation_id: order.correlation_id.clone(),
            created_at: order.created_at,
            history: vec![HistoryEntry {
                status: StoredOrder::STATUS.into(),
                detail: Some(order.detail.clone()),
                service: StoredOrder::SERVICE.into(),
                at: order.created_at,
            }],
            payment: None,
        }
    }

    /// The body of the answer to an order just stored (and of its replays):
    /// the order as JSON.
    pub fn accepted_body(order: &StoredOrder) -> serde_json::Result<Vec<u8>> {
        serde_json::to_vec(&Self::accepted(order))
    }
}

/// Read an order and its history; `None` if there is no such order, or
/// none of `owner`'s (`None`: anyone's).
pub async fn load_order(
    conn: &mut PgConnection,
    id: Uuid,
    owner: Option<&str>,
) -> sqlx::Result<Option<OrderView>> {
    let Some(row) = sqlx::query!(
        r#"SELECT id, status, reason, customer_id, email, items AS "items: Json<Vec<PricedLine>>",
                  total_cents, currency, lane, callback_url, shipping AS "shipping: Json<Shipping>",
                  correlation_id, created_at
           FROM orders WHERE id = $1 AND ($2::text IS NULL OR client = $2)"#,
        id,
        owner,
    )
    .fetch_optional(&mut *conn)
    .await?
    else {
        return Ok(None);
    };
    let history = sqlx::query_as!(
        HistoryEntry,
        "SELECT status, detail, service, at FROM order_status_history WHERE order_id = $1 ORDER BY id",
        id,
    )
    .fetch_all(&mut *conn)
    .await?;
    let payment = load_payment(conn, id).await?;
    Ok(Some(OrderView {
        id: row.id,
        status: row.status,
        reason: row.reason,
        customer_id: row.customer_id,
        email: row.email,
        items: row.items.0,
        total_cents: row.total_cents,
        currency: row.currency,
        lane: row.lane,
        callback_url: row.callback_url,
        shipping: row.shipping.map(|s| s.0),
        correlation_id: row.correlation_id,
        created_at: row.created_at,
        history,
        payment,
    }))
}

async fn load_payment(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<Option<PaymentView>> {
    let Some(payment) = sqlx::query!(
        "SELECT state, amount_cents, currency FROM payments WHERE order_id = $1",
        id,
    )
    .fetch_optional(&mut *conn)
    .await?
    else {
        return Ok(None);
    };
    let history = sqlx::query_as!(
        PaymentStep,
        "SELECT state, detail, service, at FROM payment_history WHERE order_id = $1 ORDER BY id",
        id,
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(Some(PaymentView {
        state: payment.state,
        amount_cents: payment.amount_cents,
        currency: payment.currency,
        history,
    }))
}
