//! The consume loop shared by every consuming service: bounded prefetch,
//! the deliveries already waiting handled as one batch and acked together,
//! bounded concurrency, ack only after the handler has committed its work,
//! retries after a growing delay, dead letters with the reason, and a drain
//! on shutdown. What to do with one message is the handler's business; what
//! to do with its outcome is decided here, once: [`settle`] settles each
//! delivery by its disposition, through the [`ack_window`]; [`policy`] says
//! how failures are retried and deliveries batched; [`stalled`] notices a
//! subscription the broker no longer serves.

use std::{future::Future, time::Duration};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use lapin::{
    Channel,
    message::Delivery,
    options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions},
    types::FieldTable,
};
use tokio_util::sync::CancellationToken;

mod ack_window;
mod policy;
mod settle;
mod stalled;

use ack_window::AckWindow;
pub use policy::{Batching, RetryPolicy, previous_attempts};
pub use settle::MAX_REQUEUES;
use settle::{RequeueTally, Settler};

use crate::{Publisher, Topology};

/// Header counting the failed attempts a message has had so far.
pub const ATTEMPTS_HEADER: &str = "x-orderflow-attempts";
/// Header saying why a message was dead-lettered.
pub const REASON_HEADER: &str = "x-orderflow-reason";
/// Header naming the service that gave up on a message.
pub const SERVICE_HEADER: &str = "x-orderflow-service";
/// Header naming the queue a dead letter came from (where replay sends it).
pub const QUEUE_HEADER: &str = "x-orderflow-queue";
/// Header on a dead letter saying whether its order is held (see
/// [`Handler::dead_lettering`]).
pub const HELD_HEADER: &str = "x-orderflow-held";

/// What the consumer loop does with a delivery once the handler is done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// The work is committed (or was already done): ack.
    Ack,
    /// A transient failure: try again after a growing delay, and dead-letter
    /// the message once the attempts are used up.
    Retry {
        /// Why, for the log line and the dead letter.
        reason: String,
    },
    /// The message can never succeed: dead-letter it now.
    DeadLetter {
        /// Why, for the log line and the dead letter.
        reason: String,
    },
    /// Not the message's fault: something the handler needs (a pooled
    /// database connection) was not free in time. The same delivery is
    /// handed to the handler again after a growing pause, without counting
    /// an attempt; see [`RetryPolicy::max_wait`]. On shutdown it goes back to
    /// the queue.
    Wait {
        /// What the handler waited for, for the log line.
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
    /// The service consuming, written on the dead letters it makes.
    pub service: String,
    /// Unacked messages the broker may push to this consumer: how many are
    /// in hand at once.
    pub prefetch: u16,
    /// Most deliveries handed to the handler together (see
    /// [`Handler::handle_batch`] and [`Batching`]); 1 handles `prefetch`
    /// messages at once, each on its own.
    pub batch_size: u16,
    /// How failures are retried.
    pub retry: RetryPolicy,
}

/// What a consumer does with its deliveries.
pub trait Handler {
    /// Handle one delivery.
    fn handle(&self, delivery: Delivery) -> impl Future<Output = Disposition>;

    /// Handle deliveries that were waiting together, in one go: one
    /// disposition per delivery, in their order, or `None` when the batch
    /// failed as a whole and was rolled back; each delivery is then handed
    /// to [`Handler::handle`] on its own, so only the message at fault is
    /// retried or dead-lettered. A [`Disposition::Wait`] in the answer hands
    /// that delivery to [`Handler::handle`] too. By default each delivery is
    /// handled on its own, all of them at once.
    fn handle_batch(
        &self,
        deliveries: &[Delivery],
    ) -> impl Future<Output = Option<Vec<Disposition>>> {
        async move {
            Some(
                futures_util::future::join_all(deliveries.iter().map(|d| self.handle(copy(d))))
                    .await,
            )
        }
    }

    /// The message is about to be dead-lettered for `reason`: record it
    /// wherever the message's subject is read from (the processor marks the
    /// order held), before the dead letter is published; `true` if its order
    /// is held now, which the dead letter then says ([`HELD_HEADER`]). If
    /// recording fails, the dead letter goes anyway; by default nothing is
    /// recorded.
    fn dead_lettering(&self, data: &[u8], reason: &str) -> impl Future<Output = bool> {
        let _ = (data, reason);
        async { false }
    }
}

/// A handler of one delivery at a time, from a function.
#[derive(Clone)]
pub struct Each<F>(pub F);

impl<F, Fut> Handler for Each<F>
where
    F: Fn(Delivery) -> Fut,
    Fut: Future<Output = Disposition>,
{
    fn handle(&self, delivery: Delivery) -> impl Future<Output = Disposition> {
        (self.0)(delivery)
    }
}

