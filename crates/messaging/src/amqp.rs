//! Connecting to RabbitMQ and publishing with confirms.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, bail};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties,
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::{AMQPValue, FieldTable, LongString, ShortString},
};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    Topology,
    contracts::{CORRELATION_HEADER, ORDER_ID_HEADER},
    management::Management,
};

/// How every service finds the broker and its topology.
#[derive(clap::Args, Clone)]
pub struct AmqpSettings {
    /// RabbitMQ URL, credentials included; for a cluster, every node's URL,
    /// comma-separated: the services connect to the first node that
    /// answers, and on losing it to the next.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    pub amqp_url: String,
    /// Prefix for every exchange and queue name (empty in production).
    #[arg(long, env = "TOPOLOGY_PREFIX", default_value = "")]
    pub topology_prefix: String,
    /// Let the broker delete idle queues after this many milliseconds
    /// (throwaway test topologies only).
    #[arg(long, env = "TOPOLOGY_QUEUE_EXPIRES_MS")]
    pub topology_queue_expires_ms: Option<u32>,
    /// RabbitMQ's management API (credentials included), through which the
    /// queues' policies are set; default: each AMQP_URL's host and
    /// credentials, port 15672. For a cluster, one URL for every node or
    /// one per AMQP_URL, in the same order, comma-separated.
    #[arg(long, env = "RABBITMQ_MANAGEMENT_URL", hide_env_values = true)]
    pub rabbitmq_management_url: Option<String>,
}

impl std::fmt::Debug for AmqpSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpSettings")
            .field("amqp_url", &redact(&self.amqp_url))
            .field("topology_prefix", &self.topology_prefix)
            .field(
                "rabbitmq_management_url",
                &self.rabbitmq_management_url.as_deref().map(redact),
            )
            .finish()
    }
}

impl AmqpSettings {
    /// The topology these settings name.
    pub fn topology(&self) -> Topology {
        Topology::new(self.topology_prefix.clone())
            .with_queue_expiry_ms(self.topology_queue_expires_ms)
    }

    /// The nodes these settings name: each AMQP URL with its management
    /// API.
    fn nodes(&self) -> anyhow::Result<Vec<Node>> {
        let urls = list(&self.amqp_url);
        if urls.is_empty() {
            bail!("AMQP_URL names no broker");
        }
        let managements = match &self.rabbitmq_management_url {
            None => urls
                .iter()
                .map(|url| Management::default_url_for(url))
                .collect::<anyhow::Result<Vec<_>>>()?,
            Some(given) => {
                let given = list(given);
                match given.len() {
                    1 => vec![given[0].clone(); urls.len()],
                    n if n == urls.len() => given,
                    n => bail!(
                        "RABBITMQ_MANAGEMENT_URL names {n} APIs for {} brokers: give one, or one per AMQP_URL",
                        urls.len()
                    ),
                }
            }
        };
        urls.into_iter()
            .zip(managements)
            .map(|(url, management)| {
                Ok(Node {
                    management: Management::new(&management, &url)?,
                    url,
                })
            })
            .collect()
    }

    /// A broker handle for these settings (not connected yet).
    pub fn broker(&self) -> anyhow::Result<Broker> {
        self.broker_for(self.topology())
    }

    /// A broker handle for these settings declaring `topology`.
    pub fn broker_for(&self, topology: Topology) -> anyhow::Result<Broker> {
        Ok(Broker::of(self.nodes()?, topology))
    }
}

/// The non-empty items of a comma-separated list.
fn list(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(str::to_owned)
        .collect()
}

/// One broker node: where to connect, and its management API.
#[derive(Clone)]
struct Node {
    url: String,
    management: Management,
}

/// The connection to RabbitMQ, re-established when lost: to the same node
/// while it answers, and for a cluster, on losing a node, to the next one
/// that does. Every new connection first declares the topology, so a broker
/// that lost its state gets it back before anything is published or
/// consumed.
#[derive(Clone)]
pub struct Broker {
    nodes: Arc<[Node]>,
    /// The node connected to last: the first one tried.
    node: Arc<AtomicUsize>,
    topology: Topology,
    current: Arc<Mutex<Option<Arc<Connection>>>>,
}

