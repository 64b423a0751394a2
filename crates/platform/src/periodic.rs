//! Background work a service does on a timer until it shuts down: a failed
//! round is logged and the next one tries again, and a round that hangs (a
//! call to a server that will never answer) is given up, logged, and
//! followed by the next: a stalled sweep must not stop sweeping for good.

use std::{future::Future, time::Duration};

use tokio_util::sync::CancellationToken;

/// The longest one round may take before it is given up.
pub const ROUND_LIMIT: Duration = Duration::from_secs(120);

/// How often to look for work left waiting longer than `after`: every half
/// of it, at least every second and at most every 30 s.
pub fn half_of(after: Duration) -> Duration {
    (after / 2).clamp(Duration::from_secs(1), Duration::from_secs(30))
}

/// Run `round` every `period` (a round that overruns delays the next, none
/// is skipped-and-bunched) until `shutdown`; a failed round is logged as
/// "could not `what`; will retry", and a round still running after
/// [`ROUND_LIMIT`] is dropped with a warning, so the next one starts.
pub async fn every<F, Fut, T>(period: Duration, shutdown: CancellationToken, what: &str, round: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    every_within(period, ROUND_LIMIT, shutdown, what, round).await;
}

/// [`every`], each round given up after `limit`.
async fn every_within<F, Fut, T>(
    period: Duration,
    limit: Duration,
    shutdown: CancellationToken,
    what: &str,
    mut round: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => match tokio::time::timeout(limit, round()).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => tracing::warn!(
                    error.message = %format!("{error:#}"),
                    "could not {what}; will retry"
                ),
                Err(_) => tracing::warn!(
                    "could not {what}: the round did not finish within {limit:?}; \
                     gave it up, the next round tries again"
                ),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    };

    use super::*;

    #[tokio::test]
    async fn a_round_that_hangs_is_given_up_and_the_next_one_runs() {
        let rounds = Arc::new(AtomicU32::new(0));
        let shutdown = CancellationToken::new();
        let counted = rounds.clone();
        let task = tokio::spawn(every_within(
            Duration::from_millis(10),
            Duration::from_millis(50),
            shutdown.clone(),
            "hang",
            move || {
                let round = counted.fetch_add(1, Ordering::SeqCst) + 1;
                async move {
                    if round == 1 {
                        std::future::pending::<()>().await;
                    }
                    anyhow::Ok(())
                }
            },
        ));
        // Without the limit the first round would hang for ever.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while rounds.load(Ordering::SeqCst) < 3 {
            assert!(
                std::time::Instant::now() < deadline,
                "no round after the one that hung"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        shutdown.cancel();
        task.await.unwrap();
    }
}