/// Consume `spec.queue` until `shutdown` is cancelled or the channel fails,
/// handing the deliveries that are waiting, up to `spec.batch_size` at a
/// time, to `handler` and settling each by its [`Disposition`]. Acks are
/// sent with `multiple` once every earlier delivery is settled, so the
/// channel must be this consumer's own. On shutdown no new batch is
/// started, in-flight ones finish and are settled, then the consumer is
/// cancelled; prefetched but unstarted messages go back to the queue when
/// the channel closes.
pub async fn run<H: Handler>(
    channel: &Channel,
    topology: &Topology,
    publisher: &Publisher,
    spec: ConsumerSpec,
    shutdown: CancellationToken,
    handler: H,
) -> anyhow::Result<()> {
    // Per-consumer prefetch (global QoS is refused by quorum queues on 3.10).
    // A bounded prefetch keeps work spread across the competing consumers
    // instead of piling up in one process's buffer, and bounds memory.
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
    let Batching {
        batch_size,
        batches,
    } = Batching::of(spec.prefetch, spec.batch_size);
    let (batch_size, batches) = (usize::from(batch_size), usize::from(batches));
    tracing::info!(queue = %spec.queue, prefetch = spec.prefetch, batch_size, "consuming");
    metrics::gauge!("consumer_prefetch", "queue" => spec.queue.clone())
        .set(f64::from(spec.prefetch));
    let in_flight = metrics::gauge!("consumer_in_flight", "queue" => spec.queue.clone());
    let handling = metrics::histogram!("message_handling_seconds", "queue" => spec.queue.clone());
    let batch_sizes = metrics::histogram!("consumer_batch_size", "queue" => spec.queue.clone());

    // Stops taking deliveries on shutdown or when the stream fails; a failed
    // stream must not stop the other consumers of the service.
    let stop = shutdown.child_token();
    let failed = CancellationToken::new();
    let settler = Settler {
        handler: &handler,
        topology,
        publisher,
        spec: &spec,
        requeues: RequeueTally::default(),
        window: AckWindow::default(),
    };
    let stages = Stages::default();
    let received = std::sync::atomic::AtomicU64::new(0);
    let consuming = consumer
        .take_until(stop.clone().cancelled_owned())
        // Known to the ack window as soon as it arrives, before any later
        // delivery can be acked past it.
        .inspect(|delivery| {
            if let Ok(delivery) = delivery {
                received.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                settler.window.received(delivery.delivery_tag);
            }
        })
        // What is already there, up to a batch; never a wait to fill one,
        // so at low load a batch is one message and adds no latency.
        .ready_chunks(batch_size)
        .for_each_concurrent(batches, |received| async {
            let mut deliveries = Vec::with_capacity(received.len());
            for delivery in received {
                match delivery {
                    Ok(delivery) => deliveries.push(delivery),
                    Err(error) => {
                        tracing::error!(queue = %spec.queue, error = %error, "the consumer lost its channel");
                        failed.cancel();
                        stop.cancel();
                    }
                }
            }
            if deliveries.is_empty() {
                return;
            }
            let redelivered = deliveries.iter().filter(|d| d.redelivered).count();
            metrics::counter!("messages_redelivered_total", "queue" => spec.queue.clone())
                .increment(redelivered as u64);
            in_flight.increment(deliveries.len() as f64);
            batch_sizes.record(deliveries.len() as f64);
            let started = std::time::Instant::now();
            let dispositions = {
                let _handling = stages.handling.enter();
                handle_batch(&handler, &deliveries, &spec, &stop).await
            };
            let took = started.elapsed().as_secs_f64();
            for _ in &deliveries {
                handling.record(took);
            }
            in_flight.decrement(deliveries.len() as f64);
            let _settling = stages.settling.enter();
            settler.settle_all(deliveries, dispositions).await;
        });
    // Once the channel is lost, nothing in flight can be settled any more:
    // the broker hands those deliveries to the next consumer. Their handlers
    // may still finish (the effects are idempotent), but never hold up the
    // reconnect for long.
    let abandoned = async {
        tokio::select! {
            () = failed.cancelled() => {}
            () = closed(channel) => {}
        }
        tokio::time::sleep(LOST_CHANNEL_GRACE).await;
    };
    let stalled = stalled::stalled(channel, &spec.queue, &received, || {
        settler.window.holds_nothing()
    });
    tokio::select! {
        () = consuming => {}
        () = abandoned => tracing::error!(
            queue = %spec.queue,
            handling = stages.handling.count(),
            settling = stages.settling.count(),
            "batches still in flight {LOST_CHANNEL_GRACE:?} after the channel was lost; \
             abandoning them: the broker redelivers what was not acked"
        ),
        ready = stalled => {
            tracing::error!(
                queue = %spec.queue, ready,
                "{ready} message(s) have waited in the queue for {:?} while this consumer, holding \
                 none, received none: the broker is not serving its subscription; subscribing again",
                stalled::CHECK_EVERY * stalled::CHECKS
            );
            failed.cancel();
        }
    }

    if failed.is_cancelled() || !shutdown.is_cancelled() {
        bail!("the consumer on {} stopped", spec.queue);
    }
    channel
        .basic_cancel(spec.tag.as_str().into(), BasicCancelOptions::default())
        .await
        .context("cancelling the consumer")?;
    tracing::info!(queue = %spec.queue, "consumer drained and cancelled");
    Ok(())
}

