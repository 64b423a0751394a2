//! Wires order-stats together: Postgres, the broker (every node of a
//! cluster), the event log, and the HTTP API.

use std::{net::SocketAddr, time::Duration};

use anyhow::Context;
use messaging::Broker;
use platform::{
    db::DatabaseSettings,
    event_log::{self, EventBus},
    health,
    http::HttpLimits,
    worker::{EventHandler, Received},
};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    api,
    configuration::{Settings, StartFrom},
    log::{self, Reader, Retention},
    model,
};

/// Connections: one for the reader, the rest for HTTP.
const POOL_SIZE: u32 = 4;

/// The name order-stats reads the event log in Postgres under.
const READER: &str = "order-stats";

/// A started order-stats.
pub struct Application {
    pool: PgPool,
    broker: Broker,
    listener: TcpListener,
    http: HttpLimits,
    retention: Retention,
    batch_size: u16,
    event_bus: EventBus,
}

impl Application {
    /// Connect (waiting for both servers), migrate, empty the read model if
    /// asked to rebuild it, declare the log (from then on it keeps every
    /// event, whether or not this service runs), and bind the HTTP port: a
    /// ready order-stats means a declared log.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let database = DatabaseSettings {
            db_max_connections: Some(
                settings
                    .service
                    .database
                    .db_max_connections
                    .unwrap_or(POOL_SIZE),
            ),
            ..settings.service.database.clone()
        };
        let pool = database.connect_and_migrate().await?;
        if settings.from == StartFrom::First {
            model::reset(&pool)
                .await
                .context("emptying the read model")?;
            event_log::rewind(&pool, READER)
                .await
                .context("rewinding the event log")?;
            tracing::info!("read model emptied: rebuilding it from the beginning of the event log");
        }
        let broker = settings.service.amqp.broker()?;
        let retention = Retention {
            max_age: settings.event_log_max_age,
            max_bytes: settings.event_log_max_bytes,
        };
        let event_bus = settings.service.event_bus;
        if event_bus == EventBus::Rabbitmq {
            let connection = broker
                .connect(&CancellationToken::new())
                .await
                .context("connecting to RabbitMQ")?;
            let channel = connection.create_channel().await?;
            log::declare(&channel, broker.topology(), &retention).await?;
            let _ = channel.close(200, "declared".into()).await;
        }
        let listener = TcpListener::bind(SocketAddr::new(
            settings.service.http_host,
            settings.http_port,
        ))
        .await
        .with_context(|| format!("binding the HTTP port {}", settings.http_port))?;
        Ok(Self {
            pool,
            broker,
            listener,
            http: settings.service.http,
            retention,
            batch_size: settings.batch_size,
            event_bus,
        })
    }

    /// The HTTP port actually bound.
    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Serve HTTP and read the log until `shutdown`; a lost connection, or a
    /// batch that could not be counted, starts the reading again from the
    /// stored position.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let topology = self.broker.topology().clone();
        let log = match self.event_bus {
            EventBus::Rabbitmq => api::Log::Stream(topology.event_log()),
            EventBus::Postgres => api::Log::Postgres(READER),
        };
        let app = api::router(self.pool.clone(), log)
            .merge(health::router(match self.event_bus {
                // order-stats reads only the events: on Postgres, RabbitMQ
                // is none of its business.
                EventBus::Rabbitmq => {
                    health::Readiness::new(self.pool.clone(), self.broker.clone())
                }
                EventBus::Postgres => health::Readiness::postgres(self.pool.clone()),
            }))
            .merge(platform::metrics::router());
        let server = tokio::spawn(platform::http::serve(
            self.listener,
            app,
            self.http,
            shutdown.clone(),
        ));
        if self.event_bus == EventBus::Postgres {
            let counting = Counting(self.pool.clone());
            let followed = event_log::follow(
                self.pool,
                READER,
                self.batch_size,
                shutdown.clone(),
                counting,
            )
            .await;
            // Reading stopped for good (or could not start): so does the
            // service, rather than serving health while counting nothing.
            shutdown.cancel();
            self.broker.close().await;
            server.await.context("the HTTP server task")??;
            return followed;
        }
        let reader = Reader {
            pool: &self.pool,
            topology: &topology,
            prefetch: self.batch_size.saturating_mul(2),
            batch_size: usize::from(self.batch_size),
            tag: format!("order-stats-{}", std::process::id()),
        };
        while let Some(connection) = self.broker.connect(&shutdown).await {
            let round = async {
                let channel = connection.create_channel().await?;
                log::declare(&channel, &topology, &self.retention).await?;
                let result = reader.run(&channel, &shutdown).await;
                let _ = channel.close(200, "round over".into()).await;
                result
            };
            match round.await {
                Ok(()) => break,
                Err(error) => {
                    tracing::warn!(error = %format!("{error:#}"), "reading the event log stopped; starting again from the stored position");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
        self.broker.close().await;
        server.await.context("the HTTP server task")??;
        Ok(())
    }
}

/// The read model, counting events from the event log in Postgres.
#[derive(Clone)]
struct Counting(PgPool);

impl EventHandler for Counting {
    async fn handle(&self, event: &Received) -> anyhow::Result<bool> {
        let mut counted = self.handle_batch(std::slice::from_ref(event)).await?;
        Ok(counted.pop().unwrap_or(false))
    }

    async fn handle_batch(&self, events: &[Received]) -> anyhow::Result<Vec<bool>> {
        let events: Vec<_> = events.iter().map(|received| &received.event).collect();
        Ok(model::count_events(&self.0, &events).await?)
    }
}
