//! The consume loop shared by every consuming service: bounded prefetch,
//! the deliveries already waiting handled as one batch and acked together,
//! bounded concurrency, ack only after the handler has committed its work,
//! retries after a growing delay, dead letters with the reason, and a drain
//! on shutdown. What to do with one message is the handler's business; what
//! to do with its outcome is decided here, once.

use std::{future::Future, time::Duration};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use lapin::{
    Acker, BasicProperties, Channel,
    message::Delivery,
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
        BasicQosOptions, BasicRejectOptions,
    },
    types::{AMQPValue, FieldTable, LongString},
};
use tokio_util::sync::CancellationToken;

mod stalled;

use crate::{
    Publisher, Topology,
    topology::{RETRY_DELAY_HEADER, WATCH_DEAD_LETTERED, WATCH_RETRYING},
};

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

/// How failed messages are retried.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts in all, the first included, before a message is dead-lettered.
    pub max_attempts: u32,
    /// Delay before the first retry; doubled for each further one.
    pub initial_delay: Duration,
    /// The longest delay.
    pub max_delay: Duration,
    /// How long one delivery may keep answering [`Disposition::Wait`] before
    /// that counts as a failed attempt: it bounds how long a message waits,
    /// and stays well under the broker's consumer timeout (30 min by
    /// default), past which it would close the channel.
    pub max_wait: Duration,
}

impl RetryPolicy {
    /// The delay before retry number `retry` (1 for the first retry).
    pub fn delay(&self, retry: u32) -> Duration {
        let factor = 2u32.saturating_pow(retry.saturating_sub(1));
        self.initial_delay
            .saturating_mul(factor)
            .min(self.max_delay)
    }

    /// Every delay a retry can wait, each once: the retry queues to declare.
    pub fn delays(&self) -> Vec<Duration> {
        let mut delays: Vec<Duration> = (1..self.max_attempts).map(|r| self.delay(r)).collect();
        delays.dedup();
        delays
    }
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

/// How a consumer splits the deliveries it has in hand into batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    /// Most deliveries in one batch: `batch_size`, but at most half the
    /// prefetch, so one batch can fill while another runs.
    pub batch_size: u16,
    /// Batches handled at once: as many as the prefetch fills. While they
    /// run, the deliveries that arrive wait and become the next batch, so
    /// batches grow with the load instead of splitting it into many small
    /// ones.
    pub batches: u16,
}

impl Batching {
    pub fn of(prefetch: u16, batch_size: u16) -> Self {
        let prefetch = prefetch.max(1);
        let batch_size = batch_size.clamp(1, (prefetch / 2).max(1));
        Self {
            batch_size,
            batches: prefetch.div_ceil(batch_size),
        }
    }
}

/// The failed attempts a delivery has had before this one.
pub fn previous_attempts(properties: &BasicProperties) -> u32 {
    let value = properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(ATTEMPTS_HEADER).cloned());
    match value {
        Some(AMQPValue::LongUInt(n)) => n,
        Some(AMQPValue::LongInt(n)) => u32::try_from(n).unwrap_or(0),
        Some(AMQPValue::LongLongInt(n)) => u32::try_from(n).unwrap_or(0),
        Some(AMQPValue::ShortUInt(n)) => u32::from(n),
        _ => 0,
    }
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

/// The longest [`Handler::dead_lettering`] may hold up the dead letter.
const HOOK_TIMEOUT: Duration = Duration::from_secs(5);

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

struct Settler<'a, H> {
    handler: &'a H,
    topology: &'a Topology,
    publisher: &'a Publisher,
    spec: &'a ConsumerSpec,
    requeues: RequeueTally,
    window: AckWindow,
}

