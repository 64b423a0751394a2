//! From messages to dispositions: decode, handle (which says in the log
//! what happened to the order and its money), publish the events. The
//! messages come from RabbitMQ's work queues or from Postgres's `jobs`
//! table (`WORK_QUEUE`); only how they arrive and how their dispositions are
//! carried out differs, in `messaging::consumer` and `platform::jobs`.

use std::collections::HashSet;

use futures_util::future::join_all;
use lapin::message::Delivery;
use messaging::{
    amqp,
    consumer::{Disposition, Handler},
};
use platform::{
    jobs::{Job, JobHandler},
    outbox::Relay,
};
use tracing::Instrument;

use crate::handler::{HandleError, Handled, Processor, decode};

/// The handler of the orders' messages: one at a time, or the orders of a
/// batch together.
#[derive(Clone, Copy)]
pub struct Orders<'a> {
    pub processor: &'a Processor,
    pub relay: &'a Relay,
}

/// One order message as it arrived, from either work queue.
struct Message<'a> {
    body: &'a [u8],
    correlation_id: String,
    /// Handed out before (a redelivery, or a job claimed again).
    again: bool,
}

impl<'a> From<&'a Delivery> for Message<'a> {
    fn from(delivery: &'a Delivery) -> Self {
        Self {
            body: &delivery.data,
            correlation_id: amqp::correlation_id(&delivery.properties),
            again: delivery.redelivered,
        }
    }
}

impl<'a> From<&'a Job> for Message<'a> {
    fn from(job: &'a Job) -> Self {
        Self {
            body: job.body.as_bytes(),
            correlation_id: job.correlation_id.clone(),
            again: job.claims > 1,
        }
    }
}

impl Handler for Orders<'_> {
    async fn handle(&self, delivery: Delivery) -> Disposition {
        self.one(&Message::from(&delivery)).await
    }

    async fn handle_batch(&self, deliveries: &[Delivery]) -> Option<Vec<Disposition>> {
        self.batch(&deliveries.iter().map(Message::from).collect::<Vec<_>>())
            .await
    }

    async fn dead_lettering(&self, data: &[u8], reason: &str) -> bool {
        self.hold(data, reason).await
    }
}

impl JobHandler for Orders<'_> {
    async fn handle_jobs(&self, jobs: &[Job]) -> Vec<Disposition> {
        let messages: Vec<Message> = jobs.iter().map(Message::from).collect();
        match self.batch(&messages).await {
            Some(dispositions) => dispositions,
            None => join_all(messages.iter().map(|message| self.one(message))).await,
        }
    }

    async fn dead_lettering(&self, job: &Job, reason: &str) -> bool {
        self.hold(job.body.as_bytes(), reason).await
    }
}

impl Orders<'_> {
    /// An order whose message is dead-lettered is held, with the reason (see
    /// [`crate::held`]); `true` if it is held now. Only the order id is
    /// read: a message of a schema this processor does not know still holds
    /// its order; a body without one holds nothing.
    async fn hold(&self, data: &[u8], reason: &str) -> bool {
        let Some(order_id) = serde_json::from_slice::<serde_json::Value>(data)
            .ok()
            .and_then(|body| body.get("order_id")?.as_str()?.parse::<uuid::Uuid>().ok())
        else {
            return false;
        };
        match self.processor.hold(order_id, reason).await {
            Ok(true) => {
                tracing::warn!(%order_id, "order held: its message goes to the dead letters");
                true
            }
            Ok(false) => false,
            Err(error) => {
                tracing::warn!(
                    %order_id, error.message = %format!("{error:#}"),
                    "could not mark the order held; it stays accepted"
                );
                false
            }
        }
    }

    /// Handle messages that came together. Poison is dead-lettered on its
    /// own; the orders go to the processor together, except a second
    /// message for an order already in the batch, handled on its own
    /// afterwards. Each order's event is published as soon as the batch has
    /// committed, all of them at once. `None` when the batch failed as a
    /// whole: its messages are then handled one by one.
    async fn batch(&self, messages: &[Message<'_>]) -> Option<Vec<Disposition>> {
        let mut dispositions: Vec<Option<Disposition>> = messages.iter().map(|_| None).collect();
        let mut batch = Vec::new();
        let mut positions = Vec::new();
        let mut repeats = Vec::new();
        let mut seen = HashSet::new();
        for (index, message) in messages.iter().enumerate() {
            let span = self.span(message);
            match decode(message.body) {
                Err(error) => dispositions[index] = Some(span.in_scope(|| failed(error))),
                Ok(order) if !seen.insert(order.order_id) => repeats.push(index),
                Ok(order) => {
                    span.record("order_id", tracing::field::display(order.order_id));
                    batch.push((order, span));
                    positions.push(index);
                }
            }
        }
        let handled = match self.processor.handle_all(&batch).await {
            Ok(handled) => handled,
            Err(error) => {
                tracing::warn!(error.message = %format!("{error:#}"), "the batch failed; handling its orders one by one");
                return None;
            }
        };
        let settled = join_all(
            handled
                .into_iter()
                .zip(&batch)
                .map(|(result, (_, span))| self.settled(result).instrument(span.clone())),
        )
        .await;
        for (index, disposition) in positions.into_iter().zip(settled) {
            dispositions[index] = Some(disposition);
        }
        for index in repeats {
            dispositions[index] = Some(self.one(&messages[index]).await);
        }
        Some(
            dispositions
                .into_iter()
                .map(|d| d.expect("a disposition for every message"))
                .collect(),
        )
    }

    /// Handle one message on its own.
    async fn one(&self, message: &Message<'_>) -> Disposition {
        let span = self.span(message);
        async {
            let order = match decode(message.body) {
                Ok(order) => order,
                Err(error) => return failed(error),
            };
            tracing::Span::current().record("order_id", tracing::field::display(order.order_id));
            self.settled(self.processor.handle(&order).await).await
        }
        .instrument(span)
        .await
    }

    /// The span of one message's log lines; the order id is recorded once
    /// the message is decoded.
    fn span(&self, message: &Message<'_>) -> tracing::Span {
        tracing::info_span!(
            "order",
            order_id = tracing::field::Empty,
            correlation_id = %message.correlation_id,
            processor = %self.processor.instance_id,
            redelivered = message.again,
        )
    }

    /// The disposition of a handled order, its event published first.
    async fn settled(&self, handled: Result<Handled, HandleError>) -> Disposition {
        match handled {
            Ok(Handled::Duplicate) => {
                metrics::counter!("duplicates_skipped_total").increment(1);
                tracing::info!("already handled; skipping the duplicate delivery");
                Disposition::Ack
            }
            Ok(Handled::Decided { event: None, .. }) => Disposition::Ack,
            Ok(Handled::Decided {
                event: Some(event), ..
            }) => {
                if let Err(error) = self.relay.publish_now(&event).await {
                    tracing::warn!(error.message = %format!("{error:#}"), "event not published yet; the outbox relay will retry");
                }
                Disposition::Ack
            }
            Err(error) => failed(error),
        }
    }
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
