//! order-processor's settings, from environment variables (or flags).

use clap::Parser;
use platform::{jobs::JobSettings, worker::WorkerSettings};

use crate::payment::http::ProviderSettings as HttpProviderSettings;

/// Settings of order-processor.
#[derive(Parser, Clone, Debug)]
#[command(
    name = "order-processor",
    about = "Processes accepted orders from the work queue"
)]
pub struct Settings {
    #[command(flatten)]
    pub worker: WorkerSettings,
    /// How the `jobs` table is worked (WORK_QUEUE=postgres).
    #[command(flatten)]
    pub jobs: JobSettings,
    /// Port of /healthz and /readyz; 0 picks a free one.
    #[arg(long, env = "HTTP_PORT", default_value_t = 8081)]
    pub http_port: u16,
    /// How the payment provider is reached.
    #[command(flatten)]
    pub provider: HttpProviderSettings,
    /// Name of this instance in logs and in `orders.processed_by`
    /// (default: host name and process id).
    #[arg(long, env = "INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// How often the sweeper looks for payments left half done, in ms.
    #[arg(long, env = "PAYMENT_SWEEP_INTERVAL_MS", default_value_t = 5000)]
    pub payment_sweep_interval_ms: u64,
    /// A payment decided (capture or void) but not settled this many
    /// seconds later is settled by the sweeper.
    #[arg(long, env = "PAYMENT_SETTLE_AFTER_SECS", default_value_t = 30)]
    pub payment_settle_after_secs: u64,
    /// A payment not decided this many seconds after its last step (its
    /// message gone: dead-lettered, or forgotten) is abandoned by the
    /// sweeper: its authorisation voided, the order rejected. Keep it above
    /// RETRY_MAX_WAIT_MS, the longest a message is retried.
    #[arg(long, env = "PAYMENT_ABANDON_AFTER_SECS", default_value_t = 900)]
    pub payment_abandon_after_secs: u64,
    /// How often the outbox relay looks for unpublished events, in ms.
    #[arg(long, env = "OUTBOX_RELAY_INTERVAL_MS", default_value_t = 1000)]
    pub outbox_relay_interval_ms: u64,
}

impl Settings {
    /// The configured instance id, or `hostname-pid`.
    pub fn instance_id(&self) -> String {
        self.instance_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "processor".to_owned());
            format!("{host}-{}", std::process::id())
        })
    }
}
