//! payment-provider's settings, from environment variables (or flags).

use clap::Parser;
use messaging::telemetry::LogSettings;
use platform::{db::DatabaseSettings, http::HttpLimits};

impl Settings {
    /// How it connects to its database.
    pub fn database(&self) -> DatabaseSettings {
        DatabaseSettings {
            database_url: self.database_url.clone(),
            db_max_connections: Some(self.db_max_connections),
            db_acquire_timeout_ms: 3000,
        }
    }
}

/// Settings of payment-provider.
#[derive(Parser, Clone)]
#[command(
    name = "payment-provider",
    about = "A stand-in card payment provider: authorise, capture, void and read over HTTP, idempotent by Idempotency-Key"
)]
pub struct Settings {
    /// Its own Postgres database, created if missing: never orderflow's.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/payment_provider",
        hide_env_values = true
    )]
    pub database_url: String,
    /// Connections in its pool, at most.
    #[arg(long, env = "DB_MAX_CONNECTIONS", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub db_max_connections: u32,
    #[command(flatten)]
    pub log: LogSettings,
    #[command(flatten)]
    pub http: HttpLimits,
    /// Address the API listens on.
    #[arg(long, env = "HTTP_HOST", default_value = "127.0.0.1")]
    pub http_host: std::net::IpAddr,
    /// Port of the API (/v1/..., /healthz, /readyz); 0 picks a free one.
    #[arg(long, env = "HTTP_PORT", default_value_t = 8085)]
    pub http_port: u16,
    /// The key a caller must send as `Authorization: Bearer <key>`. Unset:
    /// the API is open (for a provider reachable only by orderflow).
    #[arg(long, env = "PROVIDER_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// How long each request takes before it is worked on, in ms: the
    /// network and the card networks behind a real provider.
    #[arg(long, env = "PAYMENT_LATENCY_MS", default_value_t = 20)]
    pub latency_ms: u64,
    /// Authorisations above this many cents are declined (a deterministic
    /// rule, for demos and tests).
    #[arg(long, env = "PAYMENT_DECLINE_OVER_CENTS", default_value_t = 1_000_000)]
    pub decline_over_cents: i64,
    /// Let customer ids inject failures (see the table in `faults`), and
    /// let `PUT /faults/latency` change the latency while running.
    #[arg(long, env = "DEMO_FAILURES", default_value_t = false, action = clap::ArgAction::Set)]
    pub demo_failures: bool,
    /// How long an injected timeout holds its answer after doing the work,
    /// in ms: longer than the caller waits.
    #[arg(long, env = "PAYMENT_SLOW_ANSWER_MS", default_value_t = 10_000)]
    pub slow_answer_ms: u64,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("database_url", &messaging::amqp::redact(&self.database_url))
            .field("http_port", &self.http_port)
            .field("api_key", &self.api_key.as_ref().map(|_| "<set>"))
            .field("latency_ms", &self.latency_ms)
            .field("demo_failures", &self.demo_failures)
            .finish_non_exhaustive()
    }
}