impl Broker {
    /// A handle for the broker at `url`; nothing is connected yet.
    pub fn new(url: String, management: Management, topology: Topology) -> Self {
        Self::of(vec![Node { url, management }], topology)
    }

    fn of(nodes: Vec<Node>, topology: Topology) -> Self {
        Self {
            nodes: nodes.into(),
            node: Arc::default(),
            topology,
            current: Arc::new(Mutex::new(None)),
        }
    }

    /// The names this broker's topology uses.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// The node connected to last (the first one before any), its password
    /// hidden.
    pub fn connected_to(&self) -> String {
        redact(&self.nodes[self.node.load(Ordering::Relaxed)].url)
    }

    /// The management API of the node connected to last.
    pub fn management(&self) -> &Management {
        &self.nodes[self.node.load(Ordering::Relaxed)].management
    }

    /// Whether there is a live connection right now.
    pub fn is_connected(&self) -> bool {
        self.current
            .try_lock()
            .is_ok_and(|current| current.as_ref().is_some_and(|c| c.status().connected()))
    }

    /// Whether the broker has blocked the live connection (`connection.blocked`:
    /// a memory or disk alarm). lapin then writes nothing on it, so a publish
    /// would wait for the alarm to clear.
    pub fn is_blocked(&self) -> bool {
        self.current
            .try_lock()
            .is_ok_and(|current| current.as_ref().is_some_and(|c| c.status().blocked()))
    }

    /// The live connection, or one attempt (at most 5 s per node) to make
    /// one: first to the node connected to last, or, if that connection was
    /// lost, to the next node; then to each other node in turn.
    pub async fn connect_once(&self) -> anyhow::Result<Arc<Connection>> {
        let mut current = self.current.lock().await;
        if let Some(connection) = current.as_ref().filter(|c| c.status().connected()) {
            return Ok(connection.clone());
        }
        let lost = current.take().is_some();
        let count = self.nodes.len();
        let first = (self.node.load(Ordering::Relaxed) + usize::from(lost)) % count;
        let mut failures = Vec::new();
        for index in (first..count).chain(0..first) {
            let node = &self.nodes[index];
            match connect_to(node, &self.topology).await {
                Ok(connection) => {
                    self.node.store(index, Ordering::Relaxed);
                    tracing::info!(broker = %redact(&node.url), "connected to RabbitMQ, topology declared");
                    let connection = Arc::new(connection);
                    *current = Some(connection.clone());
                    return Ok(connection);
                }
                Err(error) => failures.push(format!("{error:#}")),
            }
        }
        bail!("no RabbitMQ node answered ({})", failures.join("; "))
    }

    /// The live connection, waiting with backoff (logging what it waits
    /// for) until there is one; `None` if `stop` is cancelled first.
    pub async fn connect(&self, stop: &CancellationToken) -> Option<Arc<Connection>> {
        let mut delay = Duration::from_millis(200);
        let mut attempt = 1u32;
        loop {
            match self.connect_once().await {
                Ok(connection) => return Some(connection),
                Err(error) => tracing::warn!(
                    attempt, error = %format!("{error:#}"),
                    "waiting for RabbitMQ; retrying in {delay:?}"
                ),
            }
            tokio::select! {
                () = stop.cancelled() => return None,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
            attempt += 1;
        }
    }

    /// Reconnect as soon as the connection is lost (checked every second),
    /// not when something next needs it: a service that only publishes
    /// now and then is ready again, on another node, within seconds of
    /// losing its own. Returns when `stop` is cancelled.
    pub async fn keep_connected(&self, stop: &CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            if !self.is_connected() && self.connect(stop).await.is_none() {
                return;
            }
        }
    }

    /// Declare the topology again on the live connection: after a message
    /// came back unroutable (a queue or binding was deleted behind our back).
    pub async fn redeclare(&self) -> anyhow::Result<()> {
        let connection = self.connect_once().await?;
        declare(&connection, &self.topology, self.management()).await?;
        tracing::warn!("a message was unroutable: topology declared again");
        Ok(())
    }

    /// Close the connection, if any.
    pub async fn close(&self) {
        if let Some(connection) = self.current.lock().await.take() {
            let _ = connection.close(200, "shutting down".into()).await;
        }
    }
}

