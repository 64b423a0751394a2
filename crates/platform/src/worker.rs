//! Start-up and run loop of the three consuming services: wait for and
//! connect Postgres and RabbitMQ, declare the topology, serve health, then
//! consume until asked to stop.

use std::{future::Future, net::SocketAddr, time::Duration};

use anyhow::Context;
use lapin::message::Delivery;
use messaging::{
    Broker, Publisher, Topology,
    consumer::{self, Batching, ConsumerSpec, Disposition, Handler, RetryPolicy},
    contracts::OrderEvent,
};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{db::DatabaseSettings, health, resend::Resender, settings::ServiceSettings};

/// How long in-flight messages may take to finish after a stop is asked
/// for: under Docker's 10 s between SIGTERM and SIGKILL.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(8);

/// The longest a consumer's channel may take to close after its round.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Settings shared by every consuming service.
#[derive(clap::Args, Clone, Debug)]
pub struct WorkerSettings {
    #[command(flatten)]
    pub service: ServiceSettings,
    /// Unacked messages per consumer: how many are in hand at once, in
    /// PREFETCH / BATCH_SIZE batches (rounded up; a batch is at most half
    /// the prefetch).
    #[arg(long, env = "PREFETCH", default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: u16,
    /// Most messages handled together, in one transaction where the
    /// service can: the ones already waiting, never a wait to fill a batch.
    /// 1 handles each message on its own.
    #[arg(long, env = "BATCH_SIZE", default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..))]
    pub batch_size: u16,
    /// Attempts in all before a failing message is dead-lettered.
    #[arg(long, env = "RETRY_MAX_ATTEMPTS", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub retry_max_attempts: u32,
    /// Delay before the first retry, in ms; doubled for each further retry.
    #[arg(long, env = "RETRY_INITIAL_DELAY_MS", default_value_t = 1000)]
    pub retry_initial_delay_ms: u64,
    /// The longest delay between retries, in ms.
    #[arg(long, env = "RETRY_MAX_DELAY_MS", default_value_t = 30_000)]
    pub retry_max_delay_ms: u64,
    /// How long a message may wait for a database connection, in ms, before
    /// the wait counts as a failed attempt (keep it under RabbitMQ's
    /// consumer timeout, 30 min by default).
    #[arg(long, env = "RETRY_MAX_WAIT_MS", default_value_t = 600_000)]
    pub retry_max_wait_ms: u64,
    /// Services subscribing to order events: an event published this many
    /// seconds ago that the service has not handled, while its queue holds
    /// fewer messages than such events, is sent to its queue again (see
    /// `platform::resend`).
    #[arg(long, env = "EVENT_RESEND_AFTER_SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub event_resend_after_secs: u64,
}

impl WorkerSettings {
    /// The topology a worker declares: the shared one, with the retry
    /// queues of its retry policy.
    pub fn topology(&self) -> Topology {
        self.service
            .amqp
            .topology()
            .with_retry_delays(self.retry_policy().delays())
    }

    /// The retry policy these settings describe.
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.retry_max_attempts,
            initial_delay: Duration::from_millis(self.retry_initial_delay_ms),
            max_delay: Duration::from_millis(self.retry_max_delay_ms),
            max_wait: Duration::from_millis(self.retry_max_wait_ms),
        }
    }
}

/// Connections kept for what a service does besides handling messages: its
/// outbox relay, webhook dispatcher or payment sweeper, and health checks.
const RESERVED_CONNECTIONS: u32 = 1;

/// How many messages a service has in hand at once, and the pool that
/// serves them: each batch (see [`messaging::consumer::ConsumerSpec::batch_size`])
/// holds at most one connection at a time, and a consumer handles
/// PREFETCH / BATCH_SIZE batches at once, so a pool with fewer connections
/// than that makes batches time out waiting for one while the database is
/// merely slow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Concurrency {
    /// Prefetch of each consumer: how many of its messages are in hand.
    pub prefetch: u16,
    /// Connections in the pool.
    pub pool: u32,
}

