//! Wires logging-service together: worker start-up and a consumer on
//! its own durable queue on the order-events exchange.

use platform::worker::Worker;
use tokio_util::sync::CancellationToken;

use crate::{configuration::Settings, handler};

/// A started logging-service.
pub struct Application {
    worker: Worker,
}

impl Application {
    /// Connect, migrate, declare, and bind the health port.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let worker =
            Worker::start_subscriber(handler::CONSUMER, &settings.worker, settings.http_port)
                .await?;
        Ok(Self { worker })
    }

    /// The health port actually bound.
    pub fn port(&self) -> u16 {
        self.worker.port()
    }

    /// Consume events until `shutdown`.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let trail = handler::AuditTrail {
            pool: self.worker.pool().clone(),
        };
        self.worker.run_events(shutdown, trail).await
    }
}