/// A connection to `node` with `topology` declared on it, within 5 s; an
/// error names the node.
async fn connect_to(node: &Node, topology: &Topology) -> anyhow::Result<Connection> {
    let connect = async {
        // Our own timeout: connecting to a broker that is not up must not
        // hang (lapin issue #468).
        let connection = tokio::time::timeout(
            Duration::from_secs(5),
            Connection::connect(&node.url, ConnectionProperties::default()),
        )
        .await
        .map_err(|_| anyhow::anyhow!("timed out after 5s"))??;
        declare(&connection, topology, &node.management).await?;
        anyhow::Ok(connection)
    };
    connect.await.with_context(|| redact(&node.url))
}

async fn declare(
    connection: &Connection,
    topology: &Topology,
    management: &Management,
) -> anyhow::Result<()> {
    topology
        .declare(connection, management)
        .await
        .context("declaring the topology")
}

/// The longest a publish may wait for its confirm (connecting included).
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

/// A URL, or a comma-separated list of them, with each password replaced,
/// for logs.
pub fn redact(urls: &str) -> String {
    urls.split(',')
        .map(redact_one)
        .collect::<Vec<_>>()
        .join(",")
}

fn redact_one(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _password)) => {
                    format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
                }
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Publishes on a channel in confirm mode: `publish` returns only once the
/// broker has taken responsibility for the message. A lost channel is
/// reopened (one connection attempt) on the next publish.
#[derive(Clone)]
pub struct Publisher {
    broker: Broker,
    channel: Arc<Mutex<Option<Channel>>>,
}

/// Identity of a message: what consumers dedupe and correlate on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Consumers dedupe on it.
    pub message_id: Uuid,
    /// Travels from the HTTP request to the last subscriber.
    pub correlation_id: String,
    /// The order the message is about.
    pub order_id: Uuid,
}

impl Envelope {
    /// Persistent JSON message properties carrying this identity.
    pub fn properties(&self) -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert(
            CORRELATION_HEADER.into(),
            AMQPValue::LongString(LongString::from(self.correlation_id.as_str())),
        );
        headers.insert(
            ORDER_ID_HEADER.into(),
            AMQPValue::LongString(LongString::from(self.order_id.to_string())),
        );
        BasicProperties::default()
            .with_content_type(ShortString::from("application/json"))
            .with_delivery_mode(2)
            .with_message_id(ShortString::from(self.message_id.to_string()))
            .with_correlation_id(ShortString::from(self.correlation_id.as_str()))
            .with_headers(headers)
    }
}

/// The correlation id a delivery carries, or `"-"`.
pub fn correlation_id(properties: &BasicProperties) -> String {
    properties
        .correlation_id()
        .as_ref()
        .map(|c| c.to_string())
        .unwrap_or_else(|| "-".to_owned())
}

impl Publisher {
    /// A publisher on `broker`; the channel is opened on first use.
    pub fn new(broker: Broker) -> Self {
        Self {
            broker,
            channel: Arc::new(Mutex::new(None)),
        }
    }

    /// Whether the broker is blocking publishers right now; see
    /// [`Broker::is_blocked`].
    pub fn is_blocked(&self) -> bool {
        self.broker.is_blocked()
    }

    async fn channel(&self) -> anyhow::Result<Channel> {
        let mut slot = self.channel.lock().await;
        if let Some(channel) = slot.as_ref().filter(|c| c.status().connected()) {
            return Ok(channel.clone());
        }
        let connection = self.broker.connect_once().await?;
        let channel = connection
            .create_channel()
            .await
            .context("opening the publishing channel")?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .context("enabling publisher confirms")?;
        *slot = Some(channel.clone());
        Ok(channel)
    }

