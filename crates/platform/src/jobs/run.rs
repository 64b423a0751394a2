//! The claiming loop: a few tasks each claim a batch of due jobs, hand it to
//! the handler while a heartbeat keeps the lease, and settle each job by its
//! disposition; with nothing due, a task sleeps until it is woken by a
//! notification, the next job falls due, or the safety poll comes round.

use std::{future::Future, pin::pin, sync::Arc, time::Duration};

use messaging::consumer::{Batching, Disposition};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{CHANNEL, Job, JobQueue, MAX_LOST_LEASES};
use crate::wakeup;

/// How long a job that waited for a database connection stays put before
/// it is due again.
const WAIT_PAUSE: Duration = Duration::from_secs(1);

/// The shortest sleep of a task that found nothing to claim: a due job it
/// could not claim is locked by another claim, which moves it on in a moment.
const MIN_PAUSE: Duration = Duration::from_millis(20);

/// What a consumer of the `jobs` table does with the jobs it claims.
pub trait JobHandler {
    /// Handle jobs claimed together: one disposition per job, in their
    /// order, as the AMQP consumer's handler answers for deliveries.
    fn handle_jobs(&self, jobs: &[Job]) -> impl Future<Output = Vec<Disposition>>;

    /// The job is about to be dead-lettered for `reason`: record it where
    /// its subject is read from (the processor holds the order).
    fn dead_lettering(&self, job: &Job, reason: &str) -> impl Future<Output = bool>;
}

/// Claim and handle jobs until `shutdown`: `batching.batches` batches of at
/// most `batching.batch_size` jobs at once; the jobs in hand when it comes
/// are finished and settled first.
pub async fn consume<H: JobHandler>(
    queue: JobQueue,
    pool: sqlx::PgPool,
    batching: Batching,
    poll: Duration,
    shutdown: CancellationToken,
    handler: H,
) {
    let wake = Arc::new(Notify::new());
    let listening = tokio::spawn(wakeup::listen(
        pool,
        CHANNEL,
        wake.clone(),
        shutdown.child_token(),
    ));
    tracing::info!(
        batches = batching.batches,
        batch_size = batching.batch_size,
        lease = ?queue.lease(),
        "ready: claiming jobs from Postgres"
    );
    let tasks = (0..batching.batches).map(|_| {
        claiming(
            &queue,
            &handler,
            &wake,
            batching.batch_size,
            poll,
            &shutdown,
        )
    });
    futures_util::future::join_all(tasks).await;
    let _ = listening.await;
}

/// One claiming task.
async fn claiming<H: JobHandler>(
    queue: &JobQueue,
    handler: &H,
    wake: &Notify,
    batch_size: u16,
    poll: Duration,
    shutdown: &CancellationToken,
) {
    while !shutdown.is_cancelled() {
        // Registered before the claim, so a notification sent while it
        // runs is not missed.
        let mut woken = pin!(wake.notified());
        woken.as_mut().enable();
        match queue.claim(batch_size).await {
            Ok(jobs) if !jobs.is_empty() => {
                work(queue, handler, jobs).await;
                continue;
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(error.message = %error, "could not claim jobs; trying again");
            }
        }
        let pause = match queue.next_due().await {
            Ok(Some(due)) => (due - chrono::Utc::now())
                .to_std()
                .unwrap_or_default()
                .clamp(MIN_PAUSE, poll),
            Ok(None) | Err(_) => poll,
        };
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = woken => {}
            () = tokio::time::sleep(pause) => {}
        }
    }
}

