//! The settings every orderflow service that talks to RabbitMQ and Postgres
//! takes, from environment variables (or flags): flattened into each
//! service's own settings, beside what only that service has (its HTTP
//! port first of all, whose default differs per service).

use std::net::IpAddr;

use messaging::{AmqpSettings, telemetry::LogSettings};

use crate::{db::DatabaseSettings, event_log::EventBus, http::HttpLimits, jobs::WorkQueue};

/// RabbitMQ, Postgres, logging and the HTTP listener.
#[derive(clap::Args, Clone, Debug)]
pub struct ServiceSettings {
    #[command(flatten)]
    pub amqp: AmqpSettings,
    #[command(flatten)]
    pub database: DatabaseSettings,
    #[command(flatten)]
    pub log: LogSettings,
    #[command(flatten)]
    pub http: HttpLimits,
    /// Address the service's HTTP endpoints listen on (0.0.0.0 inside a
    /// container).
    #[arg(long, env = "HTTP_HOST", default_value = "127.0.0.1")]
    pub http_host: IpAddr,
    /// Where accepted orders wait for the processors: RabbitMQ's work
    /// queues, or Postgres's `jobs` table (see `platform::jobs`).
    #[arg(long, env = "WORK_QUEUE", value_enum, default_value_t)]
    pub work_queue: WorkQueue,
    /// How the order events travel: RabbitMQ's fanout exchange, or
    /// Postgres's `events` table (see `platform::event_log`).
    #[arg(long, env = "EVENT_BUS", value_enum, default_value_t)]
    pub event_bus: EventBus,
}

impl ServiceSettings {
    /// Whether anything travels through RabbitMQ: not when the work queue
    /// and the event bus are both in Postgres, which then runs orderflow
    /// alone (the services neither connect to RabbitMQ nor wait for it).
    pub fn uses_rabbitmq(&self) -> bool {
        uses_rabbitmq(self.work_queue, self.event_bus)
    }
}

/// Whether orders or events travel through RabbitMQ with this work queue
/// and this event bus.
pub fn uses_rabbitmq(work_queue: WorkQueue, event_bus: EventBus) -> bool {
    work_queue == WorkQueue::Rabbitmq || event_bus == EventBus::Rabbitmq
}
