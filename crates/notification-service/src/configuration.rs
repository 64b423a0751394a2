//! notification-service's settings, from environment variables (or flags).

use std::time::Duration;

use clap::Parser;
use platform::worker::WorkerSettings;

use crate::{
    egress::AllowList,
    webhooks::{Secret, WebhookPolicy},
};

/// Settings of notification-service.
#[derive(Parser, Clone, Debug)]
#[command(name = "notification-service", about = "Sends order confirmations")]
pub struct Settings {
    #[command(flatten)]
    pub worker: WorkerSettings,
    /// Port of /healthz and /readyz; 0 picks a free one.
    #[arg(long, env = "HTTP_PORT", default_value_t = 8082)]
    pub http_port: u16,
    /// Shared secret webhooks are signed with (HMAC-SHA256); set your own.
    #[arg(long, env = "WEBHOOK_SECRET", default_value = DEV_SECRET, hide_default_value = true)]
    pub webhook_secret: Secret,
    /// Attempts per webhook before it is dead-lettered.
    #[arg(long, env = "WEBHOOK_MAX_ATTEMPTS", default_value_t = 8)]
    pub webhook_max_attempts: u32,
    /// Wait before the first retry; it doubles, with jitter, up to the maximum.
    #[arg(long, env = "WEBHOOK_INITIAL_BACKOFF_MS", default_value_t = 500)]
    pub webhook_initial_backoff_ms: u64,
    #[arg(long, env = "WEBHOOK_MAX_BACKOFF_MS", default_value_t = 60_000)]
    pub webhook_max_backoff_ms: u64,
    /// How long one attempt may take.
    #[arg(long, env = "WEBHOOK_TIMEOUT_MS", default_value_t = 5_000)]
    pub webhook_timeout_ms: u64,
    /// Webhooks in flight at once.
    #[arg(long, env = "WEBHOOK_CONCURRENCY", default_value_t = 32)]
    pub webhook_concurrency: usize,
    /// Comma-separated host names and IPs that webhooks may reach even though
    /// they are (or resolve to) loopback, private or otherwise inward
    /// addresses: for a receiver on localhost. Empty (none) by default.
    #[arg(long, env = "WEBHOOK_ALLOWED_HOSTS", default_value = "")]
    pub webhook_allowed_hosts: AllowList,
}

/// The secret used when none is configured: fine for a demo, logged as a
/// warning at start.
pub const DEV_SECRET: &str = "orderflow-dev-webhook-secret";

impl Settings {
    /// How webhooks are sent.
    pub fn webhook_policy(&self) -> WebhookPolicy {
        WebhookPolicy {
            secret: self.webhook_secret.clone(),
            max_attempts: self.webhook_max_attempts.max(1),
            initial_backoff: Duration::from_millis(self.webhook_initial_backoff_ms),
            max_backoff: Duration::from_millis(self.webhook_max_backoff_ms),
            timeout: Duration::from_millis(self.webhook_timeout_ms),
            concurrency: self.webhook_concurrency.max(1),
            allowed_hosts: self.webhook_allowed_hosts.clone(),
        }
    }
}
