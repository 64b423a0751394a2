//! Every exchange and queue name in the system, what each queue is bound
//! to, and the policy that carries each queue's tunable arguments. Queues are
//! declared with nothing but their type (arguments can never change on a
//! declared queue); delivery limits, dead-letter targets and TTLs live in
//! broker policies, which can change on a running broker. Declaring and
//! migrating is in [`crate::declaration`].

use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable, LongString};
use serde_json::{Value, json};

use crate::contracts::Lane;

/// Redeliveries after which a quorum queue dead-letters a message that keeps
/// failing: the safety net for crash loops, not the retry mechanism (our own
/// attempt counter is; see [`crate::consumer`]).
pub const DELIVERY_LIMIT: i32 = 10;

/// Header a retried message carries to pick its retry queue: the delay in
/// milliseconds.
pub const RETRY_DELAY_HEADER: &str = "orderflow-retry-delay-ms";

/// Routing key of the copy of a retry on the watch exchange.
pub const WATCH_RETRYING: &str = "retrying";
/// Routing key of the copy of a dead letter on the watch exchange.
pub const WATCH_DEAD_LETTERED: &str = "dead_lettered";

/// The names of everything on the broker, optionally prefixed so that tests
/// (and several deployments on one broker) never see each other's messages.
#[derive(Debug, Clone, Default)]
pub struct Topology {
    prefix: String,
    queue_expires_ms: Option<u32>,
    retry_delays: Vec<Duration>,
}

/// The services that own a durable queue on the order-events exchange.
pub const SUBSCRIBERS: [&str; 2] = ["notification-service", "logging-service"];

/// One queue: its name, what it is bound to and the policy it runs under.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueSpec {
    /// The queue's name.
    pub name: String,
    /// The exchanges (and routing keys, and binding arguments) it is bound to.
    pub bindings: Vec<Binding>,
    /// The policy definition carrying its tunable arguments, if it needs one.
    pub policy: Option<Value>,
}

/// One binding of a queue to an exchange.
#[derive(Debug, Clone, PartialEq)]
pub struct Binding {
    /// The exchange.
    pub exchange: String,
    /// The routing key.
    pub key: String,
    /// Binding arguments (the headers a headers exchange matches).
    pub arguments: FieldTable,
}

