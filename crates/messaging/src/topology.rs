//! Every exchange and queue name in the system, and their idempotent
//! declaration. Every service declares the whole topology at start, so the
//! subscriber queues exist before the first event is published, whichever
//! service happens to start first.

use lapin::{
    Channel,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable, LongString, ShortString},
};

use crate::contracts::Lane;

/// Redeliveries after which a quorum queue dead-letters a message that keeps
/// failing: the safety net for crash loops, not the retry mechanism.
pub const DELIVERY_LIMIT: i32 = 10;

/// The names of everything on the broker, optionally prefixed so that tests
/// (and several deployments on one broker) never see each other's messages.
#[derive(Debug, Clone, Default)]
pub struct Topology {
    prefix: String,
    queue_expires_ms: Option<u32>,
}

/// The services that own a durable queue on the order-events exchange.
pub const SUBSCRIBERS: [&str; 2] = ["notification-service", "logging-service"];

impl Topology {
    /// A topology whose names start with `prefix` (empty in production).
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            queue_expires_ms: None,
        }
    }

    /// Let the broker delete the queues after they have been unused this long
    /// (`x-expires`); for throwaway test topologies.
    pub fn with_queue_expiry_ms(mut self, expires_ms: Option<u32>) -> Self {
        self.queue_expires_ms = expires_ms;
        self
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

    /// Exchange (fanout) and queue that hold messages no consumer could handle.
    pub fn dead_letters(&self) -> String {
        self.name("orders.dead")
    }

    /// Where a message of `queue` waits out its retry delay (per-message
    /// TTL) before the broker dead-letters it back onto `queue`.
    pub fn retry_queue(&self, queue: &str) -> String {
        format!("{queue}.retry")
    }

    /// Every queue that can hold an order message on its way to a processor:
    /// the lanes' work queues and their retry queues (not the dead letters).
    pub fn order_queues(&self) -> Vec<String> {
        [Lane::Express, Lane::Standard]
            .into_iter()
            .flat_map(|lane| {
                let work = self.work_queue(lane);
                [self.retry_queue(&work), work]
            })
            .collect()
    }

    /// Every queue of the topology, retry and dead-letter queues included.
    pub fn all_queues(&self) -> Vec<String> {
        let work = self.work_queues();
        let mut queues: Vec<String> = work.iter().map(|q| self.retry_queue(q)).collect();
        queues.extend(work);
        queues.push(self.dead_letters());
        queues
    }

    /// Every exchange of the topology.
    pub fn exchanges(&self) -> [String; 3] {
        [
            self.orders_exchange(),
            self.events_exchange(),
            self.dead_letters(),
        ]
    }

    /// Every queue a consumer works on (not the retry or dead-letter ones).
    fn work_queues(&self) -> Vec<String> {
        let mut queues = vec![
            self.work_queue(Lane::Express),
            self.work_queue(Lane::Standard),
        ];
        queues.extend(SUBSCRIBERS.iter().map(|s| self.subscriber_queue(s)));
        queues
    }

    /// Delete every queue and exchange of a throwaway topology (a test's, a
    /// benchmark's), as far as it goes: failures are skipped.
    pub async fn delete(&self, channel: &Channel) {
        for queue in self.all_queues() {
            let _ = channel
                .queue_delete(queue.as_str().into(), Default::default())
                .await;
        }
        for exchange in self.exchanges() {
            let _ = channel
                .exchange_delete(exchange.as_str().into(), Default::default())
                .await;
        }
    }

    /// Declare every exchange, queue and binding. Safe to call concurrently
    /// from every service: declarations with equal arguments are no-ops.
    pub async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let dead = self.dead_letters();
        channel
            .exchange_declare(
                dead.clone().into(),
                lapin::ExchangeKind::Fanout,
                durable,
                FieldTable::default(),
            )
            .await?;
        self.declare_queue(channel, &dead, None).await?;
        self.bind(channel, &dead, &dead, "").await?;

        let orders = self.orders_exchange();
        channel
            .exchange_declare(
                orders.clone().into(),
                lapin::ExchangeKind::Direct,
                durable,
                FieldTable::default(),
            )
            .await?;
        for lane in [Lane::Standard, Lane::Express] {
            let queue = self.work_queue(lane);
            self.declare_queue(channel, &queue, Some(&dead)).await?;
            self.bind(channel, &queue, &orders, lane.as_str()).await?;
            self.declare_retry_queue(channel, &queue).await?;
        }

        let events = self.events_exchange();
        channel
            .exchange_declare(
                events.clone().into(),
                lapin::ExchangeKind::Fanout,
                durable,
                FieldTable::default(),
            )
            .await?;
        for service in SUBSCRIBERS {
            let queue = self.subscriber_queue(service);
            self.declare_queue(channel, &queue, Some(&dead)).await?;
            self.bind(channel, &queue, &events, "").await?;
            self.declare_retry_queue(channel, &queue).await?;
        }
        Ok(())
    }

    /// A work or dead-letter queue; work queues dead-letter to `dead_letter_exchange`.
    async fn declare_queue(
        &self,
        channel: &Channel,
        queue: &str,
        dead_letter_exchange: Option<&str>,
    ) -> lapin::Result<()> {
        let mut args = FieldTable::default();
        if let Some(dlx) = dead_letter_exchange {
            args.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongInt(DELIVERY_LIMIT),
            );
            dead_letter_to(&mut args, dlx, None);
        }
        self.declare_quorum(channel, queue, args).await
    }

    /// The retry queue of `queue`: expired messages go back to `queue`
    /// through the default exchange.
    async fn declare_retry_queue(&self, channel: &Channel, queue: &str) -> lapin::Result<()> {
        let mut args = FieldTable::default();
        dead_letter_to(&mut args, "", Some(queue));
        self.declare_quorum(channel, &self.retry_queue(queue), args)
            .await
    }

    async fn declare_quorum(
        &self,
        channel: &Channel,
        queue: &str,
        mut args: FieldTable,
    ) -> lapin::Result<()> {
        // Quorum queues: replicated on a cluster, and the only kind with
        // at-least-once dead-lettering.
        args.insert(ShortString::from("x-queue-type"), string("quorum"));
        if let Some(ms) = self.queue_expires_ms {
            args.insert("x-expires".into(), AMQPValue::LongUInt(ms));
        }
        channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await?;
        Ok(())
    }

    async fn bind(
        &self,
        channel: &Channel,
        queue: &str,
        exchange: &str,
        key: &str,
    ) -> lapin::Result<()> {
        channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
    }
}

/// Dead-letter to `exchange` (with `routing_key`, if given), keeping each
/// message until the target queue has confirmed it.
fn dead_letter_to(args: &mut FieldTable, exchange: &str, routing_key: Option<&str>) {
    args.insert("x-dead-letter-exchange".into(), string(exchange));
    if let Some(key) = routing_key {
        args.insert("x-dead-letter-routing-key".into(), string(key));
    }
    args.insert("x-dead-letter-strategy".into(), string("at-least-once"));
    args.insert("x-overflow".into(), string("reject-publish"));
}

fn string(s: &str) -> AMQPValue {
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
