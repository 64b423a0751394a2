//! Live order events, pushed to clients as Server-Sent Events.
//!
//! While at least one client is connected, order-api binds a transient,
//! exclusive queue of its own to the order-events fanout exchange and fans
//! what arrives out to the connected clients through an in-process
//! broadcast channel; it adds the acceptances it makes itself. While no one
//! watches, the queue is gone and no order costs it anything. A client that
//! falls too far behind is dropped rather than slowing the others down.
//!
//! With `EVENT_BUS=postgres` the order events are read from the event log
//! in Postgres instead, from its end, while anyone watches (see [`log`]);
//! with `WORK_QUEUE=postgres` the jobs retried and dead-lettered are heard
//! on a Postgres channel (see [`jobs`]).
//!
//! Each event carries whose order it is about (see [`owners`]), so that a
//! client key is sent its own orders' events only.

mod jobs;
mod log;
mod owners;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use lapin::{
    message::Delivery,
    options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
};
use messaging::{
    Broker,
    consumer::{ATTEMPTS_HEADER, HELD_HEADER, QUEUE_HEADER, REASON_HEADER},
    contracts::{OrderEvent, Outcome},
    topology::{RETRY_DELAY_HEADER, WATCH_DEAD_LETTERED, WATCH_RETRYING},
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::PgPool;
use tokio::sync::{Notify, broadcast, watch};
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;
use uuid::Uuid;

use owners::Owners;

/// Events buffered per client before it counts as too slow and is dropped.
const BUFFER: usize = 1024;

/// How often the feed looks whether anyone still watches.
const WATCHERS_CHECK: Duration = Duration::from_secs(1);

/// How long a new client waits for the feed's queue to be bound before its
/// stream starts anyway (the broker may be down).
const BIND_WAIT: Duration = Duration::from_secs(2);

/// One step of an order's life, as a client sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct LiveEvent {
    pub order_id: Uuid,
    pub customer_id: String,
    /// `accepted`, `held`, `processed`, `rejected`, `notified`, `retrying`
    /// or `dead_lettered`; also the SSE event name.
    pub status: String,
    /// Why it was rejected, held, retried or dead-lettered.
    pub reason: Option<String>,
    /// `standard` or `express`: the lane the order took (empty on a retry
    /// or dead letter, which only name the queue).
    pub lane: String,
    /// Which processor decided (on `processed` and `rejected` events).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub processed_by: Option<String>,
    pub at: DateTime<Utc>,
    /// Whose order it is: the client of the key that placed it; `None` when
    /// that is not known, and then only admin keys are sent the event.
    #[serde(skip)]
    pub client: Option<Arc<str>>,
}

impl LiveEvent {
    /// Whether nothing more happens to the order after this.
    pub fn is_last(&self) -> bool {
        self.status == "notified"
    }

    /// The order's final status (processed or rejected).
    pub fn is_final(&self) -> bool {
        matches!(self.status.as_str(), "processed" | "rejected")
    }

    /// Whether a caller who may see `owner`'s orders (`None`: everyone's,
    /// an admin) is sent this event.
    pub fn is_for(&self, owner: Option<&str>) -> bool {
        owner.is_none_or(|owner| self.client.as_deref() == Some(owner))
    }

    /// The event of an order's outcome; whose order it is, the feed learns.
    fn of_event(event: &OrderEvent) -> Self {
        let (status, reason) = match &event.outcome {
            Outcome::Processed => ("processed", None),
            Outcome::Rejected { reason } => ("rejected", Some(reason.clone())),
        };
        Self {
            order_id: event.order_id,
            customer_id: event.customer_id.clone(),
            status: status.into(),
            reason,
            lane: event.lane.as_str().into(),
            processed_by: Some(event.processed_by.clone()),
            at: event.occurred_at,
            client: None,
        }
    }

