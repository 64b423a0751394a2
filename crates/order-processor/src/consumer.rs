//! From a delivery to a disposition: decode, handle (which says in the log
//! what happened to the order and its money), publish the event.

use lapin::message::Delivery;
use messaging::{amqp, consumer::Disposition};
use platform::outbox::Relay;
use tracing::Instrument;

use crate::handler::{HandleError, Handled, Processor, decode};

/// Handle one delivery of the work queue.
pub async fn on_delivery(processor: &Processor, relay: &Relay, delivery: Delivery) -> Disposition {
    let correlation_id = amqp::correlation_id(&delivery.properties);
    let span = tracing::info_span!(
        "order",
        order_id = tracing::field::Empty,
        correlation_id = %correlation_id,
        processor = %processor.instance_id,
        redelivered = delivery.redelivered,
    );
    async move {
        let order = match decode(&delivery.data) {
            Ok(order) => order,
            Err(error) => return failed(error),
        };
        tracing::Span::current().record("order_id", tracing::field::display(order.order_id));
        match processor.handle(&order).await {
            Ok(Handled::Duplicate) => {
                metrics::counter!("duplicates_skipped_total").increment(1);
                tracing::info!("already handled; skipping the duplicate delivery");
                Disposition::Ack
            }
            Ok(Handled::Decided { event, .. }) => {
                if let Err(error) = relay.publish_now(&event).await {
                    tracing::warn!(error.message = %format!("{error:#}"), "event not published yet; the outbox relay will retry");
                }
                Disposition::Ack
            }
            Err(error) => failed(error),
        }
    }
    .instrument(span)
    .await
}

/// A failure's disposition: a poison message is dead-lettered, waiting for
/// a database connection is no failed attempt, anything else is retried.
fn failed(error: HandleError) -> Disposition {
    match error {
        HandleError::Poison(reason) => Disposition::DeadLetter { reason },
        HandleError::Transient(error) if platform::db::no_connection(&error) => Disposition::Wait {
            reason: format!("{error:#}"),
        },
        HandleError::Transient(error) => {
            tracing::error!(error.cause_chain = ?error, error.message = %error, "processing failed");
            Disposition::Retry {
                reason: format!("{error:#}"),
            }
        }
    }
}
