//! Settling a delivery by its [`Disposition`]: acked through the
//! [`AckWindow`], retried after its delay, dead-lettered with the reason,
//! or handed back; a copy of each retry and dead letter for whoever
//! watches; and a bounded requeue when a retry cannot be scheduled.

use std::time::Duration;

use lapin::{
    Acker, BasicProperties,
    message::Delivery,
    options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions},
    types::{AMQPValue, LongString},
};

use super::{
    ATTEMPTS_HEADER, ConsumerSpec, Disposition, HELD_HEADER, Handler, QUEUE_HEADER, REASON_HEADER,
    SERVICE_HEADER,
    ack_window::{AckWindow, report},
    policy::previous_attempts,
};
use crate::{
    Publisher, Topology,
    topology::{RETRY_DELAY_HEADER, WATCH_DEAD_LETTERED, WATCH_RETRYING},
};

/// The longest [`Handler::dead_lettering`] may hold up the dead letter.
const HOOK_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) struct Settler<'a, H> {
    pub(super) handler: &'a H,
    pub(super) topology: &'a Topology,
    pub(super) publisher: &'a Publisher,
    pub(super) spec: &'a ConsumerSpec,
    pub(super) requeues: RequeueTally,
    pub(super) window: AckWindow,
}

impl<H: Handler> Settler<'_, H> {
    /// Settle a batch: the deliveries to ack wait in the window for one
    /// `multiple` ack; the others are settled one by one.
    pub(super) async fn settle_all(
        &self,
        deliveries: Vec<Delivery>,
        dispositions: Vec<Disposition>,
    ) {
        for (delivery, disposition) in deliveries.into_iter().zip(dispositions) {
            self.settle(delivery, disposition).await;
        }
        self.window.flush().await;
    }

    pub(super) async fn settle(&self, delivery: Delivery, disposition: Disposition) {
        let Delivery {
            delivery_tag,
            acker,
            properties,
            data,
            ..
        } = delivery;
        let settled = match disposition {
            Disposition::Ack => {
                self.requeues.forget(&message_key(&properties));
                self.window.ready(delivery_tag, acker);
                return;
            }
            Disposition::Retry { reason } => {
                let attempts = previous_attempts(&properties) + 1;
                if attempts >= self.spec.retry.max_attempts {
                    let reason = format!("gave up after {attempts} attempts: {reason}");
                    self.dead_letter(&acker, properties, &data, attempts, &reason)
                        .await
                } else {
                    self.retry_later(&acker, properties, &data, attempts, &reason)
                        .await
                }
            }
            Disposition::DeadLetter { reason } => {
                let attempts = previous_attempts(&properties) + 1;
                self.dead_letter(&acker, properties, &data, attempts, &reason)
                    .await
            }
            Disposition::Wait { reason } => {
                tracing::info!(
                    reason = %reason,
                    "stopping while the message waits: handing it back to the queue, no attempt counted"
                );
                acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        multiple: false,
                    })
                    .await
            }
        };
        report(settled);
        self.window.settled(delivery_tag);
    }

    /// Park the message in the retry queue of its delay; the broker moves
    /// it back to the work queue when the delay is up.
    async fn retry_later(
        &self,
        acker: &Acker,
        properties: BasicProperties,
        data: &[u8],
        attempts: u32,
        reason: &str,
    ) -> lapin::Result<bool> {
        let key = message_key(&properties);
        let delay = self.spec.retry.delay(attempts);
        let properties = with_header(properties, ATTEMPTS_HEADER, AMQPValue::LongUInt(attempts));
        let properties = with_header(
            properties,
            RETRY_DELAY_HEADER,
            AMQPValue::LongString(LongString::from(delay.as_millis().to_string())),
        );
        match self
            .publisher
            .publish(
                &self.topology.retry_exchange(),
                &self.spec.queue,
                data,
                properties.clone(),
            )
            .await
        {
            Ok(()) => {
                metrics::counter!("messages_retried_total", "queue" => self.spec.queue.clone())
                    .increment(1);
                tracing::warn!(
                    attempt = attempts, reason = %reason,
                    "processing failed; retrying in {delay:?}"
                );
                self.tell_watchers(WATCH_RETRYING, data, properties).await;
                self.requeues.forget(&key);
                acker.ack(BasicAckOptions::default()).await
            }
            Err(error) => {
                tracing::error!(error = %format!("{error:#}"), "could not schedule the retry");
                self.requeue_or_give_up(acker, &key).await
            }
        }
    }

    /// Publish the message to the dead-letter exchange with why, how many
    /// attempts, which service and which queue; then ack it.
    async fn dead_letter(
        &self,
        acker: &Acker,
        properties: BasicProperties,
        data: &[u8],
        attempts: u32,
        reason: &str,
    ) -> lapin::Result<bool> {
        self.requeues.forget(&message_key(&properties));
        let held = tokio::time::timeout(HOOK_TIMEOUT, self.handler.dead_lettering(data, reason))
            .await
            .unwrap_or_else(|_| {
                tracing::warn!(
                    "recording the dead letter took over {HOOK_TIMEOUT:?}; dead-lettering anyway"
                );
                false
            });
        let mut properties =
            with_header(properties, ATTEMPTS_HEADER, AMQPValue::LongUInt(attempts));
        // Always set: a replayed message must not carry an earlier answer.
        properties = with_header(properties, HELD_HEADER, AMQPValue::Boolean(held));
        for (header, value) in [
            (REASON_HEADER, reason),
            (SERVICE_HEADER, self.spec.service.as_str()),
            (QUEUE_HEADER, self.spec.queue.as_str()),
        ] {
            properties = with_header(
                properties,
                header,
                AMQPValue::LongString(LongString::from(value)),
            );
        }
        match self
            .publisher
            .publish(&self.topology.dead_letters(), "", data, properties.clone())
            .await
        {
            Ok(()) => {
                metrics::counter!("messages_dead_lettered_total", "queue" => self.spec.queue.clone())
                    .increment(1);
                tracing::error!(reason = %reason, attempts, "message dead-lettered");
                self.tell_watchers(WATCH_DEAD_LETTERED, data, properties)
                    .await;
                acker.ack(BasicAckOptions::default()).await
            }
            Err(error) => {
                // The queue's own dead-letter exchange still keeps it (with
                // x-death, without our headers).
                tracing::error!(error = %format!("{error:#}"), reason = %reason, "could not publish the dead letter; rejecting");
                acker.reject(BasicRejectOptions { requeue: false }).await
            }
        }
    }
}