    /// A consumer's copy of a message it sent to a retry queue or the
    /// dead-letter queue (an order for a processor, or an event for a
    /// subscriber): which it is, from the routing key; which order it is
    /// about, from its body; and from its headers what went wrong, and
    /// whether the consumer held the order (then it is `held`, not
    /// `dead_lettered`). Whose order it is, the feed learns.
    fn of_failure(delivery: &Delivery) -> Option<Self> {
        let status = match delivery.routing_key.as_str() {
            WATCH_RETRYING => WATCH_RETRYING,
            WATCH_DEAD_LETTERED => WATCH_DEAD_LETTERED,
            _ => return None,
        };
        #[derive(Deserialize)]
        struct About {
            order_id: Uuid,
            customer_id: String,
        }
        let about: About = serde_json::from_slice(&delivery.data).ok()?;
        let headers = delivery.properties.headers().clone().unwrap_or_default();
        // The processor held the order before it published the dead letter,
        // and says so on it; any other dead letter (an event a subscriber
        // gave up on, an order that could not be held) is only that.
        let held = matches!(
            headers.inner().get(HELD_HEADER),
            Some(AMQPValue::Boolean(true))
        );
        let status = if status == WATCH_DEAD_LETTERED && held {
            "held"
        } else {
            status
        };
        let header = |name: &str| match headers.inner().get(name) {
            Some(AMQPValue::LongString(s)) => Some(s.to_string()),
            Some(AMQPValue::ShortString(s)) => Some(s.to_string()),
            Some(AMQPValue::LongUInt(n)) => Some(n.to_string()),
            _ => None,
        };
        let attempt = header(ATTEMPTS_HEADER).unwrap_or_else(|| "?".into());
        let queue = header(QUEUE_HEADER).unwrap_or_else(|| "its queue".into());
        let reason = if status == WATCH_RETRYING {
            let delay = header(RETRY_DELAY_HEADER).unwrap_or_else(|| "?".into());
            format!("attempt {attempt} on {queue} failed; retrying in {delay} ms")
        } else {
            format!(
                "{} (after {attempt} attempts on {queue})",
                header(REASON_HEADER).unwrap_or_else(|| "rejected by the broker".into()),
            )
        };
        Some(Self {
            order_id: about.order_id,
            customer_id: about.customer_id,
            status: status.into(),
            reason: Some(reason),
            lane: String::new(),
            processed_by: None,
            at: Utc::now(),
            client: None,
        })
    }
}

/// One Server-Sent Event as it arrives, for the document: in OpenAPI 3.1 a
/// `text/event-stream` schema describes each event's fields, so `data` is a
/// string holding a [`LiveEvent`] as JSON (`contentSchema`), or the `lagged`
/// notice. Heartbeats are comments, not events.
pub struct SseEvent;

impl utoipa::PartialSchema for SseEvent {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        let name = |names: serde_json::Value| json!({"type": "string", "enum": names});
        serde_json::from_value(json!({"oneOf": [
            {
                "type": "object",
                "required": ["event", "data"],
                "properties": {
                    "event": name(json!(["accepted", "held", "processed", "rejected", "notified", "retrying", "dead_lettered"])),
                    // Its `contentSchema`, a LiveEvent, is added by
                    // `openapi::document`: utoipa's types cannot hold it.
                    "data": {"type": "string", "contentMediaType": "application/json"}
                }
            },
            {
                "type": "object",
                "required": ["event", "data"],
                "properties": {"event": name(json!(["lagged"])), "data": {"type": "string"}},
                "description": "Too slow to keep up: the stream ends after this"
            }
        ]}))
        .expect("a valid schema")
    }
}

impl ToSchema for SseEvent {}

