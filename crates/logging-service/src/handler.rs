//! One order event: one audit record and one log line, once.

use messaging::contracts::{OrderEvent, Outcome};
use platform::dedupe;
use sqlx::PgPool;

/// Name under which this service records the events it handled.
pub const CONSUMER: &str = "logging-service";

/// Record `event` in the audit trail unless it was recorded before; returns
/// whether it was recorded now.
pub async fn record(
    pool: &PgPool,
    event: &OrderEvent,
    correlation_id: &str,
) -> anyhow::Result<bool> {
    let mut tx = pool.begin().await?;
    if !dedupe::first_delivery(&mut tx, CONSUMER, event.message_id).await? {
        return Ok(false);
    }
    let event_type = match &event.outcome {
        Outcome::Processed => "order.processed",
        Outcome::Rejected { .. } => "order.rejected",
    };
    sqlx::query(
        "INSERT INTO audit_log (event_id, order_id, event_type, correlation_id, payload)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(event.message_id)
    .bind(event.order_id)
    .bind(event_type)
    .bind(correlation_id)
    .bind(serde_json::to_value(event)?)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    tracing::info!(
        event_type, customer_id = %event.customer_id, total_cents = event.total_cents,
        processed_by = %event.processed_by, "audit record written"
    );
    Ok(true)
}