/// How long batches in flight may still run after their channel is lost.
pub const LOST_CHANNEL_GRACE: Duration = Duration::from_secs(10);

/// How many batches are at each step, for the log line when the steps
/// after a lost channel do not finish.
#[derive(Default)]
struct Stages {
    handling: Stage,
    settling: Stage,
}

#[derive(Default)]
struct Stage(std::sync::atomic::AtomicUsize);

impl Stage {
    /// Count a batch in this step until the guard drops.
    fn enter(&self) -> StageGuard<'_> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        StageGuard(&self.0)
    }

    fn count(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

struct StageGuard<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for StageGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Returns once `channel` is no longer open (checked every half second):
/// the consumer stream may end without an error when it closes.
async fn closed(channel: &Channel) {
    while channel.status().connected() {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A batch's dispositions, one per delivery: from the handler's batch if it
/// succeeded, otherwise (and for each delivery it answered with
/// [`Disposition::Wait`]) from handling the delivery on its own.
async fn handle_batch<H: Handler>(
    handler: &H,
    deliveries: &[Delivery],
    spec: &ConsumerSpec,
    stop: &CancellationToken,
) -> Vec<Disposition> {
    // `None`: the delivery is handled on its own.
    let answered: Vec<Option<Disposition>> = match deliveries {
        [_] => vec![None],
        _ => match handler.handle_batch(deliveries).await {
            Some(dispositions) if dispositions.len() == deliveries.len() => dispositions
                .into_iter()
                .map(|d| match d {
                    Disposition::Wait { .. } => None,
                    done => Some(done),
                })
                .collect(),
            _ => {
                metrics::counter!("consumer_batches_split_total", "queue" => spec.queue.clone())
                    .increment(1);
                tracing::warn!(
                    messages = deliveries.len(),
                    "the batch failed as a whole: handling its messages one at a time"
                );
                vec![None; deliveries.len()]
            }
        },
    };
    let mut dispositions = Vec::with_capacity(deliveries.len());
    for (delivery, answer) in deliveries.iter().zip(answered) {
        dispositions.push(match answer {
            Some(done) => done,
            None => handle_patiently(handler, delivery, spec, stop).await,
        });
    }
    dispositions
}

/// Hand `delivery` to `handler`, and again after a growing pause for as
/// long as it answers [`Disposition::Wait`]: the message keeps its place
/// while what it needs is busy, with no attempt counted and no requeue
/// (which RabbitMQ 3.10 counts towards the delivery limit, and 4.3 does not
/// count at all). Past `max_wait` the wait counts as one failed attempt, so
/// a message cannot wait forever; on `stop` it is handed back.
async fn handle_patiently<H: Handler>(
    handler: &H,
    delivery: &Delivery,
    spec: &ConsumerSpec,
    stop: &CancellationToken,
) -> Disposition {
    let started = std::time::Instant::now();
    let mut waits = 0;
    loop {
        let reason = match handler.handle(copy(delivery)).await {
            Disposition::Wait { reason } => reason,
            done => return done,
        };
        metrics::counter!("messages_waited_total", "queue" => spec.queue.clone()).increment(1);
        waits += 1;
        let waited = started.elapsed();
        if waited >= spec.retry.max_wait {
            return Disposition::Retry {
                reason: format!("still waiting after {waited:?}: {reason}"),
            };
        }
        let pause = spec.retry.delay(waits);
        tracing::warn!(
            reason = %reason, waits,
            "waiting {pause:?} before handling the message again (not counted as an attempt)"
        );
        tokio::select! {
            () = stop.cancelled() => return Disposition::Wait { reason },
            () = tokio::time::sleep(pause) => {}
        }
    }
}

/// The same delivery again, for another try of the handler.
fn copy(delivery: &Delivery) -> Delivery {
    Delivery {
        delivery_tag: delivery.delivery_tag,
        exchange: delivery.exchange.clone(),
        routing_key: delivery.routing_key.clone(),
        redelivered: delivery.redelivered,
        properties: delivery.properties.clone(),
        data: delivery.data.clone(),
        acker: delivery.acker.clone(),
    }
}
