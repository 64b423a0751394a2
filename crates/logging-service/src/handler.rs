//! Order events: one audit record and one log line each, once, for a batch
//! of events in one statement.

use messaging::contracts::{OrderEvent, Outcome};
use platform::worker::{EventHandler, Received};
use sqlx::PgPool;
use uuid::Uuid;

/// Name under which this service records the events it handled.
pub const CONSUMER: &str = "logging-service";

/// The audit trail, as an [`EventHandler`].
#[derive(Clone)]
pub struct AuditTrail {
    pub pool: PgPool,
}

impl EventHandler for AuditTrail {
    async fn handle(&self, event: &Received) -> anyhow::Result<bool> {
        Ok(record_all(&self.pool, std::slice::from_ref(event)).await?[0])
    }

    async fn handle_batch(&self, events: &[Received]) -> anyhow::Result<Vec<bool>> {
        record_all(&self.pool, events).await
    }
}

/// Record `event` in the audit trail unless it was recorded before; returns
/// whether it was recorded now.
pub async fn record(
    pool: &PgPool,
    event: &OrderEvent,
    correlation_id: &str,
) -> anyhow::Result<bool> {
    let received = Received {
        event: event.clone(),
        correlation_id: correlation_id.to_owned(),
    };
    Ok(record_all(pool, &[received]).await?[0])
}

fn event_type(event: &OrderEvent) -> &'static str {
    match &event.outcome {
        Outcome::Processed => "order.processed",
        Outcome::Rejected { .. } => "order.rejected",
    }
}

/// Record every event not recorded before, in one statement:
/// `first_handled` (the consumer-side dedupe, a function in the migrations)
/// records the events' ids, and only those it had not recorded before get
/// an audit record. Returns, per event, whether it was recorded now (of one
/// event sent twice in the batch, the first).
pub async fn record_all(pool: &PgPool, events: &[Received]) -> anyhow::Result<Vec<bool>> {
    let mut columns = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for Received {
        event,
        correlation_id,
    } in events
    {
        columns.0.push(event.message_id);
        columns.1.push(event.order_id);
        columns.2.push(event_type(event));
        columns.3.push(correlation_id.as_str());
        columns.4.push(serde_json::to_value(event)?);
    }
    let recorded = sqlx::query_scalar!(
        "WITH batch AS (
             SELECT * FROM unnest($2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::jsonb[])
                 AS b(event_id, order_id, event_type, correlation_id, payload)),
         first AS (SELECT message_id FROM first_handled($1, ARRAY(SELECT event_id FROM batch)))
         INSERT INTO audit_log (event_id, order_id, event_type, correlation_id, payload)
         SELECT DISTINCT ON (b.event_id) b.event_id, b.order_id, b.event_type, b.correlation_id, b.payload
         FROM batch b JOIN first f ON f.message_id = b.event_id
         RETURNING event_id",
        CONSUMER,
        &columns.0,
        &columns.1,
        &columns.2 as &[&str],
        &columns.3 as &[&str],
        &columns.4,
    )
    .fetch_all(pool)
    .await?;
    let mut fresh: std::collections::HashSet<Uuid> = recorded.into_iter().collect();
    Ok(events
        .iter()
        .map(|received| {
            let now = fresh.remove(&received.event.message_id);
            if now {
                let event = &received.event;
                received.span().in_scope(|| {
                    tracing::info!(
                        event_type = event_type(event), customer_id = %event.customer_id,
                        total_cents = event.total_cents, processed_by = %event.processed_by,
                        "audit record written"
                    )
                });
            }
            now
        })
        .collect())
}
