//! Connecting to RabbitMQ and publishing with confirms.

use std::time::Duration;

use anyhow::{Context, bail};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties,
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::{AMQPValue, FieldTable, LongString, ShortString},
};
use uuid::Uuid;

use crate::{
    Topology,
    contracts::{CORRELATION_HEADER, ORDER_ID_HEADER},
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
}

impl std::fmt::Debug for AmqpSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpSettings")
            .field("amqp_url", &redact(&self.amqp_url))
            .field("topology_prefix", &self.topology_prefix)
            .finish()
    }
}

impl AmqpSettings {
    /// The topology these settings name.
    pub fn topology(&self) -> Topology {
        Topology::new(self.topology_prefix.clone())
            .with_queue_expiry_ms(self.topology_queue_expires_ms)
    }

    /// Connect, waiting (with backoff, forever) until the broker answers.
    pub async fn connect(&self) -> anyhow::Result<Connection> {
        let mut delay = Duration::from_millis(200);
        let mut attempt = 1u32;
        loop {
            // Our own per-attempt timeout: a connect to a broker that is not up
            // yet must not hang the start-up (lapin issue #468).
            let tried = tokio::time::timeout(
                Duration::from_secs(5),
                Connection::connect(&self.amqp_url, ConnectionProperties::default()),
            )
            .await;
            let error = match tried {
                Ok(Ok(connection)) => {
                    tracing::info!(broker = %redact(&self.amqp_url), "connected to RabbitMQ");
                    return Ok(connection);
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => "timed out after 5s".to_owned(),
            };
            tracing::warn!(
                broker = %redact(&self.amqp_url), attempt, error = %error,
                "waiting for RabbitMQ; retrying in {delay:?}"
            );
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
            attempt += 1;
        }
    }
}

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

/// A channel in confirm mode: `publish` returns only once the broker has
/// taken responsibility for the message.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
}

/// Identity of a message: what consumers dedupe and correlate on.
#[derive(Debug, Clone)]
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
    /// Open a channel on `connection` and switch it to confirm mode.
    pub async fn new(connection: &Connection) -> anyhow::Result<Self> {
        let channel = connection
            .create_channel()
            .await
            .context("opening the publishing channel")?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .context("enabling publisher confirms")?;
        Ok(Self { channel })
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
        let confirm = self
            .channel
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
            Confirmation::Ack(Some(returned)) => bail!(
                "unroutable: {} {} (exchange {exchange:?}, key {routing_key:?})",
                returned.reply_code,
                returned.reply_text
            ),
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Nack(_) => bail!("the broker refused the message (basic.nack)"),
            Confirmation::NotRequested => bail!("publisher confirms are not enabled"),
        }
    }

    /// Whether the channel can still publish.
    pub fn is_connected(&self) -> bool {
        self.channel.status().connected()
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
