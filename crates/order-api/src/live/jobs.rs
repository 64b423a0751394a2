//! The live feed's retries and dead letters of jobs (`WORK_QUEUE=postgres`):
//! the processors tell of each on a Postgres channel
//! (`platform::jobs::WATCH_CHANNEL`), as on RabbitMQ they send a copy to
//! the wire tap.

use std::time::Duration;

use chrono::Utc;
use platform::jobs::{WATCH_CHANNEL, Watched};
use sqlx::{PgPool, postgres::PgListener};
use tokio_util::sync::CancellationToken;

use super::{Feed, LiveEvent};

impl Feed {
    /// Hand every job retried or dead-lettered to the connected clients
    /// until `shutdown`, listening again when the connection is lost (what
    /// is told meanwhile is missed: the page is a live view, not a record).
    pub async fn watch_jobs(self, pool: PgPool, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            if let Err(error) = self.listen_for_jobs(&pool, &shutdown).await {
                tracing::warn!(error.message = %error, "watching the jobs for live clients stopped; listening again");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }

    async fn listen_for_jobs(
        &self,
        pool: &PgPool,
        shutdown: &CancellationToken,
    ) -> sqlx::Result<()> {
        let mut listener = PgListener::connect_with(pool).await?;
        listener.listen(WATCH_CHANNEL).await?;
        loop {
            let notification = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                received = listener.try_recv() => received?,
            };
            let Some(notification) = notification else {
                continue;
            };
            match serde_json::from_str::<Watched>(notification.payload()) {
                Ok(watched) => self.publish_heard(LiveEvent::of_job(watched)).await,
                Err(error) => tracing::debug!(error = %error, "ignoring an unreadable job notice"),
            }
        }
    }
}

impl LiveEvent {
    /// A job retried or dead-lettered, as its processor told of it.
    fn of_job(watched: Watched) -> Self {
        Self {
            order_id: watched.order_id,
            customer_id: watched.customer_id,
            status: watched.status,
            reason: Some(watched.reason),
            lane: String::new(),
            processed_by: None,
            at: Utc::now(),
            client: None,
        }
    }
}
