//! A stand-in payment provider: it takes a configurable time, and declines
//! deterministically, so demos and tests can count on the outcome. With
//! demo failures on, some customers make it fail on purpose, to watch
//! retries and dead letters happen.

use std::time::Duration;

/// The simulated provider.
#[derive(Debug, Clone)]
pub struct PaymentProvider {
    latency: Duration,
    decline_over_cents: i64,
    demo_failures: bool,
}

/// The provider could not be reached (a transient failure, worth a retry).
#[derive(Debug, thiserror::Error)]
#[error("payment provider unavailable (injected failure for customer {0:?})")]
pub struct Unavailable(pub String);

impl PaymentProvider {
    pub fn new(latency: Duration, decline_over_cents: i64) -> Self {
        Self {
            latency,
            decline_over_cents,
            demo_failures: false,
        }
    }

    /// Honour the failure-injecting customer ids: `flaky-N` fails the first
    /// N attempts, `doomed` fails every attempt.
    pub fn with_demo_failures(mut self, on: bool) -> Self {
        self.demo_failures = on;
        self
    }

    /// Authorise `total_cents` for `order_id` (the idempotency key a real
    /// provider would be given) on attempt `attempt` (1 for the first);
    /// `Ok(false)` means declined.
    pub async fn authorise(
        &self,
        _order_id: uuid::Uuid,
        customer_id: &str,
        total_cents: i64,
        attempt: u32,
    ) -> Result<bool, Unavailable> {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        if self.demo_failures && injected_failure(customer_id, attempt) {
            return Err(Unavailable(customer_id.to_owned()));
        }
        Ok(total_cents <= self.decline_over_cents)
    }
}

fn injected_failure(customer_id: &str, attempt: u32) -> bool {
    if customer_id == "doomed" {
        return true;
    }
    customer_id
        .strip_prefix("flaky-")
        .and_then(|n| n.parse::<u32>().ok())
        .is_some_and(|failures| attempt <= failures)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> uuid::Uuid {
        uuid::Uuid::new_v4()
    }

    #[tokio::test]
    async fn amounts_above_the_limit_are_declined() {
        let provider = PaymentProvider::new(Duration::ZERO, 100);
        assert!(provider.authorise(id(), "c", 100, 1).await.unwrap());
        assert!(!provider.authorise(id(), "c", 101, 1).await.unwrap());
    }

    #[tokio::test]
    async fn demo_failures_only_when_switched_on() {
        let off = PaymentProvider::new(Duration::ZERO, 100);
        assert!(off.authorise(id(), "doomed", 1, 1).await.is_ok());
        let on = off.with_demo_failures(true);
        assert!(on.authorise(id(), "doomed", 1, 9).await.is_err());
        assert!(on.authorise(id(), "flaky-2", 1, 2).await.is_err());
        assert!(on.authorise(id(), "flaky-2", 1, 3).await.unwrap());
        assert!(on.authorise(id(), "ordinary", 1, 1).await.unwrap());
    }
}
