//! The event log: a RabbitMQ stream bound to the order-events fanout. A
//! stream keeps what it receives (until its retention drops whole segments),
//! whoever has read it; each reader says where to start with
//! `x-stream-offset` and gets every entry with its offset.

use anyhow::{Context, bail};
use futures_util::StreamExt;
use lapin::{
    Channel,
    message::Delivery,
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions,
        QueueBindOptions, QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable},
};
use messaging::{Topology, topology::string};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::model::{self, Entry};

/// How long the log keeps events.
#[derive(Debug, Clone)]
pub struct Retention {
    /// RabbitMQ's `x-max-age`: `7D`, `12h`.
    pub max_age: String,
    pub max_bytes: u64,
}

impl Retention {
    /// The stream's arguments. Retention drops whole segments, so a segment
    /// is a tenth of the size limit (at most RabbitMQ's default 500 MB).
    fn arguments(&self) -> FieldTable {
        let max_bytes = i64::try_from(self.max_bytes).unwrap_or(i64::MAX);
        let segment = (max_bytes / 10).min(500_000_000);
        let mut arguments = FieldTable::default();
        arguments.insert("x-queue-type".into(), string("stream"));
        arguments.insert("x-max-age".into(), string(&self.max_age));
        arguments.insert(
            "x-max-length-bytes".into(),
            AMQPValue::LongLongInt(max_bytes),
        );
        arguments.insert(
            "x-stream-max-segment-size-bytes".into(),
            AMQPValue::LongLongInt(segment),
        );
        arguments
    }
}

/// Declare the log and bind it to the events exchange (the exchange is
/// declared with the rest of the topology on connecting). From then on it
/// keeps every event, whether or not anyone reads it.
pub async fn declare(
    channel: &Channel,
    topology: &Topology,
    retention: &Retention,
) -> anyhow::Result<()> {
    let name = topology.event_log();
    channel
        .queue_declare(
            name.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            retention.arguments(),
        )
        .await
        .with_context(|| {
            format!(
                "declaring the stream {name} (if it exists with another retention, delete it or \
                 set EVENT_LOG_MAX_AGE and EVENT_LOG_MAX_BYTES to what it has)"
            )
        })?;
    channel
        .queue_bind(
            name.as_str().into(),
            topology.events_exchange().as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("binding {name} to {}", topology.events_exchange()))?;
    Ok(())
}

/// The offset RabbitMQ gives each entry of a stream.
fn offset(delivery: &Delivery) -> Option<i64> {
    let headers = delivery.properties.headers().as_ref()?;
    match headers.inner().get("x-stream-offset")? {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        _ => None,
    }
}

/// What one reading round needs.
pub struct Reader<'a> {
    pub pool: &'a PgPool,
    pub topology: &'a Topology,
    /// Entries in hand at once (the stream's credit).
    pub prefetch: u16,
    pub batch_size: usize,
    pub tag: String,
}

impl Reader<'_> {
    /// Read the log on `channel` from the stored position (or the
    /// beginning) until `stop`, counting each batch in one transaction
    /// before acking it. Returns on `stop`, or with the error that ended
    /// the round; the next round starts again from the stored position,
    /// so nothing is skipped or counted twice.
    pub async fn run(&self, channel: &Channel, stop: &CancellationToken) -> anyhow::Result<()> {
        let stream = self.topology.event_log();
        // A stream refuses a consumer without a prefetch.
        channel
            .basic_qos(self.prefetch, BasicQosOptions { global: false })
            .await
            .context("setting the prefetch")?;
        let position = model::position(self.pool, &stream).await?;
        let start = match &position {
            Some(position) => AMQPValue::LongLongInt(position.next_offset),
            None => string("first"),
        };
        let mut arguments = FieldTable::default();
        arguments.insert("x-stream-offset".into(), start);
        let consumer = channel
            .basic_consume(
                stream.as_str().into(),
                self.tag.as_str().into(),
                BasicConsumeOptions::default(),
                arguments,
            )
            .await
            .with_context(|| format!("reading {stream}"))?;
        match &position {
            Some(position) => tracing::info!(
                stream = %stream, offset = position.next_offset, events = position.events,
                "reading the event log from the stored position"
            ),
            None => tracing::info!(stream = %stream, "reading the event log from the beginning"),
        }
        let batches = consumer
            .take_until(stop.clone().cancelled_owned())
            .ready_chunks(self.batch_size);
        let mut batches = std::pin::pin!(batches);
        while let Some(received) = batches.next().await {
            let deliveries = received
                .into_iter()
                .collect::<Result<Vec<_>, _>>()
                .context("the stream consumer lost its channel")?;
            self.count(&stream, &deliveries).await?;
        }
        if !stop.is_cancelled() {
            bail!("the broker cancelled the reader of {stream}");
        }
        channel
            .basic_cancel(self.tag.as_str().into(), BasicCancelOptions::default())
            .await
            .context("cancelling the reader")?;
        Ok(())
    }

    /// Count a batch in one transaction, then ack it (on a stream an ack
    /// only grants credit for more).
    async fn count(&self, stream: &str, deliveries: &[Delivery]) -> anyhow::Result<()> {
        let mut entries = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            let Some(offset) = offset(delivery) else {
                bail!("an entry of {stream} came without its x-stream-offset");
            };
            entries.push(Entry::decode(offset, delivery.data.clone()));
        }
        let applied = model::apply(self.pool, stream, &entries)
            .await
            .context("counting a batch of events")?;
        for entry in &entries {
            if let Err(reason) = &entry.event {
                tracing::warn!(offset = entry.offset, reason = %reason, "skipped an entry of the event log");
            }
        }
        metrics::counter!("event_log_events_total").increment(applied.counted);
        metrics::counter!("event_log_duplicates_total").increment(applied.duplicates);
        metrics::counter!("event_log_skipped_total").increment(applied.skipped);
        if let Some(last) = entries.iter().map(|e| e.offset).max() {
            metrics::gauge!("event_log_next_offset").set(last as f64 + 1.0);
        }
        if let Some(last) = deliveries.last() {
            last.acker
                .ack(BasicAckOptions { multiple: true })
                .await
                .context("acking a batch of the stream")?;
        }
        Ok(())
    }
}
