//! Wires order-processor together: worker start-up, the event publisher and
//! its outbox relay, the payment sweeper, and the orders' work: consumers on
//! both lanes' RabbitMQ work queues, or claims from Postgres's `jobs` table
//! (`WORK_QUEUE=postgres`).

use std::{sync::Arc, time::Duration};

use messaging::contracts::Lane;
use platform::{
    jobs::{JobQueue, WorkQueue},
    outbox::Relay,
    worker::Worker,
};
use tokio_util::sync::CancellationToken;

use crate::{
    configuration::Settings, consumer, handler::Processor, payment::http::HttpProvider,
    sweeper::Sweeper,
};

/// A started order-processor.
pub struct Application {
    worker: Worker,
    processor: Processor,
    relay: Relay,
    relay_interval: Duration,
    sweeper: Sweeper,
    sweep_interval: Duration,
    /// Set when the orders' work comes from Postgres.
    jobs: Option<(JobQueue, Duration)>,
}

impl Application {
    /// Connect, migrate, declare, and bind the health port.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let topology = settings.worker.service.amqp.topology();
        let queues = vec![
            topology.work_queue(Lane::Express),
            topology.work_queue(Lane::Standard),
        ];
        let worker = Worker::start(
            "order-processor",
            &settings.worker,
            settings.http_port,
            queues,
        )
        .await?;
        let relay = Relay::new(worker.pool().clone(), worker.publisher().clone());
        let instance_id = settings.instance_id();
        tracing::info!(instance_id = %instance_id, "order-processor starting");
        let processor = Processor {
            pool: worker.pool().clone(),
            topology: worker.topology().clone(),
            event_bus: settings.worker.service.event_bus,
            payments: Arc::new(HttpProvider::new(&settings.provider)?),
            instance_id,
        };
        let jobs = (settings.worker.service.work_queue == WorkQueue::Postgres).then(|| {
            let queue = JobQueue::new(
                worker.pool().clone(),
                processor.instance_id.clone(),
                Duration::from_millis(settings.jobs.job_lease_ms),
                settings.worker.retry_policy(),
            );
            (queue, Duration::from_millis(settings.jobs.job_poll_ms))
        });
        let sweeper = Sweeper::new(
            processor.clone(),
            Duration::from_secs(settings.payment_settle_after_secs),
            Duration::from_secs(settings.payment_abandon_after_secs),
        );
        Ok(Self {
            worker,
            processor,
            sweeper,
            sweep_interval: Duration::from_millis(settings.payment_sweep_interval_ms),
            relay,
            relay_interval: Duration::from_millis(settings.outbox_relay_interval_ms),
            jobs,
        })
    }

    /// The health port actually bound.
    pub fn port(&self) -> u16 {
        self.worker.port()
    }

    /// Work the orders until `shutdown`, then flush the outbox.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        // Not a child of `shutdown`: the relay's final flush must wait for the
        // deliveries still committing events when shutdown is asked for.
        let relay_stop = CancellationToken::new();
        let relay_task = tokio::spawn(
            self.relay
                .clone()
                .run(self.relay_interval, relay_stop.clone()),
        );
        let sweeper_task = tokio::spawn(
            self.sweeper
                .clone()
                .run(self.sweep_interval, shutdown.child_token()),
        );
        let orders = consumer::Orders {
            processor: &self.processor,
            relay: &self.relay,
        };
        let consumed = match self.jobs {
            Some((queue, poll)) => {
                self.worker
                    .run_jobs(shutdown.clone(), queue, poll, orders)
                    .await
            }
            None => self.worker.run(shutdown.clone(), orders).await,
        };
        shutdown.cancel();
        let _ = sweeper_task.await;
        // The consumers have drained: what they committed is flushed now.
        relay_stop.cancel();
        let _ = relay_task.await;
        tracing::info!("order-processor stopped");
        consumed
    }
}