impl<H: Handler> Settler<'_, H> {
    /// A copy of a confirmed retry or dead letter, with its queue, for
    /// whoever watches (see [`Topology::watch_exchange`]); the message is
    /// safe already, so a copy that cannot be sent is only logged.
    async fn tell_watchers(&self, what: &str, data: &[u8], properties: BasicProperties) {
        let properties = with_header(
            properties,
            QUEUE_HEADER,
            AMQPValue::LongString(LongString::from(self.spec.queue.as_str())),
        );
        if let Err(error) = self
            .publisher
            .publish_optional(&self.topology.watch_exchange(), what, data, properties)
            .await
        {
            tracing::debug!(error = %format!("{error:#}"), "could not copy the message for watchers");
        }
    }

    /// Requeue a message whose retry could not be scheduled (the broker
    /// refused the publish), after a pause so a failing broker is not
    /// hammered. Counted by our own tally, not the broker's delivery count:
    /// from RabbitMQ 4.3 a requeueing `basic.nack` no longer counts towards
    /// the delivery limit. After [`MAX_REQUEUES`] the message is rejected
    /// to the queue's dead-letter target, where it can be replayed.
    async fn requeue_or_give_up(&self, acker: &Acker, key: &str) -> lapin::Result<bool> {
        let requeues = self.requeues.record(key);
        if requeues > MAX_REQUEUES {
            self.requeues.forget(key);
            tracing::error!(
                requeues = MAX_REQUEUES,
                "giving up requeueing: rejecting to the dead-letter queue"
            );
            return acker.reject(BasicRejectOptions { requeue: false }).await;
        }
        tokio::time::sleep(Duration::from_millis(200) * requeues).await;
        tracing::warn!(requeue = requeues, "requeueing");
        acker
            .nack(BasicNackOptions {
                requeue: true,
                multiple: false,
            })
            .await
    }
}

/// What the requeue tally knows a message by.
fn message_key(properties: &BasicProperties) -> String {
    properties
        .message_id()
        .as_ref()
        .map_or_else(String::new, |id| id.to_string())
}

/// Times one message may be requeued by one consumer before it is rejected.
pub const MAX_REQUEUES: u32 = 5;

/// How often this consumer has requeued each message (by message id).
#[derive(Default)]
pub(super) struct RequeueTally(std::sync::Mutex<std::collections::HashMap<String, u32>>);

impl RequeueTally {
    /// Count one more requeue of `key`; returns the count.
    fn record(&self, key: &str) -> u32 {
        let mut tally = self.0.lock().expect("the requeue tally is never poisoned");
        // Bounded memory: a tally this large means the broker has failed us
        // for a long time; starting the counts over only delays giving up.
        if tally.len() > 10_000 {
            tally.clear();
        }
        let count = tally.entry(key.to_owned()).or_default();
        *count += 1;
        *count
    }

    fn forget(&self, key: &str) {
        self.0
            .lock()
            .expect("the requeue tally is never poisoned")
            .remove(key);
    }
}

fn with_header(properties: BasicProperties, name: &str, value: AMQPValue) -> BasicProperties {
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert(name.into(), value);
    properties.with_headers(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_requeued_a_bounded_number_of_times() {
        let tally = RequeueTally::default();
        let counts: Vec<u32> = (0..3).map(|_| tally.record("m1")).collect();
        assert_eq!(counts, [1, 2, 3]);
        assert_eq!(tally.record("m2"), 1);
        tally.forget("m1");
        assert_eq!(tally.record("m1"), 1);
    }
}