    /// Publish and wait for the broker's confirm. Mandatory, so a message no
    /// queue would take is an error rather than silently dropped.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        properties: BasicProperties,
    ) -> anyhow::Result<()> {
        self.publish_bounded(exchange, routing_key, payload, properties, true)
            .await
    }

    /// Publish a copy that no one may want (see
    /// [`Topology::watch_exchange`]) and wait for the broker's confirm: not
    /// mandatory, so a copy no queue takes is dropped, not an error.
    pub async fn publish_optional(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        properties: BasicProperties,
    ) -> anyhow::Result<()> {
        self.publish_bounded(exchange, routing_key, payload, properties, false)
            .await
    }

    async fn publish_bounded(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        properties: BasicProperties,
        mandatory: bool,
    ) -> anyhow::Result<()> {
        // Bounded: callers may hold a database transaction while they wait,
        // and a blocked or silent broker must not hold it forever.
        tokio::time::timeout(
            PUBLISH_TIMEOUT,
            self.publish_confirmed(exchange, routing_key, payload, properties, mandatory),
        )
        .await
        .map_err(|_| anyhow::anyhow!("no publisher confirm within {PUBLISH_TIMEOUT:?}"))?
    }

    async fn publish_confirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        properties: BasicProperties,
        mandatory: bool,
    ) -> anyhow::Result<()> {
        let channel = self.channel().await?;
        let confirm = channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory,
                    ..Default::default()
                },
                payload,
                properties,
            )
            .await
            .context("sending the message")?
            .await
            .context("waiting for the publisher confirm")?;
        match confirm {
            // An unroutable mandatory message is confirmed *and* returned.
            Confirmation::Ack(Some(returned)) => {
                // The next attempt (the outbox relay retries) finds the
                // topology whole again.
                if let Err(error) = self.broker.redeclare().await {
                    tracing::warn!(error = %format!("{error:#}"), "could not declare the topology again");
                }
                bail!(
                    "unroutable: {} {} (exchange {exchange:?}, key {routing_key:?})",
                    returned.reply_code,
                    returned.reply_text
                )
            }
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Nack(_) => bail!("the broker refused the message (basic.nack)"),
            Confirmation::NotRequested => bail!("publisher confirms are not enabled"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(amqp_url: &str, management: Option<&str>) -> AmqpSettings {
        AmqpSettings {
            amqp_url: amqp_url.into(),
            topology_prefix: String::new(),
            topology_queue_expires_ms: None,
            rabbitmq_management_url: management.map(str::to_owned),
        }
    }

    #[test]
    fn a_cluster_is_a_list_of_urls_each_with_its_management_api() {
        let nodes = settings("amqp://u:p@r1:5672/%2f, amqp://u:p@r2:5672/%2f,", None)
            .nodes()
            .unwrap();
        let urls: Vec<&str> = nodes.iter().map(|n| n.url.as_str()).collect();
        assert_eq!(urls, ["amqp://u:p@r1:5672/%2f", "amqp://u:p@r2:5672/%2f"]);
        let apis: Vec<&str> = nodes.iter().map(|n| n.management.address()).collect();
        assert_eq!(apis, ["http://r1:15672/", "http://r2:15672/"]);

        let one = settings("amqp://r1,amqp://r2", Some("http://u:p@lb:15672"));
        let apis: Vec<String> = one
            .nodes()
            .unwrap()
            .iter()
            .map(|n| n.management.address().to_owned())
            .collect();
        assert_eq!(apis, ["http://lb:15672/", "http://lb:15672/"]);

        let error = settings("amqp://r1,amqp://r2,amqp://r3", Some("http://a,http://b"))
            .nodes()
            .err()
            .unwrap();
        assert!(
            error.to_string().contains("2 APIs for 3 brokers"),
            "{error}"
        );
        let error = settings(" , ", None).nodes().err().unwrap();
        assert!(error.to_string().contains("names no broker"), "{error}");
    }

    #[test]
    fn every_password_in_a_list_is_hidden() {
        assert_eq!(
            redact("amqp://u:one@r1/%2f,amqp://u:two@r2/%2f"),
            "amqp://u:***@r1/%2f,amqp://u:***@r2/%2f"
        );
    }

    #[test]
    fn redact_hides_the_password_but_keeps_user_and_host() {
        assert_eq!(
            redact("amqp://guest:s3cret@rabbit:5672/%2f"),
            "amqp://guest:***@rabbit:5672/%2f"
        );
        assert_eq!(redact("amqp://rabbit:5672"), "amqp://rabbit:5672");
        assert_eq!(
            redact("postgres://postgres@db/x"),
            "postgres://postgres@db/x"
        );
    }
}
