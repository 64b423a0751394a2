//! What follows an order just stored: the live feed and the log hear of it,
//! and it is published to the RabbitMQ work queue (the outbox relay retries
//! what this could not); with `WORK_QUEUE=postgres` its job row was written
//! with it, and there is nothing to publish.

use std::time::Duration;

use platform::outbox::{Outboxed, Relay};

use crate::{intake::StoredOrder, live::Feed, live::LiveEvent};

/// How long the request waits for the broker's confirm before answering
/// anyway: the order is already durable in the outbox.
const PUBLISH_WAIT: Duration = Duration::from_secs(2);

/// Tells the live feed and the log about orders just stored, and publishes
/// them.
#[derive(Clone)]
pub struct Announcer {
    pub feed: Feed,
    pub relay: Relay,
}

impl Announcer {
    /// Announce `order`, stored with its outbox message `placed` (none when
    /// its job was written instead).
    pub async fn announce(&self, order: &StoredOrder, placed: Option<&Outboxed>) {
        let lane = order.lane.as_str();
        metrics::counter!("orders_accepted_total", "lane" => lane).increment(1);
        self.feed.publish(LiveEvent {
            order_id: order.id,
            customer_id: order.customer_id.clone(),
            status: StoredOrder::STATUS.into(),
            reason: None,
            lane: lane.into(),
            processed_by: None,
            at: order.created_at,
            client: Some(order.client.as_str().into()),
        });
        tracing::info!(
            lane = %lane, total_cents = order.total_cents, currency = %order.currency,
            items = order.items.len(), "order accepted"
        );

        let Some(placed) = placed else {
            tracing::info!("order queued as a job in Postgres");
            return;
        };
        match tokio::time::timeout(PUBLISH_WAIT, self.relay.publish_now(placed)).await {
            Ok(Ok(())) => tracing::info!("order published to the work queue"),
            Ok(Err(error)) => tracing::warn!(
                error.message = %format!("{error:#}"),
                "publish failed; the outbox relay will retry"
            ),
            Err(_) => tracing::warn!("publish not confirmed in time; the outbox relay will retry"),
        }
    }
}
