//! What a service subscribing to order events implements, whichever way
//! the events reach it (RabbitMQ's fanout, through [`crate::worker`], or
//! the event log in Postgres, through [`crate::event_log`]).

use std::future::Future;

use messaging::contracts::OrderEvent;

/// An order event with the correlation id it came with.
#[derive(Debug, Clone)]
pub struct Received {
    pub event: OrderEvent,
    pub correlation_id: String,
}

impl Received {
    /// The span naming the event's order and correlation id, for its log
    /// lines.
    pub fn span(&self) -> tracing::Span {
        tracing::info_span!(
            "event",
            order_id = %self.event.order_id,
            correlation_id = %self.correlation_id,
            event_id = %self.event.message_id,
        )
    }
}

/// What a subscribing service does with order events: each effect once,
/// answered `true` if it happened now and `false` if it had happened
/// before (a duplicate).
pub trait EventHandler {
    /// One event, in a transaction of its own.
    fn handle(&self, event: &Received) -> impl Future<Output = anyhow::Result<bool>>;

    /// Several events in one transaction: one answer per event, in order. An
    /// error leaves none of them done.
    fn handle_batch(&self, events: &[Received]) -> impl Future<Output = anyhow::Result<Vec<bool>>>;
}

/// Count an event handled now, or say it was handled before.
pub(crate) fn count_handled(now: bool) {
    if now {
        metrics::counter!("events_handled_total").increment(1);
    } else {
        metrics::counter!("duplicates_skipped_total").increment(1);
        tracing::info!("event already handled; skipping the duplicate");
    }
}
