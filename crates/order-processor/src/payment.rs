//! A stand-in payment provider: it takes a configurable time, and declines
//! deterministically, so demos and tests can count on the outcome.

use std::time::Duration;

/// The simulated provider.
#[derive(Debug, Clone)]
pub struct PaymentProvider {
    latency: Duration,
    decline_over_cents: i64,
}

impl PaymentProvider {
    pub fn new(latency: Duration, decline_over_cents: i64) -> Self {
        Self {
            latency,
            decline_over_cents,
        }
    }

    /// Authorise `total_cents`; `false` means declined.
    pub async fn authorise(&self, total_cents: i64) -> bool {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        total_cents <= self.decline_over_cents
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn amounts_above_the_limit_are_declined() {
        let provider = PaymentProvider::new(Duration::ZERO, 100);
        assert!(provider.authorise(100).await);
        assert!(!provider.authorise(101).await);
    }
}
