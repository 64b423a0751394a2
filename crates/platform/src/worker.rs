//! Start-up and run loop of the three consuming services: wait for and
//! connect Postgres and RabbitMQ, declare the topology, serve health, then
//! consume until asked to stop.

use std::{future::Future, net::SocketAddr, sync::Arc};

use anyhow::Context;
use lapin::message::Delivery;
use messaging::{
    AmqpSettings, Topology,
    consumer::{self, ConsumerSpec, Disposition},
    contracts::OrderEvent,
    telemetry::LogSettings,
};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{db::DatabaseSettings, health};

/// Settings shared by every consuming service.
#[derive(clap::Args, Clone, Debug)]
pub struct WorkerSettings {
    #[command(flatten)]
    pub amqp: AmqpSettings,
    #[command(flatten)]
    pub database: DatabaseSettings,
    #[command(flatten)]
    pub log: LogSettings,
    /// Unacked messages per consumer, and how many are handled at once.
    #[arg(long, env = "PREFETCH", default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: u16,
    /// Address the health endpoints listen on.
    #[arg(long, env = "HTTP_HOST", default_value = "127.0.0.1")]
    pub http_host: std::net::IpAddr,
}

/// A connected, declared, listening service, ready to consume.
pub struct Worker {
    service: &'static str,
    pool: PgPool,
    connection: Arc<lapin::Connection>,
    topology: Topology,
    listener: TcpListener,
    prefetch: u16,
}

impl Worker {
    /// Connect (waiting for both servers), migrate, declare the topology and
    /// bind the health listener on `http_port` (0 picks a free one).
    pub async fn start(
        service: &'static str,
        settings: &WorkerSettings,
        http_port: u16,
    ) -> anyhow::Result<Self> {
        let pool = settings.database.connect_and_migrate().await?;
        let connection = Arc::new(settings.amqp.connect().await?);
        let topology = settings.amqp.topology();
        let channel = connection.create_channel().await?;
        topology
            .declare(&channel)
            .await
            .context("declaring the topology")?;
        channel.close(200, "declared".into()).await?;
        let listener = TcpListener::bind(SocketAddr::new(settings.http_host, http_port))
            .await
            .with_context(|| format!("binding the health port {http_port}"))?;
        Ok(Self {
            service,
            pool,
            connection,
            topology,
            listener,
            prefetch: settings.prefetch,
        })
    }

    /// The health port actually bound.
    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// The pool, for building the handler.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The broker connection, for opening a publisher.
    pub fn connection(&self) -> &lapin::Connection {
        &self.connection
    }

    /// The topology names.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Serve health and consume `queues` with `handler` until `shutdown`.
    /// In-flight messages finish and are acked before this returns.
    pub async fn run<F, Fut>(
        self,
        queues: Vec<String>,
        shutdown: CancellationToken,
        handler: F,
    ) -> anyhow::Result<()>
    where
        F: Fn(Delivery) -> Fut + Clone,
        Fut: Future<Output = Disposition>,
    {
        let readiness = health::Readiness::new(self.pool.clone(), self.connection.clone());
        let app = health::router(readiness);
        let server_shutdown = shutdown.clone();
        let server = tokio::spawn(async move {
            axum::serve(self.listener, app)
                .with_graceful_shutdown(server_shutdown.cancelled_owned())
                .await
        });

        let channel = self.connection.create_channel().await?;
        let instance = std::process::id();
        let consumers = queues.into_iter().map(|queue| {
            let spec = ConsumerSpec {
                tag: format!("{}-{instance}-{queue}", self.service),
                queue,
                prefetch: self.prefetch,
            };
            let shutdown = shutdown.clone();
            let handler = handler.clone();
            let channel = &channel;
            async move {
                let result = consumer::run(channel, spec, shutdown.clone(), handler).await;
                // One consumer failing stops the service: a supervisor (docker
                // compose's restart policy) starts it again.
                shutdown.cancel();
                result
            }
        });
        tracing::info!(service = self.service, "ready");
        let results = futures_util::future::join_all(consumers).await;
        let _ = channel.close(200, "shutting down".into()).await;
        server.abort();
        let _ = self.connection.close(200, "shutting down".into()).await;
        results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
        Ok(())
    }
}

/// Decode an order event, run `handle` inside a span naming the order and
/// correlation id, and turn the result into a disposition: `Ok(true)` the
/// effect happened now, `Ok(false)` it had happened before (a duplicate).
/// The two subscriber services share this.
pub async fn on_event<F, Fut>(delivery: Delivery, handle: F) -> Disposition
where
    F: FnOnce(OrderEvent, String) -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    let correlation_id = messaging::amqp::correlation_id(&delivery.properties);
    let event: OrderEvent = match serde_json::from_slice(&delivery.data) {
        Ok(event) => event,
        Err(error) => {
            return Disposition::DeadLetter {
                reason: format!("not an OrderEvent message: {error}"),
            };
        }
    };
    let span = tracing::info_span!(
        "event",
        order_id = %event.order_id,
        correlation_id = %correlation_id,
        event_id = %event.message_id,
    );
    async move {
        match handle(event, correlation_id).await {
            Ok(true) => Disposition::Ack,
            Ok(false) => {
                tracing::info!("event already handled; skipping the duplicate delivery");
                Disposition::Ack
            }
            Err(error) => {
                tracing::error!(error.cause_chain = ?error, error.message = %error, "handling the event failed");
                Disposition::Requeue {
                    reason: format!("{error:#}"),
                }
            }
        }
    }
    .instrument(span)
    .await
}
