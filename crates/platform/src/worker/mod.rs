//! Start-up and run loop of the three consuming services: wait for and
//! connect Postgres and RabbitMQ, declare the topology, serve health, then
//! consume until asked to stop. What a worker is told is in [`settings`],
//! how many messages it keeps in hand and the pool that serves them in
//! [`concurrency`], and how the subscribers' order events reach their
//! handlers in [`events`].

use std::{net::SocketAddr, time::Duration};

use anyhow::Context;
use messaging::{
    Broker, Publisher, Topology,
    consumer::{self, Batching, ConsumerSpec, Handler, RetryPolicy},
};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    db::DatabaseSettings,
    event_log::{self, EventBus},
    health,
    jobs::{self, JobHandler, JobQueue},
    resend::Resender,
};

mod concurrency;
mod events;
mod settings;

pub use concurrency::Concurrency;
use events::Events;
pub use settings::WorkerSettings;

pub use crate::subscriber::{EventHandler, Received};

/// How long in-flight messages may take to finish after a stop is asked
/// for: under Docker's 10 s between SIGTERM and SIGKILL.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(8);

/// The longest a consumer's channel may take to close after its round.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A connected, declared, listening service, ready to consume.
pub struct Worker {
    service: &'static str,
    pool: PgPool,
    broker: Broker,
    publisher: Publisher,
    /// Taken when the health port is served.
    listener: Option<TcpListener>,
    http: crate::http::HttpLimits,
    queues: Vec<String>,
    prefetch: u16,
    batch_size: u16,
    retry: RetryPolicy,
    resend_after: Duration,
    event_bus: EventBus,
    /// Whether anything travels through RabbitMQ (see
    /// `ServiceSettings::uses_rabbitmq`): if not, readiness is Postgres's.
    uses_rabbitmq: bool,
}

impl Worker {
    /// Connect (waiting for both servers) with a pool sized for consuming
    /// `queues` (see [`Concurrency::plan`]), migrate, declare the topology
    /// and bind the health listener on `http_port` (0 picks a free one).
    pub async fn start(
        service: &'static str,
        settings: &WorkerSettings,
        http_port: u16,
        queues: Vec<String>,
    ) -> anyhow::Result<Self> {
        let concurrency = Concurrency::plan(settings, queues.len());
        let database = DatabaseSettings {
            db_max_connections: Some(concurrency.pool),
            ..settings.service.database.clone()
        };
        tracing::info!(
            pool = concurrency.pool,
            prefetch = concurrency.prefetch,
            queues = queues.len(),
            "database pool sized for the messages handled at once"
        );
        let pool = database.connect_and_migrate().await?;
        let broker = settings.service.amqp.broker_for(settings.topology())?;
        let uses_rabbitmq = settings.service.uses_rabbitmq();
        if uses_rabbitmq {
            broker.connect(&CancellationToken::new()).await;
        } else {
            tracing::info!("work queue and event bus in Postgres: not connecting to RabbitMQ");
        }
        let listener = TcpListener::bind(SocketAddr::new(settings.service.http_host, http_port))
            .await
            .with_context(|| format!("binding the health port {http_port}"))?;
        Ok(Self {
            service,
            pool,
            publisher: Publisher::new(broker.clone()),
            broker,
            listener: Some(listener),
            http: settings.service.http,
            queues,
            prefetch: concurrency.prefetch,
            batch_size: settings.batch_size,
            retry: settings.retry_policy(),
            resend_after: Duration::from_secs(settings.event_resend_after_secs),
            event_bus: settings.service.event_bus,
            uses_rabbitmq,
        })
    }

    /// [`Worker::start`] for a service subscribing to order events: it
    /// consumes one queue, its own on the order-events exchange, named after
    /// `service`.
    pub async fn start_subscriber(
        service: &'static str,
        settings: &WorkerSettings,
        http_port: u16,
    ) -> anyhow::Result<Self> {
        let queue = settings.service.amqp.topology().subscriber_queue(service);
        Self::start(service, settings, http_port, vec![queue]).await
    }

    /// The health port actually bound.
    pub fn port(&self) -> u16 {
        self.listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map_or(0, |a| a.port())
    }

    /// The pool, for building the handler.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The confirmed publisher (retries, dead letters, and the service's own
    /// messages).
    pub fn publisher(&self) -> &Publisher {
        &self.publisher
    }

    /// The topology names.
    pub fn topology(&self) -> &Topology {
        self.broker.topology()
    }

