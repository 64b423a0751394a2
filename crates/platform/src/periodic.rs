//! Background work a service does on a timer until it shuts down: a failed
//! round is logged and the next one tries again, and a round that hangs (a
//! call to a server that will never answer) is given up, logged, and
//! followed by the next: a stalled sweep must not stop sweeping for good.

use std::{future::Future, time::Duration};

use tokio_util::sync::CancellationToken;

/// Run `round` every `period` (a round that overruns delays the next, none
/// is skipped-and-bunched) until `shutdown`; a failed round is logged as
/// "could not `what`; will retry", and a round still running after `limit`
/// is dropped with a warning, so the next one starts.
pub async fn every<F, Fut, T>(
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
        let task = tokio::spawn(every(
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
