//! Wires payment-provider together: its own database, the API, health.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::AtomicU64},
    time::Duration,
};

use anyhow::Context;
use platform::{db::Plans, health, http::HttpLimits};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    api::{self, Provider},
    books::{Books, MIGRATOR},
    configuration::Settings,
};

/// A started payment-provider.
pub struct Application {
    provider: Provider,
    listener: TcpListener,
    http: HttpLimits,
}

impl Application {
    /// Connect to (and create, and migrate) its database, and bind the port.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        anyhow::ensure!(
            settings.api_key.as_deref() != Some(""),
            "PROVIDER_API_KEY is set but empty: set a key, or unset it for an open API"
        );
        // Each statement looks up one key: its plan is kept.
        let pool = settings
            .database()
            .connect_and_migrate_with(&MIGRATOR, Plans::Kept)
            .await?;
        let address = SocketAddr::new(settings.http_host, settings.http_port);
        let listener = TcpListener::bind(address)
            .await
            .with_context(|| format!("binding {address}"))?;
        tracing::info!(
            port = listener.local_addr()?.port(),
            demo_failures = settings.demo_failures,
            latency_ms = settings.latency_ms,
            "payment-provider listening"
        );
        Ok(Self {
            provider: Provider {
                books: Books {
                    pool,
                    decline_over_cents: settings.decline_over_cents,
                },
                latency_ms: Arc::new(AtomicU64::new(settings.latency_ms)),
                demo_failures: settings.demo_failures,
                slow_answer: Duration::from_millis(settings.slow_answer_ms),
                api_key_digest: settings.api_key.as_deref().map(api::digest),
            },
            listener,
            http: settings.http,
        })
    }

    /// The port actually bound.
    pub fn port(&self) -> u16 {
        self.listener.local_addr().expect("a bound listener").port()
    }

    /// Serve until `shutdown`, then finish the requests in flight.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let readiness = health::Readiness::postgres(self.provider.books.pool.clone());
        let router = api::router(self.provider).merge(health::router(readiness));
        platform::http::serve(self.listener, router, self.http, shutdown).await?;
        tracing::info!("payment-provider stopped");
        Ok(())
    }
}
