//! Order events for the subscribing services: decoded from their
//! deliveries, handed to the service's [`EventHandler`], and each answer
//! turned into the delivery's disposition.

use std::future::Future;

use lapin::message::Delivery;
use messaging::{
    consumer::{Disposition, Handler},
    contracts::OrderEvent,
};

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

/// A [`Handler`] of deliveries carrying order events.
#[derive(Clone)]
pub(super) struct Events<E>(pub(super) E);

impl<E: EventHandler> Handler for Events<E> {
    /// Decode the event, handle it, and turn the result into a disposition
    /// logged in the event's span (the handler logs its own lines in it, as
    /// it does for a batch, so they name the event once).
    async fn handle(&self, delivery: Delivery) -> Disposition {
        let received = match decode(&delivery) {
            Ok(received) => received,
            Err(poison) => return poison,
        };
        let span = received.span();
        match self.0.handle(&received).await {
            Ok(done) => span.in_scope(|| handled(done)),
            Err(error) if crate::db::no_connection(&error) => Disposition::Wait {
                reason: format!("{error:#}"),
            },
            Err(error) => span.in_scope(|| {
                tracing::error!(error.cause_chain = ?error, error.message = %error, "handling the event failed");
                Disposition::Retry {
                    reason: format!("{error:#}"),
                }
            }),
        }
    }

    /// Poison is dead-lettered on its own; the events go to the handler
    /// together. If that fails, every delivery is handled on its own.
    async fn handle_batch(&self, deliveries: &[Delivery]) -> Option<Vec<Disposition>> {
        let decoded: Vec<Result<Received, Disposition>> = deliveries.iter().map(decode).collect();
        let events: Vec<Received> = decoded
            .iter()
            .filter_map(|d| d.as_ref().ok().cloned())
            .collect();
        let mut answers = match self.0.handle_batch(&events).await {
            Ok(answers) if answers.len() == events.len() => answers.into_iter(),
            Ok(_) => return None,
            Err(error) => {
                tracing::warn!(error.message = %format!("{error:#}"), events = events.len(), "handling the events together failed");
                return None;
            }
        };
        Some(
            decoded
                .into_iter()
                .map(|d| match d {
                    Ok(received) => {
                        let done = answers.next().unwrap_or(false);
                        received.span().in_scope(|| handled(done))
                    }
                    Err(poison) => poison,
                })
                .collect(),
        )
    }
}

/// An order event, or the disposition of a delivery that is none.
fn decode(delivery: &Delivery) -> Result<Received, Disposition> {
    match serde_json::from_slice(&delivery.data) {
        Ok(event) => Ok(Received {
            event,
            correlation_id: messaging::amqp::correlation_id(&delivery.properties),
        }),
        Err(error) => Err(Disposition::DeadLetter {
            reason: format!("not an OrderEvent message: {error}"),
        }),
    }
}

/// Count an event handled now, or one handled before.
fn handled(now: bool) -> Disposition {
    count_handled(now);
    Disposition::Ack
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