impl Concurrency {
    /// Bound PREFETCH on `queues` queues and DB_MAX_CONNECTIONS by each
    /// other. Unset, the pool is sized to the batches handled at once. Set,
    /// it is a limit someone chose (Postgres serves every service from one
    /// `max_connections`), so it is kept and the prefetch lowered to fit,
    /// with a warning naming both: the service runs, slower, rather than
    /// refusing to start or opening more connections than allowed.
    pub fn plan(settings: &WorkerSettings, queues: usize) -> Self {
        let queues = u32::try_from(queues.max(1)).unwrap_or(u32::MAX);
        let prefetch = settings.prefetch.max(1);
        let batches = |prefetch| u32::from(Batching::of(prefetch, settings.batch_size).batches);
        let needed = batches(prefetch)
            .saturating_mul(queues)
            .saturating_add(RESERVED_CONNECTIONS);
        match settings.service.database.db_max_connections {
            None => Self {
                prefetch,
                pool: needed,
            },
            Some(pool) if pool >= needed => Self { prefetch, pool },
            Some(pool) => {
                let fits = (pool.saturating_sub(RESERVED_CONNECTIONS) / queues).max(1);
                let lowered = (1..prefetch)
                    .rev()
                    .find(|&p| batches(p) <= fits)
                    .unwrap_or(1);
                tracing::warn!(
                    "DB_MAX_CONNECTIONS={pool} is too small for PREFETCH={prefetch} with \
                     BATCH_SIZE={} on {queues} queue(s) ({} batches handled at once, each \
                     holding a connection, plus {RESERVED_CONNECTIONS} for the service's own \
                     work): keeping {lowered} per queue in hand instead; set DB_MAX_CONNECTIONS \
                     to at least {needed}, or leave it unset to size the pool from PREFETCH and \
                     BATCH_SIZE",
                    settings.batch_size,
                    needed - RESERVED_CONNECTIONS
                );
                Self {
                    prefetch: lowered,
                    pool,
                }
            }
        }
    }
}

