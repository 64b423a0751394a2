//! How a consumer paces itself: how failed messages are retried
//! ([`RetryPolicy`]), how the deliveries in hand are split into batches
//! ([`Batching`]), and how many attempts a delivery has had.

use std::time::Duration;

use lapin::{BasicProperties, types::AMQPValue};

use super::ATTEMPTS_HEADER;

/// How failed messages are retried.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts in all, the first included, before a message is dead-lettered.
    pub max_attempts: u32,
    /// Delay before the first retry; doubled for each further one.
    pub initial_delay: Duration,
    /// The longest delay.
    pub max_delay: Duration,
    /// How long one delivery may keep answering [`Disposition::Wait`] before
    /// that counts as a failed attempt: it bounds how long a message waits,
    /// and stays well under the broker's consumer timeout (30 min by
    /// default), past which it would close the channel.
    pub max_wait: Duration,
}

impl RetryPolicy {
    /// The delay before retry number `retry` (1 for the first retry).
    pub fn delay(&self, retry: u32) -> Duration {
        let factor = 2u32.saturating_pow(retry.saturating_sub(1));
        self.initial_delay
            .saturating_mul(factor)
            .min(self.max_delay)
    }

    /// Every delay a retry can wait, each once: the retry queues to declare.
    pub fn delays(&self) -> Vec<Duration> {
        let mut delays: Vec<Duration> = (1..self.max_attempts).map(|r| self.delay(r)).collect();
        delays.dedup();
        delays
    }
}

/// How a consumer splits the deliveries it has in hand into batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    /// Most deliveries in one batch: `batch_size`, but at most half the
    /// prefetch, so one batch can fill while another runs.
    pub batch_size: u16,
    /// Batches handled at once: as many as the prefetch fills. While they
    /// run, the deliveries that arrive wait and become the next batch, so
    /// batches grow with the load instead of splitting it into many small
    /// ones.
    pub batches: u16,
}

impl Batching {
    pub fn of(prefetch: u16, batch_size: u16) -> Self {
        let prefetch = prefetch.max(1);
        let batch_size = batch_size.clamp(1, (prefetch / 2).max(1));
        Self {
            batch_size,
            batches: prefetch.div_ceil(batch_size),
        }
    }
}

/// The failed attempts a delivery has had before this one.
pub fn previous_attempts(properties: &BasicProperties) -> u32 {
    let value = properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(ATTEMPTS_HEADER).cloned());
    match value {
        Some(AMQPValue::LongUInt(n)) => n,
        Some(AMQPValue::LongInt(n)) => u32::try_from(n).unwrap_or(0),
        Some(AMQPValue::LongLongInt(n)) => u32::try_from(n).unwrap_or(0),
        Some(AMQPValue::ShortUInt(n)) => u32::from(n),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use lapin::types::FieldTable;

    use super::*;

    #[test]
    fn retry_delays_double_up_to_the_cap() {
        let policy = RetryPolicy {
            max_attempts: 6,
            initial_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(3),
            max_wait: Duration::from_secs(60),
        };
        let delays: Vec<u128> = (1..=5).map(|r| policy.delay(r).as_millis()).collect();
        assert_eq!(delays, [500, 1000, 2000, 3000, 3000]);
    }

    #[test]
    fn each_retry_delay_is_listed_once() {
        let policy = RetryPolicy {
            max_attempts: 8,
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(30),
            max_wait: Duration::from_secs(600),
        };
        let delays: Vec<u64> = policy.delays().iter().map(Duration::as_secs).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 30]);
    }

    #[test]
    fn the_attempt_count_is_read_from_the_header() {
        assert_eq!(previous_attempts(&BasicProperties::default()), 0);
        let mut headers = FieldTable::default();
        headers.insert(ATTEMPTS_HEADER.into(), AMQPValue::LongUInt(3));
        let props = BasicProperties::default().with_headers(headers);
        assert_eq!(previous_attempts(&props), 3);
    }
}