impl<H: Handler> Settler<'_, H> {
    /// Settle a batch: the deliveries to ack wait in the window for one
    /// `multiple` ack; the others are settled one by one.
    async fn settle_all(&self, deliveries: Vec<Delivery>, dispositions: Vec<Disposition>) {
        for (delivery, disposition) in deliveries.into_iter().zip(dispositions) {
            self.settle(delivery, disposition).await;
        }
        self.window.flush().await;
    }

    async fn settle(&self, delivery: Delivery, disposition: Disposition) {
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

/// Log a settlement that did not reach the broker.
fn report(settled: lapin::Result<bool>) {
    match settled {
        Ok(true) => {}
        // The channel went away since the delivery: the broker requeues
        // it, and the idempotent handler skips the redelivery.
        Ok(false) => tracing::warn!("delivery not settled: it will be redelivered"),
        Err(error) => {
            tracing::warn!(error = %error, "settling the delivery failed: it will be redelivered")
        }
    }
}

/// The deliveries of one channel not yet settled, by delivery tag: `None`
/// while being handled, the acker once ready to be acked. A `multiple` ack
/// covers every earlier unsettled delivery of the channel, so it is sent
/// for the last of the ready deliveries that no unsettled one precedes; and
/// never for a tag settled before (which would close the channel).
#[derive(Default)]
struct AckWindow {
    unsettled: std::sync::Mutex<std::collections::BTreeMap<u64, Option<Acker>>>,
    /// Held while acking, so acks leave in the order of their tags.
    acking: tokio::sync::Mutex<()>,
}

impl AckWindow {
    fn slots(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<u64, Option<Acker>>> {
        self.unsettled
            .lock()
            .expect("the ack window is never poisoned")
    }

    fn received(&self, tag: u64) {
        self.slots().insert(tag, None);
    }

    fn ready(&self, tag: u64, acker: Acker) {
        self.slots().insert(tag, Some(acker));
    }

    /// Whether no delivery is in hand: none being handled, none waiting
    /// for its ack.
    fn holds_nothing(&self) -> bool {
        self.slots().is_empty()
    }

    /// Settled on its own (retried, dead-lettered, handed back).
    fn settled(&self, tag: u64) {
        self.slots().remove(&tag);
    }

    /// Ack every ready delivery: those that no unsettled one precedes in
    /// one `multiple` ack, the others (behind a delivery still being
    /// handled, which may take long) one by one, so none waits for it.
    async fn flush(&self) {
        let _acking = self.acking.lock().await;
        let (last, behind) = {
            let mut slots = self.slots();
            let mut last = None;
            while let Some(slot) = slots.first_entry() {
                if slot.get().is_none() {
                    break;
                }
                last = slot.remove();
            }
            let behind: Vec<u64> = slots
                .iter()
                .filter_map(|(tag, slot)| slot.as_ref().map(|_| *tag))
                .collect();
            let behind: Vec<Acker> = behind
                .into_iter()
                .filter_map(|tag| slots.remove(&tag).flatten())
                .collect();
            (last, behind)
        };
        if let Some(acker) = last {
            report(acker.ack(BasicAckOptions { multiple: true }).await);
        }
        for acker in behind {
            report(acker.ack(BasicAckOptions::default()).await);
        }
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
struct RequeueTally(std::sync::Mutex<std::collections::HashMap<String, u32>>);

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
    fn retry_delays_double_up_to_the_cap() {
        let policy = RetryPolicy {
            max_attempts: 6,
            initial_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(3),
            max_wait: Duration::from_secs(60),
        };
        let delays: Vec<u128> = (1..=5).map(|r| policy.delay(r).as_millis()).collect();
        assert_eq!(delays, [500, 1000, 2000, 3000, 3000]);
    }

    #[test]
    fn each_retry_delay_is_listed_once() {
        let policy = RetryPolicy {
            max_attempts: 8,
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(30),
            max_wait: Duration::from_secs(600),
        };
        let delays: Vec<u64> = policy.delays().iter().map(Duration::as_secs).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 30]);
    }

    #[test]
    fn a_message_is_requeued_a_bounded_number_of_times() {
        let tally = RequeueTally::default();
        let counts: Vec<u32> = (0..3).map(|_| tally.record("m1")).collect();
        assert_eq!(counts, [1, 2, 3]);
        assert_eq!(tally.record("m2"), 1);
        tally.forget("m1");
        assert_eq!(tally.record("m1"), 1);
    }

    #[test]
    fn the_attempt_count_is_read_from_the_header() {
        assert_eq!(previous_attempts(&BasicProperties::default()), 0);
        let props = with_header(
            BasicProperties::default(),
            ATTEMPTS_HEADER,
            AMQPValue::LongUInt(3),
        );
        assert_eq!(previous_attempts(&props), 3);
    }
}
