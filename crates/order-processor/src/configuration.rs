//! order-processor's settings, from environment variables (or flags).

use clap::Parser;
use platform::worker::WorkerSettings;

/// Settings of order-processor.
#[derive(Parser, Clone, Debug)]
#[command(
    name = "order-processor",
    about = "Processes accepted orders from the work queue"
)]
pub struct Settings {
    #[command(flatten)]
    pub worker: WorkerSettings,
    /// Port of /healthz and /readyz; 0 picks a free one.
    #[arg(long, env = "HTTP_PORT", default_value_t = 8081)]
    pub http_port: u16,
    /// Simulated payment-provider latency per order, in milliseconds.
    #[arg(long, env = "PAYMENT_LATENCY_MS", default_value_t = 20)]
    pub payment_latency_ms: u64,
    /// Orders whose total is above this many cents are declined by the
    /// simulated payment provider (a deterministic rule, for demos and tests).
    #[arg(long, env = "PAYMENT_DECLINE_OVER_CENTS", default_value_t = 1_000_000)]
    pub payment_decline_over_cents: i64,
    /// Let customer ids inject payment failures: `flaky-N` fails the first N
    /// attempts, `doomed` every attempt (to watch retries and dead letters).
    #[arg(long, env = "DEMO_FAILURES", default_value_t = false, action = clap::ArgAction::Set)]
    pub demo_failures: bool,
    /// Name of this instance in logs and in `orders.processed_by`
    /// (default: host name and process id).
    #[arg(long, env = "INSTANCE_ID")]
    pub instance_id: Option<String>,
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
