//! A subscription the broker has stopped serving. After a quorum queue's
//! leader changes, a consumer can be left registered on its channel while
//! the queue no longer delivers to it: a delivery lost in transit (the
//! channel notices a gap only when the next delivery arrives), a settlement
//! lost on the way to the old leader (the broker still counts the message
//! against the consumer's prefetch), or a registration the new leader never
//! applied. Nothing fails, so nothing reconnects: the messages wait in the
//! queue, and the service sits idle beside them.
//!
//! So each consumer looks at its queue now and then: messages ready at
//! [`CHECKS`] checks in a row, [`CHECK_EVERY`] apart, while this consumer
//! held nothing and received nothing, means the broker is not serving it.
//! The consume loop then ends as if its channel were lost, and the service
//! subscribes again on new channels. A consumer that is merely outpaced by
//! its competitors is never idle with messages ready.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use lapin::Channel;

/// How often a consumer looks at its queue.
pub const CHECK_EVERY: Duration = Duration::from_secs(5);

/// Checks in a row that must find the consumer idle beside ready messages.
pub const CHECKS: u32 = 3;

/// Returns the number of ready messages once `queue` has had some at
/// [`CHECKS`] checks in a row while `received` (the deliveries this
/// consumer got so far) did not move and `holds_nothing` said so. A check
/// that cannot read the queue within [`CHECK_EVERY`] counts as a good one (a
/// lost channel is noticed elsewhere).
pub async fn stalled(
    channel: &Channel,
    queue: &str,
    received: &AtomicU64,
    holds_nothing: impl Fn() -> bool,
) -> u32 {
    let mut seen = received.load(Ordering::Relaxed);
    let mut idle_checks = 0;
    loop {
        tokio::time::sleep(CHECK_EVERY).await;
        let now = received.load(Ordering::Relaxed);
        let idle = now == seen && holds_nothing();
        seen = now;
        // Only an idle consumer asks: the broker answers on the consumer's
        // own channel, which a slow answer would hold up.
        let ready = if idle {
            tokio::time::timeout(CHECK_EVERY, ready(channel, queue))
                .await
                .ok()
                .flatten()
                .unwrap_or(0)
        } else {
            0
        };
        if ready == 0 {
            idle_checks = 0;
            continue;
        }
        idle_checks += 1;
        if idle_checks >= CHECKS {
            return ready;
        }
    }
}

/// Messages ready in `queue`, asked on the consumer's own channel.
async fn ready(channel: &Channel, queue: &str) -> Option<u32> {
    crate::declaration::counts_on(channel, queue)
        .await
        .ok()
        .map(|(ready, _)| ready)
}
