//! Builds order-api from its settings and runs it: the HTTP server, the
//! outbox relay and the idempotency-key clean-up, until asked to stop.

use std::{net::SocketAddr, time::Duration};

use anyhow::Context;
use axum::Router;
use messaging::{Broker, Publisher};
use platform::{event_log::EventBus, health, jobs::WorkQueue, outbox::Relay};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    announcer::Announcer,
    auth::{AuthState, KeyLookup, RateLimits},
    configuration::Settings,
    idempotency,
    intake::Intake,
    live::{EventSource, Feed, Streams},
    republish::Republisher,
    router::router,
    routes::{orders::OrderView, orders::post::MaxQuantity, sse::Streaming},
    state::{AppState, Transports},
};

/// A built, listening order-api.
pub struct Application {
    listener: TcpListener,
    router: Router,
    state: AppState,
    broker: Broker,
    republisher: Option<Republisher>,
    settings: Settings,
}

impl Application {
    /// Connect to Postgres and RabbitMQ (waiting for both), migrate, declare
    /// the topology and bind the listener (port 0 picks a free one).
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let pool = settings.service.database.connect_and_migrate().await?;
        let broker = settings.service.amqp.broker()?;
        let uses_rabbitmq = settings.service.uses_rabbitmq();
        if uses_rabbitmq {
            broker.connect(&CancellationToken::new()).await;
        } else {
            tracing::info!("work queue and event bus in Postgres: not connecting to RabbitMQ");
        }
        let publisher = Publisher::new(broker.clone());
        // A job is written with its order, and cannot be lost apart from it.
        let republisher = (settings.service.work_queue == WorkQueue::Rabbitmq).then(|| {
            Republisher::new(
                pool.clone(),
                broker.clone(),
                publisher.clone(),
                settings.order_republish_after(),
            )
        });
        let feed = Feed::new(pool.clone());
        let state = AppState {
            pool: pool.clone(),
            auth: AuthState {
                keys: KeyLookup::start(pool.clone()),
                rate_limits: RateLimits::new(
                    settings.rate_limit_per_second,
                    settings.rate_limit_burst,
                ),
            },
            intake: Intake::start(
                pool.clone(),
                broker.topology().orders_exchange(),
                settings.service.work_queue,
                settings.idempotency_ttl(),
                OrderView::accepted_body,
            ),
            announcer: Announcer {
                feed: feed.clone(),
                relay: Relay::new(pool.clone(), publisher),
            },
            broker: broker.clone(),
            dead_letters: Default::default(),
            streaming: Streaming {
                feed,
                streams: Streams::new(settings.sse_max_streams_per_key, settings.sse_max_streams),
                max_lifetime: Duration::from_secs(settings.sse_max_lifetime_secs),
            },
            max_quantity: MaxQuantity(settings.max_quantity),
            transports: Transports {
                work_queue: settings.service.work_queue,
                event_bus: settings.service.event_bus,
            },
        };
        let readiness = if uses_rabbitmq {
            health::Readiness::new(pool, broker.clone())
        } else {
            health::Readiness::postgres(pool)
        };
        let health = health::router(readiness);
        let router = router(state.clone(), health, settings.max_body_bytes);
        let address = SocketAddr::new(settings.service.http_host, settings.http_port);
        let listener = TcpListener::bind(address)
            .await
            .with_context(|| format!("binding {address}"))?;
        Ok(Self {
            listener,
            router,
            state,
            broker,
            republisher,
            settings,
        })
    }

    /// The port actually bound.
    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Serve until `shutdown`; then stop accepting, finish in-flight requests,
    /// and flush the outbox before returning.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        // Not a child of `shutdown`: the relay's final flush must wait for the
        // requests still committing orders when shutdown is asked for.
        let relay_stop = CancellationToken::new();
        let relay = tokio::spawn(self.state.announcer.relay.clone().run(
            Duration::from_millis(self.settings.outbox_relay_interval_ms),
            relay_stop.clone(),
        ));
        let cleanup = tokio::spawn(clean_up_keys(
            self.state.pool.clone(),
            self.state.auth.rate_limits.clone(),
            self.settings.idempotency_ttl(),
            Duration::from_secs(self.settings.idempotency_cleanup_interval_secs.max(1)),
            shutdown.clone(),
        ));
        let republisher = self
            .republisher
            .clone()
            .map(|republisher| tokio::spawn(republisher.run(shutdown.clone())));
        // order-api publishes only when orders come: without this, a lost
        // node would be left only when the next order or sweep needs one.
        let keeper = self.settings.service.uses_rabbitmq().then(|| {
            let (broker, shutdown) = (self.broker.clone(), shutdown.clone());
            tokio::spawn(async move { broker.keep_connected(&shutdown).await })
        });
        let events = match self.settings.service.event_bus {
            EventBus::Rabbitmq => EventSource::Broker(self.broker.clone()),
            EventBus::Postgres => EventSource::Log(self.state.pool.clone()),
        };
        let jobs_watch = (self.settings.service.work_queue == WorkQueue::Postgres).then(|| {
            let feed = self.state.streaming.feed.clone();
            tokio::spawn(feed.watch_jobs(self.state.pool.clone(), shutdown.clone()))
        });
        let feed = tokio::spawn(
            self.state
                .streaming
                .feed
                .clone()
                .run(events, shutdown.clone()),
        );
        tracing::info!(port = self.port(), "order-api listening");
        let served = platform::http::serve(
            self.listener,
            self.router,
            self.settings.service.http,
            shutdown.clone(),
        )
        .await
        .context("serving HTTP");
        // The server may also stop on its own (an I/O error): stop the rest.
        shutdown.cancel();
        // Every request has finished: what they committed is flushed now.
        relay_stop.cancel();
        let _ = relay.await;
        let _ = feed.await;
        if let Some(jobs_watch) = jobs_watch {
            let _ = jobs_watch.await;
        }
        if let Some(republisher) = republisher {
            let _ = republisher.await;
        }
        if let Some(keeper) = keeper {
            let _ = keeper.await;
        }
        cleanup.abort();
        self.broker.close().await;
        tracing::info!("order-api stopped");
        served
    }
}

/// Forget expired idempotency keys, and the rate-limit state of keys that
/// have been quiet.
async fn clean_up_keys(
    pool: PgPool,
    rate_limits: RateLimits,
    ttl: Duration,
    every: Duration,
    shutdown: CancellationToken,
) {
    loop {
        rate_limits.forget_idle();
        match idempotency::delete_expired(&pool, ttl).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "expired idempotency keys deleted"),
            Err(error) => tracing::warn!(error.message = %error, "idempotency key clean-up failed"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}
