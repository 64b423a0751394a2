//! The live feed's order events from the event log in Postgres
//! (`EVENT_BUS=postgres`): read from where the log ends when the first
//! client arrives, while anyone watches.

use messaging::contracts::OrderEvent;
use platform::event_log;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::{Feed, LiveEvent, WATCHERS_CHECK};

/// Events read from the log at a time.
const PAGE: u16 = 100;

impl Feed {
    /// Follow the event log from its end until no one watches or
    /// `shutdown`.
    pub(super) async fn follow_log(
        &self,
        pool: &PgPool,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let from = event_log::end(pool).await?;
        tracing::info!(position = ?from, "following order events in Postgres for live clients");
        self.live.send_replace(true);
        let stop = shutdown.child_token();
        let reading = event_log::pages(
            pool.clone(),
            from,
            PAGE,
            stop.clone(),
            |entries| async move {
                for entry in entries {
                    match serde_json::from_str::<OrderEvent>(&entry.body) {
                        Ok(event) => self.publish_heard(LiveEvent::of_event(&event)).await,
                        Err(error) => {
                            tracing::warn!(error = %error, "ignoring an undecodable order event");
                        }
                    }
                }
                true
            },
        );
        let watching = async {
            let mut check = tokio::time::interval(WATCHERS_CHECK);
            loop {
                check.tick().await;
                if self.unwatched() {
                    tracing::info!("no live clients: stopped following order events");
                    return;
                }
            }
        };
        tokio::select! {
            () = reading => {}
            () = watching => {}
        }
        stop.cancel();
        Ok(())
    }
}