/// Handle one claimed batch under its lease, then settle it.
async fn work<H: JobHandler>(queue: &JobQueue, handler: &H, jobs: Vec<Job>) {
    let lease = jobs[0].lease;
    let (worn, jobs): (Vec<Job>, Vec<Job>) = jobs
        .into_iter()
        .partition(|job| job.lost_leases() >= MAX_LOST_LEASES);
    for job in &worn {
        let reason = format!(
            "claimed {} times by processors that were gone before settling it",
            job.claims
        );
        dead_letter(queue, handler, job, false, &reason).await;
    }
    if jobs.is_empty() {
        return;
    }
    let mut handling = pin!(handler.handle_jobs(&jobs));
    let mut heartbeat = tokio::time::interval(queue.lease() / 3);
    heartbeat.tick().await;
    let dispositions = loop {
        tokio::select! {
            dispositions = &mut handling => break dispositions,
            _ = heartbeat.tick() => {
                if let Err(error) = queue.heartbeat(lease).await {
                    tracing::warn!(error.message = %error, "could not renew the lease of the jobs in hand");
                }
            }
        }
    };
    let mut handled = Vec::new();
    for (job, disposition) in jobs.iter().zip(dispositions) {
        match disposition {
            Disposition::Ack => handled.push(job.id),
            Disposition::Retry { reason } if queue.exhausted(job) => {
                let reason = format!("gave up after {} attempts: {reason}", job.attempts + 1);
                dead_letter(queue, handler, job, true, &reason).await;
            }
            Disposition::Retry { reason } => {
                if settled(job, queue.retry(job, &reason).await) {
                    metrics::counter!("messages_retried_total", "queue" => "jobs").increment(1);
                    let delay = queue.retry_delay(job);
                    tracing::warn!(
                        job = job.id, order_id = %job.order_id, attempt = job.attempts + 1,
                        reason = %reason, "processing failed; the job is retried in {delay:?}"
                    );
                    let told = format!(
                        "attempt {} on the jobs table failed; retrying in {} ms",
                        job.attempts + 1,
                        delay.as_millis()
                    );
                    queue.tell_watchers(job, "retrying", &told).await;
                }
            }
            Disposition::DeadLetter { reason } => {
                dead_letter(queue, handler, job, false, &reason).await;
            }
            Disposition::Wait { reason } => {
                if settled(job, queue.put_back(job, WAIT_PAUSE, &reason).await) {
                    tracing::info!(job = job.id, reason = %reason, "the job waits");
                }
            }
        }
    }
    if handled.is_empty() {
        return;
    }
    match queue.finish(lease, &handled).await {
        Ok(finished) if finished.len() == handled.len() => {}
        Ok(finished) => {
            for id in handled.iter().filter(|id| !finished.contains(id)) {
                tracing::warn!(
                    job = id,
                    "the job's lease was lost before it was settled: another processor has it, \
                     and the handler's dedupe makes that run harmless"
                );
            }
        }
        Err(error) => tracing::warn!(
            error.message = %error,
            "could not delete the handled jobs; they are claimed again once their lease runs out, \
             and skipped as duplicates"
        ),
    }
}

/// Dead-letter a job: its subject recorded first, then its row buried.
async fn dead_letter<H: JobHandler>(
    queue: &JobQueue,
    handler: &H,
    job: &Job,
    failed: bool,
    reason: &str,
) {
    let held = handler.dead_lettering(job, reason).await;
    if settled(job, queue.bury(job, failed, reason).await) {
        metrics::counter!("messages_dead_lettered_total", "queue" => "jobs").increment(1);
        tracing::error!(job = job.id, order_id = %job.order_id, reason = %reason, "job dead-lettered");
        let status = if held { "held" } else { "dead_lettered" };
        let told = format!(
            "{reason} (after {} attempts on the jobs table)",
            job.attempts + i32::from(failed)
        );
        queue.tell_watchers(job, status, &told).await;
    }
}

/// Whether a settling statement settled the job; a warning when the lease
/// was lost or the statement failed.
fn settled(job: &Job, result: sqlx::Result<bool>) -> bool {
    match result {
        Ok(true) => return true,
        Ok(false) => tracing::warn!(
            job = job.id,
            "the job's lease was lost before it was settled: another processor has it"
        ),
        Err(error) => tracing::warn!(
            job = job.id, error.message = %error,
            "could not settle the job; it is claimed again once its lease runs out"
        ),
    }
    false
}
