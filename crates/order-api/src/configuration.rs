//! order-api's settings, from environment variables (or flags), parsed once
//! at start. A bad value stops the service with a message naming it.

use std::{num::NonZeroU32, time::Duration};

use clap::Parser;
use platform::settings::ServiceSettings;

/// MAX_QUANTITY unless set.
pub const DEFAULT_MAX_QUANTITY: i32 = 1000;

/// Settings of order-api.
#[derive(Parser, Clone, Debug)]
#[command(
    name = "order-api",
    about = "Takes orders over HTTP and queues them for processing"
)]
pub struct Settings {
    #[command(flatten)]
    pub service: ServiceSettings,
    /// Port to listen on; 0 picks a free one.
    #[arg(long, env = "HTTP_PORT", default_value_t = 8080)]
    pub http_port: u16,
    /// Largest request body accepted, in bytes.
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,
    /// Largest quantity of one line.
    #[arg(long, env = "MAX_QUANTITY", default_value_t = DEFAULT_MAX_QUANTITY)]
    pub max_quantity: i32,
    /// How long an idempotency key is remembered, in seconds.
    #[arg(long, env = "IDEMPOTENCY_TTL_SECS", default_value_t = 24 * 60 * 60)]
    pub idempotency_ttl_secs: u64,
    /// How often expired idempotency keys are deleted, in seconds.
    #[arg(long, env = "IDEMPOTENCY_CLEANUP_INTERVAL_SECS", default_value_t = 600)]
    pub idempotency_cleanup_interval_secs: u64,
    /// How often the outbox relay looks for unpublished orders, in ms.
    #[arg(long, env = "OUTBOX_RELAY_INTERVAL_MS", default_value_t = 1000)]
    pub outbox_relay_interval_ms: u64,
    /// How long an order may stay accepted after its message was published
    /// before it is published again, if the broker holds too few order
    /// messages to still have it, in seconds.
    #[arg(long, env = "ORDER_REPUBLISH_AFTER_SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub order_republish_after_secs: u64,
    /// Requests per second each API key may make, on average.
    #[arg(long, env = "RATE_LIMIT_PER_SECOND", default_value = "20")]
    pub rate_limit_per_second: NonZeroU32,
    /// Requests an API key may make at once above its rate.
    #[arg(long, env = "RATE_LIMIT_BURST", default_value = "40")]
    pub rate_limit_burst: NonZeroU32,
    /// Event streams (`/orders/{id}/events`, `/events`) open at once per API
    /// key; over it: `429`.
    #[arg(long, env = "SSE_MAX_STREAMS_PER_KEY", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub sse_max_streams_per_key: u32,
    /// Event streams open at once in all.
    #[arg(long, env = "SSE_MAX_STREAMS", default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..))]
    pub sse_max_streams: u32,
    /// The longest an order's event stream stays open, in seconds (it ends
    /// at the order's final status anyway).
    #[arg(long, env = "SSE_MAX_LIFETIME_SECS", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    pub sse_max_lifetime_secs: u64,
}

impl Settings {
    pub fn order_republish_after(&self) -> Duration {
        Duration::from_secs(self.order_republish_after_secs)
    }

    pub fn idempotency_ttl(&self) -> Duration {
        Duration::from_secs(self.idempotency_ttl_secs)
    }
}
