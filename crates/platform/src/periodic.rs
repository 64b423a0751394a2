//! Background work a service does on a timer until it shuts down: a failed
//! round is logged and the next one tries again.

use std::{future::Future, time::Duration};

use tokio_util::sync::CancellationToken;

/// Run `round` every `period` (a round that overruns delays the next, none
/// is skipped-and-bunched) until `shutdown`; a failed round is logged as
/// "could not `what`; will retry".
pub async fn every<F, Fut, T>(
    period: Duration,
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
            _ = tick.tick() => {
                if let Err(error) = round().await {
                    tracing::warn!(
                        error.message = %format!("{error:#}"),
                        "could not {what}; will retry"
                    );
                }
            }
        }
    }
}
