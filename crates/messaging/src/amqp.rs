//! Connecting to RabbitMQ and publishing with confirms.

use std::{sync::Arc, time::Duration};

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
    /// RabbitMQ URL, credentials included.
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
    /// queues' policies are set; default: AMQP_URL's host and credentials,
    /// port 15672.
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

    /// The management API these settings name.
    pub fn management(&self) -> anyhow::Result<Management> {
        let url = match &self.rabbitmq_management_url {
            Some(url) => url.clone(),
            None => Management::default_url_for(&self.amqp_url)?,
        };
        Management::new(&url, &self.amqp_url)
    }

    /// A broker handle for these settings (not connected yet).
    pub fn broker(&self) -> anyhow::Result<Broker> {
        self.broker_for(self.topology())
    }

    /// A broker handle for these settings declaring `topology`.
    pub fn broker_for(&self, topology: Topology) -> anyhow::Result<Broker> {
        Ok(Broker::new(
            self.amqp_url.clone(),
            self.management()?,
            topology,
        ))
    }
}

/// The connection to RabbitMQ, re-established when lost. Every new
/// connection first declares the topology, so a broker that lost its state
/// gets it back before anything is published or consumed.
#[derive(Clone)]
pub struct Broker {
    url: String,
    management: Management,
    topology: Topology,
    current: Arc<Mutex<Option<Arc<Connection>>>>,
}

impl Broker {
    /// A handle for the broker at `url`; nothing is connected yet.
    pub fn new(url: String, management: Management, topology: Topology) -> Self {
        Self {
            url,
            management,
            topology,
            current: Arc::new(Mutex::new(None)),
        }
    }

    /// The names this broker's topology uses.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// The broker's management API.
    pub fn management(&self) -> &Management {
        &self.management
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

    /// The live connection, or one attempt (at most 5 s) to make one.
    pub async fn connect_once(&self) -> anyhow::Result<Arc<Connection>> {
        let mut current = self.current.lock().await;
        if let Some(connection) = current.as_ref().filter(|c| c.status().connected()) {
            return Ok(connection.clone());
        }
        *current = None;
        // Our own timeout: connecting to a broker that is not up must not
        // hang (lapin issue #468).
        let connection = tokio::time::timeout(
            Duration::from_secs(5),
            Connection::connect(&self.url, ConnectionProperties::default()),
        )
        .await
        .map_err(|_| anyhow::anyhow!("timed out after 5s"))??;
        declare(&connection, &self.topology, &self.management).await?;
        tracing::info!(broker = %redact(&self.url), "connected to RabbitMQ, topology declared");
        let connection = Arc::new(connection);
        *current = Some(connection.clone());
        Ok(connection)
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
                    broker = %redact(&self.url), attempt, error = %format!("{error:#}"),
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

    /// Declare the topology again on the live connection: after a message
    /// came back unroutable (a queue or binding was deleted behind our back).
    pub async fn redeclare(&self) -> anyhow::Result<()> {
        let connection = self.connect_once().await?;
        declare(&connection, &self.topology, &self.management).await?;
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

/// A URL with its password replaced, for logs.
pub fn redact(url: &str) -> String {
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
        // Bounded: callers may hold a database transaction while they wait,
        // and a blocked or silent broker must not hold it forever.
        tokio::time::timeout(
            PUBLISH_TIMEOUT,
            self.publish_confirmed(exchange, routing_key, payload, properties),
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
    ) -> anyhow::Result<()> {
        let channel = self.channel().await?;
        let confirm = channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
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
    use super::redact;

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