/// A connected, declared, listening service, ready to consume.
pub struct Worker {
    service: &'static str,
    pool: PgPool,
    broker: Broker,
    publisher: Publisher,
    listener: TcpListener,
    http: crate::http::HttpLimits,
    queues: Vec<String>,
    prefetch: u16,
    batch_size: u16,
    retry: RetryPolicy,
    resend_after: Duration,
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
        broker.connect(&CancellationToken::new()).await;
        let listener = TcpListener::bind(SocketAddr::new(settings.service.http_host, http_port))
            .await
            .with_context(|| format!("binding the health port {http_port}"))?;
        Ok(Self {
            service,
            pool,
            publisher: Publisher::new(broker.clone()),
            broker,
            listener,
            http: settings.service.http,
            queues,
            prefetch: concurrency.prefetch,
            batch_size: settings.batch_size,
            retry: settings.retry_policy(),
            resend_after: Duration::from_secs(settings.event_resend_after_secs),
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
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
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
    pub async fn run<H>(self, shutdown: CancellationToken, handler: H) -> anyhow::Result<()>
    where
        H: Handler + Clone,
    {
        let readiness = health::Readiness::new(self.pool.clone(), self.broker.clone());
        // The health port is not published: its metrics need no key.
        let app = health::router(readiness).merge(crate::metrics::router());
        let server_shutdown = shutdown.clone();
        let server = tokio::spawn(async move {
            crate::http::serve(self.listener, app, self.http, server_shutdown).await
        });

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
}

impl Worker {
    /// Consume the service's queue on the order-events exchange (given at
    /// start, see [`subscriber_queues`]) until `shutdown`, handing the
    /// decoded events to `handler`, and send the queue again the events it
    /// lost (see [`crate::resend`]).
    pub async fn run_events<E>(self, shutdown: CancellationToken, handler: E) -> anyhow::Result<()>
    where
        E: EventHandler + Clone,
    {
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

/// An order event with the correlation id it came with.
#[derive(Debug, Clone)]
pub struct Received {
    pub event: OrderEvent,
    pub correlation_id: String,
}

impl Received {
    /// The span naming the event's order and correlation id, for its log
    /// lines.
    pub fn span(&self) -> tracing::Span {
        tracing::info_span!(
            "event",
            order_id = %self.event.order_id,
            correlation_id = %self.correlation_id,
            event_id = %self.event.message_id,
        )
    }
}

/// What a subscribing service does with order events: each effect once,
/// answered `true` if it happened now and `false` if it had happened
/// before (a duplicate).
pub trait EventHandler {
    /// One event, in a transaction of its own.
    fn handle(&self, event: &Received) -> impl Future<Output = anyhow::Result<bool>>;

    /// Several events in one transaction: one answer per event, in order. An
    /// error leaves none of them done.
    fn handle_batch(&self, events: &[Received]) -> impl Future<Output = anyhow::Result<Vec<bool>>>;
}

/// A [`Handler`] of deliveries carrying order events.
#[derive(Clone)]
struct Events<E>(E);

impl<E: EventHandler> Handler for Events<E> {
    /// Decode the event, handle it, and turn the result into a disposition
    /// logged in the event's span (the handler logs its own lines in it, as
    /// it does for a batch, so they name the event once).
    async fn handle(&self, delivery: Delivery) -> Disposition {
        let received = match decode(&delivery) {
            Ok(received) => received,
            Err(poison) => return poison,
        };
        let span = received.span();
        match self.0.handle(&received).await {
            Ok(done) => span.in_scope(|| handled(done)),
            Err(error) if crate::db::no_connection(&error) => Disposition::Wait {
                reason: format!("{error:#}"),
            },
            Err(error) => span.in_scope(|| {
                tracing::error!(error.cause_chain = ?error, error.message = %error, "handling the event failed");
                Disposition::Retry {
                    reason: format!("{error:#}"),
                }
            }),
        }
    }

    /// Poison is dead-lettered on its own; the events go to the handler
    /// together. If that fails, every delivery is handled on its own.
    async fn handle_batch(&self, deliveries: &[Delivery]) -> Option<Vec<Disposition>> {
        let decoded: Vec<Result<Received, Disposition>> = deliveries.iter().map(decode).collect();
        let events: Vec<Received> = decoded
            .iter()
            .filter_map(|d| d.as_ref().ok().cloned())
            .collect();
        let mut answers = match self.0.handle_batch(&events).await {
            Ok(answers) if answers.len() == events.len() => answers.into_iter(),
            Ok(_) => return None,
            Err(error) => {
                tracing::warn!(error.message = %format!("{error:#}"), events = events.len(), "handling the events together failed");
                return None;
            }
        };
        Some(
            decoded
                .into_iter()
                .map(|d| match d {
                    Ok(received) => {
                        let done = answers.next().unwrap_or(false);
                        received.span().in_scope(|| handled(done))
                    }
                    Err(poison) => poison,
                })
                .collect(),
        )
    }
}

/// An order event, or the disposition of a delivery that is none.
fn decode(delivery: &Delivery) -> Result<Received, Disposition> {
    match serde_json::from_slice(&delivery.data) {
        Ok(event) => Ok(Received {
            event,
            correlation_id: messaging::amqp::correlation_id(&delivery.properties),
        }),
        Err(error) => Err(Disposition::DeadLetter {
            reason: format!("not an OrderEvent message: {error}"),
        }),
    }
}

/// Count an event handled now, or one handled before.
fn handled(now: bool) -> Disposition {
    if now {
        metrics::counter!("events_handled_total").increment(1);
    } else {
        metrics::counter!("duplicates_skipped_total").increment(1);
        tracing::info!("event already handled; skipping the duplicate delivery");
    }
    Disposition::Ack
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        worker: WorkerSettings,
    }

    fn settings(prefetch: u16, batch_size: u16, pool: Option<u32>) -> WorkerSettings {
        let mut settings = Cli::parse_from(["worker"]).worker;
        settings.prefetch = prefetch;
        settings.batch_size = batch_size;
        settings.service.database.db_max_connections = pool;
        settings
    }

    #[test]
    fn an_unset_pool_is_sized_for_every_batch_handled_at_once_and_one_more() {
        // The defaults: 40 in hand in batches of 20, on two lanes.
        let planned = Concurrency::plan(&settings(40, 20, None), 2);
        assert_eq!(
            planned,
            Concurrency {
                prefetch: 40,
                pool: 5
            }
        );
        // Without batching, one connection per message in hand.
        let planned = Concurrency::plan(&settings(10, 1, None), 2);
        assert_eq!(
            planned,
            Concurrency {
                prefetch: 10,
                pool: 21
            }
        );
    }

    #[test]
    fn a_pool_big_enough_is_kept_as_set() {
        let planned = Concurrency::plan(&settings(10, 1, Some(40)), 1);
        assert_eq!(
            planned,
            Concurrency {
                prefetch: 10,
                pool: 40
            }
        );
    }

    #[test]
    fn a_pool_too_small_keeps_its_size_and_lowers_the_prefetch_to_fit() {
        let planned = Concurrency::plan(&settings(10, 1, Some(9)), 2);
        assert_eq!(
            planned,
            Concurrency {
                prefetch: 4,
                pool: 9
            }
        );
        // Two batches of 20 per queue would need 5; one batch at a time
        // is one message at a time.
        let planned = Concurrency::plan(&settings(40, 20, Some(3)), 2);
        assert_eq!(
            planned,
            Concurrency {
                prefetch: 1,
                pool: 3
            }
        );
        // Eight batches of 5 would need 9; three fit: 15 in hand.
        let planned = Concurrency::plan(&settings(40, 5, Some(4)), 1);
        assert_eq!(
            planned,
            Concurrency {
                prefetch: 15,
                pool: 4
            }
        );
    }

    #[test]
    fn even_a_one_connection_pool_handles_one_batch_per_queue() {
        let planned = Concurrency::plan(&settings(10, 1, Some(1)), 2);
        assert_eq!(
            planned,
            Concurrency {
                prefetch: 1,
                pool: 1
            }
        );
    }

    #[test]
    fn a_pool_timeout_is_waiting_for_the_database_and_other_errors_are_not() {
        let timed_out = anyhow::Error::from(sqlx::Error::PoolTimedOut).context("recording");
        assert!(crate::db::no_connection(&timed_out));
        let failed = anyhow::Error::from(sqlx::Error::RowNotFound);
        assert!(!crate::db::no_connection(&failed));
    }
}
