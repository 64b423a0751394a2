//! notification-service's settings, from environment variables (or flags).

use clap::Parser;
use platform::worker::WorkerSettings;

/// Settings of notification-service.
#[derive(Parser, Clone, Debug)]
#[command(name = "notification-service", about = "Sends order confirmations")]
pub struct Settings {
    #[command(flatten)]
    pub worker: WorkerSettings,
    /// Port of /healthz and /readyz; 0 picks a free one.
    #[arg(long, env = "HTTP_PORT", default_value_t = 8082)]
    pub http_port: u16,
}
