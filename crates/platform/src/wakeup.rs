//! How a process learns that rows it waits for were written (jobs for a
//! processor, events for a reader of the event log): one connection per
//! process `LISTEN`s on the channel their writers notify, and wakes the
//! waiting tasks.
//!
//! Notifications are lost while that connection is down, so three things
//! stand behind them:
//! - after the listener reconnects (sqlx has listened again by the time it
//!   says the connection was lost), the tasks are woken to catch up;
//! - a keep-alive query every [`KEEPALIVE`] finds a connection that died
//!   without a word (a dropped network path), and a new one is made;
//! - the waiting tasks never sleep longer than a safety poll (`JOB_POLL_MS`
//!   for jobs), nor, for jobs, past the moment the next one falls due.

use std::{sync::Arc, time::Duration};

use sqlx::{PgPool, postgres::PgListener};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// How often the listening connection is checked.
pub const KEEPALIVE: Duration = Duration::from_secs(15);

/// How long the keep-alive query may take before the connection counts as
/// dead.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Listen on `channel` until `shutdown`, waking every task waiting on
/// `wake` on each notification and after each reconnection.
pub async fn listen(
    pool: PgPool,
    channel: &'static str,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    while !shutdown.is_cancelled() {
        let mut listener = match connect(&pool, channel).await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::warn!(error.message = %error, channel, "could not listen; trying again");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        // Jobs written while no one was listening.
        wake.notify_waiters();
        let mut keepalive = tokio::time::interval(KEEPALIVE);
        keepalive.tick().await;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                received = listener.try_recv() => match received {
                    Ok(Some(_)) => wake.notify_waiters(),
                    Ok(None) => {
                        tracing::warn!(channel, "the listening connection was lost; listening again");
                        wake.notify_waiters();
                    }
                    Err(error) => {
                        tracing::warn!(error.message = %error, channel, "listening failed; reconnecting");
                        break;
                    }
                },
                _ = keepalive.tick() => {
                    let alive = tokio::time::timeout(
                        KEEPALIVE_TIMEOUT,
                        sqlx::query_scalar!(r#"SELECT 1 AS "one!""#).fetch_one(&mut listener),
                    )
                    .await;
                    if !matches!(alive, Ok(Ok(_))) {
                        tracing::warn!(channel, "the listening connection did not answer; reconnecting");
                        break;
                    }
                }
            }
        }
    }
}

async fn connect(pool: &PgPool, channel: &str) -> sqlx::Result<PgListener> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(channel).await?;
    Ok(listener)
}