impl Topology {
    /// A topology whose names start with `prefix` (empty in production).
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            ..Self::default()
        }
    }

    /// Let the broker delete the queues after they have been unused this long
    /// (`x-expires`); for throwaway test topologies.
    pub fn with_queue_expiry_ms(mut self, expires_ms: Option<u32>) -> Self {
        self.queue_expires_ms = expires_ms;
        self
    }

    /// Declare one retry queue for each of these delays (the delays a
    /// consuming service's retry policy uses).
    pub fn with_retry_delays(mut self, delays: impl IntoIterator<Item = Duration>) -> Self {
        self.retry_delays = delays.into_iter().collect();
        self.retry_delays.sort();
        self.retry_delays.dedup();
        self
    }

    /// The `x-expires` of a throwaway topology's queues.
    pub fn queue_expires_ms(&self) -> Option<u32> {
        self.queue_expires_ms
    }

    /// The prefix, if this is a prefixed (throwaway) topology.
    pub fn prefix(&self) -> Option<&str> {
        Some(self.prefix.as_str()).filter(|p| !p.is_empty())
    }

    fn name(&self, base: &str) -> String {
        if self.prefix.is_empty() {
            base.to_owned()
        } else {
            format!("{}.{base}", self.prefix)
        }
    }

    /// Direct exchange that order-api publishes accepted orders to; the routing
    /// key is the lane.
    pub fn orders_exchange(&self) -> String {
        self.name("orders")
    }

    /// The work queue of one lane, consumed by the competing processors.
    pub fn work_queue(&self, lane: Lane) -> String {
        self.name(&format!("orders.{}", lane.as_str()))
    }

    /// Fanout exchange that announces every processed or rejected order.
    pub fn events_exchange(&self) -> String {
        self.name("order-events")
    }

    /// The durable queue one subscribing service owns on the events exchange.
    pub fn subscriber_queue(&self, service: &str) -> String {
        self.name(&format!("order-events.{service}"))
    }

    /// The stream on the events exchange that keeps every event (by age and
    /// size), for readers that start where they like and replay.
    pub fn event_log(&self) -> String {
        self.name("order-events.log")
    }

    /// Exchange (fanout) and queue that hold messages no consumer could handle.
    pub fn dead_letters(&self) -> String {
        self.name("orders.dead")
    }

    /// Fanout exchange where consumers put a copy of each retry and dead
    /// letter once the real one is confirmed (routing key
    /// [`WATCH_RETRYING`] or [`WATCH_DEAD_LETTERED`]), for whoever watches
    /// (order-api's live page); with no queue bound, the broker drops them.
    /// Watchers bind here rather than to the retry and dead-letter
    /// exchanges, where their queue would take a message that no retry or
    /// dead-letter queue took, so its publish would no longer be returned
    /// as unroutable.
    pub fn watch_exchange(&self) -> String {
        self.name("orders.watch")
    }

    /// Headers exchange a failed message is published to, with its queue as
    /// the routing key and its delay in [`RETRY_DELAY_HEADER`]: it lands in
    /// the retry queue of that delay, which dead-letters it back onto its
    /// queue (through the default exchange, by that routing key) once the
    /// delay is up.
    pub fn retry_exchange(&self) -> String {
        self.name("orders.retry")
    }

    /// The queue where messages wait out a retry delay of `delay`. Every
    /// message in it has the same TTL, so each leaves exactly on time (a
    /// per-message TTL only expires messages at the head of a queue).
    pub fn retry_queue(&self, delay: Duration) -> String {
        self.name(&format!("orders.retry.{}ms", delay.as_millis()))
    }

    /// The retry queue of `queue` in orderflow versions before per-delay
    /// retry queues; retired once empty.
    pub fn legacy_retry_queue(&self, queue: &str) -> String {
        format!("{queue}.retry")
    }

    /// The policy name orderflow gives the policy of `queue`.
    pub fn policy_name(queue: &str) -> String {
        format!("orderflow:{queue}")
    }

    /// Every queue that can hold an order message on its way to a processor:
    /// the lanes' work queues and the retry queues (which the subscribers'
    /// retries share, so this may count a few events too).
    pub fn order_queues(&self) -> Vec<String> {
        let mut queues = vec![
            self.work_queue(Lane::Express),
            self.work_queue(Lane::Standard),
        ];
        queues.extend(self.retry_queues());
        queues
    }

    /// Every queue a consumer works on (not the retry or dead-letter ones).
    pub fn consumer_queues(&self) -> Vec<String> {
        let mut queues = vec![
            self.work_queue(Lane::Express),
            self.work_queue(Lane::Standard),
        ];
        queues.extend(SUBSCRIBERS.iter().map(|s| self.subscriber_queue(s)));
        queues
    }

    /// The retry queues this topology declares.
    pub fn retry_queues(&self) -> Vec<String> {
        self.retry_delays
            .iter()
            .map(|d| self.retry_queue(*d))
            .collect()
    }

    /// Every queue of the topology, retry and dead-letter queues included.
    pub fn all_queues(&self) -> Vec<String> {
        self.queues(false).into_iter().map(|q| q.name).collect()
    }

    /// Every exchange of the topology.
    pub fn exchanges(&self) -> [(String, lapin::ExchangeKind); 5] {
        use lapin::ExchangeKind::{Direct, Fanout, Headers};
        [
            (self.dead_letters(), Fanout),
            (self.orders_exchange(), Direct),
            (self.events_exchange(), Fanout),
            (self.retry_exchange(), Headers),
            (self.watch_exchange(), Fanout),
        ]
    }

    /// Every queue with its bindings and policy, the dead-letter queue first
    /// (so the others' dead-letter target exists first). `broker_4` says
    /// whether the broker is RabbitMQ 4.x, where "no delivery limit" must be
    /// spelled out.
    pub fn queues(&self, broker_4: bool) -> Vec<QueueSpec> {
        let dead = self.dead_letters();
        let mut queues = vec![QueueSpec {
            name: dead.clone(),
            bindings: vec![binding(&dead, "")],
            // Dead letters stay until a person replays or deletes them,
            // however often they are listed (every listing returns them,
            // which counts as a delivery). 3.x has no default limit and
            // refuses -1; 4.x defaults to 20 and takes -1 as "none".
            policy: broker_4.then(|| json!({ "delivery-limit": -1 })),
        }];
        let work = json!({
            "delivery-limit": DELIVERY_LIMIT,
            "dead-letter-exchange": dead,
            "dead-letter-strategy": "at-least-once",
            "overflow": "reject-publish",
        });
        for lane in [Lane::Standard, Lane::Express] {
            queues.push(QueueSpec {
                name: self.work_queue(lane),
                bindings: vec![binding(&self.orders_exchange(), lane.as_str())],
                policy: Some(work.clone()),
            });
        }
        for service in SUBSCRIBERS {
            queues.push(QueueSpec {
                name: self.subscriber_queue(service),
                bindings: vec![binding(&self.events_exchange(), "")],
                policy: Some(work.clone()),
            });
        }
        for delay in &self.retry_delays {
            let ms = delay.as_millis().to_string();
            let mut matching = FieldTable::default();
            matching.insert("x-match".into(), string("all"));
            matching.insert(RETRY_DELAY_HEADER.into(), string(&ms));
            queues.push(QueueSpec {
                name: self.retry_queue(*delay),
                bindings: vec![Binding {
                    exchange: self.retry_exchange(),
                    key: String::new(),
                    arguments: matching,
                }],
                // Back to the queue named by the message's routing key,
                // keeping it until that queue has confirmed it.
                policy: Some(json!({
                    "message-ttl": u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    "dead-letter-exchange": "",
                    "dead-letter-strategy": "at-least-once",
                    "overflow": "reject-publish",
                })),
            });
        }
        queues
    }

    /// The arguments every queue is declared with: only what a policy cannot
    /// carry, so they never need to change.
    pub fn queue_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        // Quorum queues: replicated on a cluster, and the only kind with
        // at-least-once dead-lettering.
        args.insert("x-queue-type".into(), string("quorum"));
        if let Some(ms) = self.queue_expires_ms {
            args.insert("x-expires".into(), AMQPValue::LongUInt(ms));
        }
        args
    }
}

fn binding(exchange: &str, key: &str) -> Binding {
    Binding {
        exchange: exchange.to_owned(),
        key: key.to_owned(),
        arguments: FieldTable::default(),
    }
}

/// An AMQP long string.
pub fn string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn production_names_have_no_prefix() {
        let t = Topology::new("");
        assert_eq!(t.work_queue(Lane::Express), "orders.express");
        assert_eq!(t.events_exchange(), "order-events");
        assert_eq!(
            t.subscriber_queue("logging-service"),
            "order-events.logging-service"
        );
    }

    #[test]
    fn a_prefix_isolates_every_name() {
        let t = Topology::new("t1");
        for name in [
            t.orders_exchange(),
            t.work_queue(Lane::Standard),
            t.events_exchange(),
            t.dead_letters(),
            t.subscriber_queue("notification-service"),
        ] {
            assert!(name.starts_with("t1."), "{name}");
        }
    }
}
