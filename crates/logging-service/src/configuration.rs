//! logging-service's settings, from environment variables (or flags).

use clap::Parser;
use platform::worker::WorkerSettings;

/// Settings of logging-service.
#[derive(Parser, Clone, Debug)]
#[command(
    name = "logging-service",
    about = "Keeps the audit trail of order events"
)]
pub struct Settings {
    #[command(flatten)]
    pub worker: WorkerSettings,
    /// Port of /healthz and /readyz; 0 picks a free one.
    #[arg(long, env = "HTTP_PORT", default_value_t = 8083)]
    pub http_port: u16,
}
