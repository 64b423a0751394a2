//! Requests each key may make: a steady rate with a burst on top.

use std::{num::NonZeroU32, sync::Arc, time::Duration};

use governor::{DefaultKeyedRateLimiter, Quota, clock::Clock};
use uuid::Uuid;

/// Requests each key may make: a steady rate with a burst on top.
#[derive(Clone)]
pub struct RateLimits {
    limiter: Arc<DefaultKeyedRateLimiter<Uuid>>,
}

impl RateLimits {
    pub fn new(per_second: NonZeroU32, burst: NonZeroU32) -> Self {
        let quota = Quota::per_second(per_second).allow_burst(burst);
        Self {
            limiter: Arc::new(DefaultKeyedRateLimiter::keyed(quota)),
        }
    }

    /// `Err(wait)` when `key` is over its limit.
    pub fn check(&self, key: Uuid) -> Result<(), Duration> {
        self.limiter.check_key(&key).map_err(|not_until| {
            not_until.wait_time_from(governor::clock::DefaultClock::default().now())
        })
    }

    /// Forget keys that are back to a full burst (run now and then, so the
    /// table does not grow with every key ever seen).
    pub fn forget_idle(&self) {
        self.limiter.retain_recent();
    }
}
