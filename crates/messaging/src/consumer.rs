//! The consume loop shared by every consuming service: bounded prefetch,
//! bounded concurrency, ack only after the handler has committed its work,
//! and a drain on shutdown. What to do with one message is the handler's
//! business; what to do with its outcome is decided here, once.

use std::future::Future;

use anyhow::{Context, bail};
use futures_util::StreamExt;
use lapin::{
    Acker, Channel,
    message::Delivery,
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
        BasicQosOptions, BasicRejectOptions,
    },
    types::FieldTable,
};
use tokio_util::sync::CancellationToken;

/// What the consumer loop does with a delivery once the handler is done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// The work is committed (or was already done): ack.
    Ack,
    /// The message can never succeed: reject without requeue, so the queue
    /// dead-letters it with the reason in `x-death`.
    DeadLetter {
        /// Why, for the log line.
        reason: String,
    },
    /// A transient failure: give the message back to the queue. The queue's
    /// delivery limit dead-letters it if it keeps failing.
    Requeue {
        /// Why, for the log line.
        reason: String,
    },
}

/// One consumer on one queue.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    /// The queue to consume.
    pub queue: String,
    /// Names this consumer in the management UI.
    pub tag: String,
    /// Unacked messages the broker may push to this consumer, which is also
    /// how many are handled at once.
    pub prefetch: u16,
}

/// Consume `spec.queue` until `shutdown` is cancelled, handing each delivery
/// to `handler` and settling it by the returned [`Disposition`]. On shutdown
/// no new message is started, in-flight ones finish and are acked, then the
/// consumer is cancelled; prefetched but unstarted messages go back to the
/// queue when the channel closes.
pub async fn run<F, Fut>(
    channel: &Channel,
    spec: ConsumerSpec,
    shutdown: CancellationToken,
    handler: F,
) -> anyhow::Result<()>
where
    F: Fn(Delivery) -> Fut,
    Fut: Future<Output = Disposition>,
{
    // Per-consumer prefetch (global QoS is refused by quorum queues on 3.10).
    // A small prefetch keeps work spread across the competing consumers
    // instead of piling up in one process's buffer.
    channel
        .basic_qos(spec.prefetch, BasicQosOptions { global: false })
        .await
        .context("setting the prefetch")?;
    let consumer = channel
        .basic_consume(
            spec.queue.as_str().into(),
            spec.tag.as_str().into(),
            // Manual acks: a message is acked only after its work is committed.
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("consuming from {}", spec.queue))?;
    tracing::info!(queue = %spec.queue, prefetch = spec.prefetch, "consuming");

    let stream_failed = CancellationToken::new();
    consumer
        .take_until(shutdown.cancelled())
        .for_each_concurrent(usize::from(spec.prefetch.max(1)), |delivery| async {
            match delivery {
                Ok(delivery) => {
                    let acker = delivery.acker.clone();
                    let disposition = handler(delivery).await;
                    settle(&acker, disposition).await;
                }
                Err(error) => {
                    tracing::error!(queue = %spec.queue, error = %error, "the consumer failed");
                    stream_failed.cancel();
                }
            }
        })
        .await;

    if !shutdown.is_cancelled() || stream_failed.is_cancelled() {
        bail!("the consumer on {} stopped unexpectedly", spec.queue);
    }
    channel
        .basic_cancel(spec.tag.as_str().into(), BasicCancelOptions::default())
        .await
        .context("cancelling the consumer")?;
    tracing::info!(queue = %spec.queue, "consumer drained and cancelled");
    Ok(())
}

async fn settle(acker: &Acker, disposition: Disposition) {
    let settled = match &disposition {
        Disposition::Ack => acker.ack(BasicAckOptions::default()).await,
        Disposition::DeadLetter { reason } => {
            tracing::warn!(reason = %reason, "dead-lettering the message");
            acker.reject(BasicRejectOptions { requeue: false }).await
        }
        Disposition::Requeue { reason } => {
            tracing::warn!(reason = %reason, "returning the message to the queue");
            acker
                .nack(BasicNackOptions {
                    requeue: true,
                    multiple: false,
                })
                .await
        }
    };
    match settled {
        Ok(true) => {}
        // The channel was recovered since the delivery: the broker has already
        // requeued it, and the idempotent handler will skip the redelivery.
        Ok(false) => tracing::warn!(?disposition, "delivery not settled: it will be redelivered"),
        Err(error) => {
            tracing::error!(?disposition, error = %error, "settling the delivery failed: it will be redelivered")
        }
    }
}
