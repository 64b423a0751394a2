//! What a consuming service is told: the shared settings, and how many
//! messages it keeps in hand, how it batches them and retries them.

use std::time::Duration;

use messaging::{Topology, consumer::RetryPolicy};

use crate::settings::ServiceSettings;

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