/// The in-process fan-out of live events.
#[derive(Clone)]
pub struct Feed {
    sender: broadcast::Sender<Arc<LiveEvent>>,
    /// Cancelled when order-api stops: open streams end, so the HTTP
    /// server's graceful shutdown is not held up by them.
    stopped: CancellationToken,
    /// Whether the feed's queue is bound and consumed: events published
    /// from now on reach the clients.
    live: Arc<watch::Sender<bool>>,
    /// Wakes the feed when a client arrives.
    arrived: Arc<Notify>,
    /// Whose each order is, learned only while a client key watches.
    owners: Arc<Owners>,
    /// Streams open for client keys (not admin keys).
    client_watchers: Arc<AtomicUsize>,
}

/// A stream open for a client key, counted until dropped: while there is
/// one, the feed learns whose each event's order is.
pub struct ClientWatch {
    watchers: Arc<AtomicUsize>,
}

impl Drop for ClientWatch {
    fn drop(&mut self) {
        self.watchers.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Where the live feed hears of order events (`EVENT_BUS`).
pub enum EventSource {
    /// RabbitMQ's order-events exchange (and the consumers' wire tap).
    Broker(Broker),
    /// The event log in Postgres.
    Log(PgPool),
}

impl Feed {
    /// A feed that learns whose orders are from `pool`.
    pub fn new(pool: PgPool) -> Self {
        Self {
            sender: broadcast::channel(BUFFER).0,
            stopped: CancellationToken::new(),
            live: Arc::new(watch::channel(false).0),
            arrived: Arc::default(),
            owners: Arc::new(Owners::new(pool)),
            client_watchers: Arc::default(),
        }
    }

    /// Cancelled once order-api is stopping.
    pub fn stopped(&self) -> CancellationToken {
        self.stopped.clone()
    }

    /// Every event from now on: once this returns, the feed follows the
    /// exchange (or could not within [`BIND_WAIT`], the broker being away).
    pub async fn subscribe(&self) -> broadcast::Receiver<Arc<LiveEvent>> {
        let receiver = self.sender.subscribe();
        self.arrived.notify_one();
        let mut live = self.live.subscribe();
        let _ = tokio::time::timeout(BIND_WAIT, live.wait_for(|live| *live)).await;
        receiver
    }

    /// Whether no client is connected, now that the feed says it is not
    /// live: a client arriving after this waits for the feed to come back.
    fn unwatched(&self) -> bool {
        self.live.send_replace(false);
        let unwatched = self.sender.receiver_count() == 0;
        if !unwatched {
            self.live.send_replace(true);
        }
        unwatched
    }

    /// Count a client key's stream until the answer is dropped; take it
    /// before [`Feed::subscribe`], so the events it is sent say whose they
    /// are.
    pub fn client_watching(&self) -> ClientWatch {
        self.client_watchers.fetch_add(1, Ordering::SeqCst);
        ClientWatch {
            watchers: self.client_watchers.clone(),
        }
    }

    fn clients_watch(&self) -> bool {
        self.client_watchers.load(Ordering::SeqCst) > 0
    }

    /// Hand `event`, about an order of the client it names, to every
    /// connected client (none may be listening).
    pub fn publish(&self, event: LiveEvent) {
        if let Some(client) = &event.client
            && self.clients_watch()
        {
            self.owners.remember(event.order_id, client.clone());
        }
        let _ = self.sender.send(Arc::new(event));
    }

    /// Hand `event`, heard from the broker, to every connected client, with
    /// whose order it is about when a client key watches.
    async fn publish_heard(&self, mut event: LiveEvent) {
        if self.clients_watch() {
            event.client = self.owners.of(event.order_id).await;
        }
        let _ = self.sender.send(Arc::new(event));
    }

    /// Follow the order events from `source` while anyone watches, until
    /// `shutdown`: on RabbitMQ, the order-events exchange through a queue
    /// of this process's own, reconnecting when the broker goes away.
    pub async fn run(self, source: EventSource, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            if self.sender.receiver_count() == 0 {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = self.arrived.notified() => continue,
                }
            }
            let followed = match &source {
                EventSource::Broker(broker) => self.follow(broker, &shutdown).await,
                EventSource::Log(pool) => self.follow_log(pool, &shutdown).await,
            };
            self.live.send_replace(false);
            if let Err(error) = followed {
                tracing::warn!(error.message = %format!("{error:#}"), "live event feed interrupted; reconnecting");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
        self.stopped.cancel();
    }

    async fn follow(&self, broker: &Broker, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let Some(connection) = broker.connect(shutdown).await else {
            return Ok(());
        };
        let channel = connection.create_channel().await?;
        // Server-named, exclusive and auto-deleted: it lives exactly as long
        // as this connection, and only this process reads it.
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        // The events, and a wire tap: the consumers' copies of every retry
        // and every dead letter, so a watcher sees them on the order they
        // happened to.
        let topology = broker.topology();
        let events = topology.events_exchange();
        for exchange in [events.clone(), topology.watch_exchange()] {
            channel
                .queue_bind(
                    queue.name().clone(),
                    exchange.as_str().into(),
                    "".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        let mut deliveries = channel
            .basic_consume(
                queue.name().clone(),
                "order-api-live".into(),
                // A live view, not a record: what is missed while
                // disconnected is read from Postgres by each new client.
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        tracing::info!(queue = %queue.name(), "following order events for live clients");
        self.live.send_replace(true);
        let mut check = tokio::time::interval(WATCHERS_CHECK);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                _ = check.tick() => if self.unwatched() {
                    // The queue is auto-deleted with its consumer.
                    channel.close(200, "no one is watching".into()).await?;
                    tracing::info!("no live clients: stopped following order events");
                    return Ok(());
                },
                delivery = deliveries.next() => match delivery {
                    Some(Ok(delivery)) if delivery.exchange.as_str() == events => {
                        match serde_json::from_slice::<OrderEvent>(&delivery.data) {
                            Ok(event) => self.publish_heard(LiveEvent::of_event(&event)).await,
                            Err(error) => tracing::warn!(error = %error, "ignoring an undecodable order event"),
                        }
                    }
                    Some(Ok(delivery)) => {
                        if let Some(event) = LiveEvent::of_failure(&delivery) {
                            self.publish_heard(event).await;
                        }
                    }
                    Some(Err(error)) => return Err(error.into()),
                    None => anyhow::bail!("the live event consumer was cancelled"),
                },
            }
        }
    }
}

/// Caps on open event streams, per API key and in all: each open stream
/// holds a [`StreamSlot`], given back when the stream ends.
#[derive(Clone)]
pub struct Streams {
    open: Arc<std::sync::Mutex<OpenStreams>>,
    per_key: u32,
    total: u32,
}

#[derive(Default)]
struct OpenStreams {
    total: u32,
    by_key: std::collections::HashMap<Uuid, u32>,
}

/// One open stream, counted until dropped.
pub struct StreamSlot {
    streams: Streams,
    key: Uuid,
}

impl Streams {
    pub fn new(per_key: u32, total: u32) -> Self {
        Self {
            open: Arc::default(),
            per_key,
            total,
        }
    }

    /// A slot for one more stream of `key`, or which cap it would break.
    pub fn open(&self, key: Uuid) -> Result<StreamSlot, &'static str> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.total >= self.total {
            return Err("the server's limit");
        }
        let of_key = open.by_key.entry(key).or_default();
        if *of_key >= self.per_key {
            return Err("this API key's limit");
        }
        *of_key += 1;
        open.total += 1;
        metrics::gauge!("sse_streams_open").set(f64::from(open.total));
        Ok(StreamSlot {
            streams: self.clone(),
            key,
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.streams.open.lock().unwrap_or_else(|p| p.into_inner());
        open.total = open.total.saturating_sub(1);
        if let Some(of_key) = open.by_key.get_mut(&self.key) {
            *of_key -= 1;
            if *of_key == 0 {
                open.by_key.remove(&self.key);
            }
        }
        metrics::gauge!("sse_streams_open").set(f64::from(open.total));
    }
}
