//! Wires notification-service together: worker start-up and a consumer on
//! its own durable queue on the order-events exchange.

use platform::worker::Worker;
use tokio_util::sync::CancellationToken;

use crate::{
    configuration::{DEV_SECRET, Settings},
    handler,
    webhooks::Dispatcher,
};

/// A started notification-service.
pub struct Application {
    worker: Worker,
    webhooks: Dispatcher,
}

impl Application {
    /// Connect, migrate, declare, and bind the health port.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let worker =
            Worker::start_subscriber(handler::CONSUMER, &settings.worker, settings.http_port)
                .await?;
        if settings.webhook_secret.0 == DEV_SECRET {
            tracing::warn!(
                "WEBHOOK_SECRET is not set: webhooks are signed with the public demo secret"
            );
        }
        if !settings.webhook_allowed_hosts.is_empty() {
            tracing::warn!(
                allowed = ?settings.webhook_allowed_hosts,
                "WEBHOOK_ALLOWED_HOSTS is set: webhooks to these hosts may reach inward addresses"
            );
        }
        let webhooks = Dispatcher::new(worker.pool().clone(), settings.webhook_policy())?;
        Ok(Self { worker, webhooks })
    }

    /// The health port actually bound.
    pub fn port(&self) -> u16 {
        self.worker.port()
    }

    /// Consume events and send webhooks until `shutdown`.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let webhooks = tokio::spawn(self.webhooks.run(shutdown.clone()));
        let notifier = handler::Notifier {
            pool: self.worker.pool().clone(),
        };
        let consumed = self.worker.run_events(shutdown.clone(), notifier).await;
        shutdown.cancel();
        let _ = webhooks.await;
        consumed
    }
}