    /// Serve health and consume the queues given at start with `handler`
    /// until `shutdown`.
    /// A lost connection or channel is re-established and the consumers
    /// re-subscribed; in-flight messages finish and are settled before this
    /// returns.
    pub async fn run<H>(mut self, shutdown: CancellationToken, handler: H) -> anyhow::Result<()>
    where
        H: Handler + Clone,
    {
        let server = self.serve_health(&shutdown);
        let instance = std::process::id();
        'connections: while let Some(connection) = self.broker.connect(&shutdown).await {
            // A channel per consumer: a `multiple` ack covers every earlier
            // delivery of its channel, so consumers must not share one.
            let mut channels = Vec::with_capacity(self.queues.len());
            for _ in &self.queues {
                match connection.create_channel().await {
                    Ok(channel) => channels.push(channel),
                    Err(error) => {
                        tracing::warn!(error = %error, "could not open a channel; reconnecting");
                        for channel in &channels {
                            let _ = channel.close(200, "reconnecting".into()).await;
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue 'connections;
                    }
                }
            }
            // One round of consuming: ends on shutdown, or when any consumer
            // fails, to reconnect and resubscribe.
            let round = shutdown.child_token();
            let consumers = self.queues.iter().zip(&channels).map(|(queue, channel)| {
                let spec = ConsumerSpec {
                    tag: format!("{}-{instance}-{queue}", self.service),
                    queue: queue.clone(),
                    service: self.service.to_owned(),
                    prefetch: self.prefetch,
                    batch_size: self.batch_size,
                    retry: self.retry,
                };
                let (round, handler) = (round.clone(), handler.clone());
                let (topology, publisher) = (self.broker.topology(), &self.publisher);
                async move {
                    let result =
                        consumer::run(channel, topology, publisher, spec, round.clone(), handler)
                            .await;
                    round.cancel();
                    result
                }
            });
            tracing::info!(service = self.service, "ready: consuming");
            let all = futures_util::future::join_all(consumers);
            let grace = async {
                shutdown.cancelled().await;
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            };
            let results = tokio::select! {
                results = all => results,
                () = grace => {
                    tracing::warn!(
                        "in-flight messages did not finish within {SHUTDOWN_GRACE:?}; \
                         stopping anyway: the broker redelivers what was not acked"
                    );
                    Vec::new()
                }
            };
            for channel in &channels {
                // Bounded: a channel whose connection died unnoticed would
                // never answer, and the reconnect must not wait on it.
                if tokio::time::timeout(CLOSE_TIMEOUT, channel.close(200, "round over".into()))
                    .await
                    .is_err()
                {
                    tracing::warn!("a channel did not close within {CLOSE_TIMEOUT:?}; leaving it");
                }
            }
            if shutdown.is_cancelled() {
                results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
                break;
            }
            tracing::warn!(
                service = self.service,
                "not ready: lost the RabbitMQ channel; reconnecting"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        server.abort();
        self.broker.close().await;
        Ok(())
    }

    /// Serve health and work the `jobs` table with `handler` until
    /// `shutdown` (`WORK_QUEUE=postgres`): as many jobs in hand at once as
    /// messages on RabbitMQ, in batches of the same size; what is in hand
    /// when a stop is asked for is finished and settled, within the grace
    /// period (past it, the leases run out and other processors take it).
    pub async fn run_jobs<H: JobHandler>(
        mut self,
        shutdown: CancellationToken,
        queue: JobQueue,
        poll: Duration,
        handler: H,
    ) -> anyhow::Result<()> {
        let server = self.serve_health(&shutdown);
        let batching = Batching::of(self.prefetch, self.batch_size);
        let consuming = jobs::consume(
            queue,
            self.pool.clone(),
            batching,
            poll,
            shutdown.clone(),
            handler,
        );
        let grace = async {
            shutdown.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };
        tokio::select! {
            () = consuming => {}
            () = grace => tracing::warn!(
                "the jobs in hand did not finish within {SHUTDOWN_GRACE:?}; stopping anyway: \
                 other processors take them once their lease runs out"
            ),
        }
        server.abort();
        self.broker.close().await;
        Ok(())
    }

    /// Serve `/healthz`, `/readyz` and `/metrics` on the health port until
    /// `shutdown`.
    fn serve_health(
        &mut self,
        shutdown: &CancellationToken,
    ) -> tokio::task::JoinHandle<std::io::Result<()>> {
        let readiness = if self.uses_rabbitmq {
            health::Readiness::new(self.pool.clone(), self.broker.clone())
        } else {
            health::Readiness::postgres(self.pool.clone())
        };
        // The health port is not published: its metrics need no key.
        let app = health::router(readiness).merge(crate::metrics::router());
        let listener = self
            .listener
            .take()
            .expect("the health port is served once");
        let (http, shutdown) = (self.http, shutdown.clone());
        tokio::spawn(async move { crate::http::serve(listener, app, http, shutdown).await })
    }
}

impl Worker {
    /// Consume the service's queue on the order-events exchange (given at
    /// start, see [`Worker::start_subscriber`]) until `shutdown`, handing the
    /// decoded events to `handler`, and send the queue again the events it
    /// lost (see [`crate::resend`]); or, with `EVENT_BUS=postgres`, read the
    /// event log as the service (see [`crate::event_log`]).
    pub async fn run_events<E>(
        mut self,
        shutdown: CancellationToken,
        handler: E,
    ) -> anyhow::Result<()>
    where
        E: EventHandler + Clone,
    {
        if self.event_bus == EventBus::Postgres {
            let server = self.serve_health(&shutdown);
            let batch = self.batch_size;
            let followed =
                event_log::follow(self.pool.clone(), self.service, batch, shutdown, handler).await;
            server.abort();
            self.broker.close().await;
            return followed;
        }
        let resender = Resender::new(
            self.pool.clone(),
            self.broker.clone(),
            self.publisher.clone(),
            self.service,
            self.resend_after,
        );
        let stop_resending = shutdown.child_token();
        let resending = tokio::spawn(resender.run(stop_resending.clone()));
        let consumed = self.run(shutdown, Events(handler)).await;
        stop_resending.cancel();
        let _ = resending.await;
        consumed
    }
}
