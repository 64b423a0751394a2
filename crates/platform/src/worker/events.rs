//! Order events for the subscribing services from RabbitMQ: decoded from
//! their deliveries, handed to the service's [`EventHandler`], and each
//! answer turned into the delivery's disposition.

use lapin::message::Delivery;
use messaging::consumer::{Disposition, Handler};

use crate::subscriber::{EventHandler, Received, count_handled};

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
