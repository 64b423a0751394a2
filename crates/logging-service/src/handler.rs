//! One order event: one audit record and one log line, once.

use messaging::contracts::{OrderEvent, Outcome};
use platform::dedupe::FIRST_DELIVERY_CTE;
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
    let event_type = match &event.outcome {
        Outcome::Processed => "order.processed",
        Outcome::Rejected { .. } => "order.rejected",
    };
    let recorded = sqlx::query(&format!(
        "WITH {FIRST_DELIVERY_CTE}
         INSERT INTO audit_log (event_id, order_id, event_type, correlation_id, payload)
         SELECT $2, $3, $4, $5, $6 FROM first"
    ))
    .bind(CONSUMER)
    .bind(event.message_id)
    .bind(event.order_id)
    .bind(event_type)
    .bind(correlation_id)
    .bind(serde_json::to_value(event)?)
    .execute(pool)
    .await?
    .rows_affected()
        == 1;
    if !recorded {
        return Ok(false);
    }
    tracing::info!(
        event_type, customer_id = %event.customer_id, total_cents = event.total_cents,
        processed_by = %event.processed_by, "audit record written"
    );
    Ok(true)
}
