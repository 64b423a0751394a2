//! The work queue on Postgres (`WORK_QUEUE=postgres`): the orders' messages
//! as rows of the `jobs` table, written in each order's own transaction and
//! announced with `NOTIFY`, instead of messages on RabbitMQ's work queues.
//!
//! A processor claims a batch with `FOR UPDATE SKIP LOCKED`, express before
//! standard, oldest first, and holds it under a lease: the claim gives the
//! rows a fresh lease id and moves their `run_at` to the lease's end, which
//! a heartbeat pushes on while the batch is worked. A processor that dies or
//! hangs stops the heartbeat, and once `run_at` has passed the rows are
//! claimable again, by anyone. Only the current lease settles a row (every
//! settling statement names it), so a processor that wakes up after losing
//! its lease changes nothing here, and what it committed before is harmless
//! because the handler's steps are idempotent.
//!
//! Settling mirrors the AMQP consumer's dispositions: handled rows are
//! deleted (the table holds only what waits, runs or is dead), a retry sets
//! `run_at` to the exact moment of the next attempt, a dead letter is a row
//! in state `dead` with its reason (listed and replayed by the
//! `dead-letters` tool), and a wait for a connection puts the row back
//! without counting an attempt.
//!
//! How the processors learn of new rows, without polling busily, is in
//! [`crate::wakeup`]; the loop that claims, handles and settles is in [`run`].

use std::time::Duration;

use chrono::{DateTime, Utc};
use messaging::consumer::RetryPolicy;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

mod run;

pub use run::{JobHandler, consume};

/// The channel order-api notifies when it has written jobs, and processors
/// listen on.
pub const CHANNEL: &str = "orderflow_jobs";

/// The channel the processors tell of jobs retried or dead-lettered, for
/// the live page: each notification is a [`Watched`] as JSON.
pub const WATCH_CHANNEL: &str = "orderflow_jobs_watch";

/// The longest reason told to watchers, in characters: a notification's
/// payload must stay under 8,000 bytes.
const WATCHED_REASON_CHARS: usize = 1_000;

/// A job retried or dead-lettered, as the live page is told of it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Watched {
    pub order_id: Uuid,
    pub customer_id: String,
    /// `retrying`, `held` (dead-lettered, its order held) or
    /// `dead_lettered`.
    pub status: String,
    pub reason: String,
}

/// Claims of a job beyond its failed attempts before it is dead-lettered:
/// each such claim ended with its processor gone (killed, or hung past its
/// lease) before the job was settled, which a job that crashes its
/// processor would do for ever.
pub const MAX_LOST_LEASES: i32 = 5;

/// Where the processors' work comes from.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WorkQueue {
    /// RabbitMQ's work queues, one per lane.
    #[default]
    Rabbitmq,
    /// Postgres's `jobs` table.
    Postgres,
}

/// How a processor works the `jobs` table.
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct JobSettings {
    /// How long a claimed job stays its claimant's without a heartbeat, in
    /// ms: a processor killed or frozen holding jobs gives them up this long
    /// after its last heartbeat (sent every third of it).
    #[arg(long, env = "JOB_LEASE_MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(300..))]
    pub job_lease_ms: u64,
    /// The longest a processor waits for a `NOTIFY` before it looks for work
    /// anyway, in ms: the safety net under a notification lost while its
    /// listening connection was down.
    #[arg(long, env = "JOB_POLL_MS", default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(10..))]
    pub job_poll_ms: u64,
}

/// One claimed job: an order's message, under the claimant's lease.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: i64,
    pub order_id: Uuid,
    pub message_id: Uuid,
    pub lane: String,
    /// The message: an `OrderPlaced`, as JSON.
    pub body: String,
    pub correlation_id: String,
    /// Failed attempts before this claim.
    pub attempts: i32,
    /// Claims so far, this one included; a claim put back without an
    /// attempt is not counted.
    pub claims: i32,
    /// The lease this claim holds it under.
    pub lease: Uuid,
}

impl Job {
    /// Claims that ended with the job unsettled: its processor was gone.
    pub fn lost_leases(&self) -> i32 {
        self.claims - 1 - self.attempts
    }
}

/// A job dead-lettered, as people see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadJob {
    pub order_id: Uuid,
    pub message_id: Uuid,
    pub attempts: i32,
    pub reason: String,
}

/// The `jobs` table, as one processor uses it.
#[derive(Clone)]
pub struct JobQueue {
    pool: PgPool,
    /// Named on the rows it claims (`leased_by`).
    claimant: String,
    lease: Duration,
    retry: RetryPolicy,
}

/// Seconds, as Postgres's `make_interval` takes them.
fn seconds(duration: Duration) -> f64 {
    duration.as_secs_f64()
}

impl JobQueue {
    pub fn new(pool: PgPool, claimant: String, lease: Duration, retry: RetryPolicy) -> Self {
        Self {
            pool,
            claimant,
            lease,
            retry,
        }
    }

    /// The lease a claim holds its jobs under.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// Claim up to `limit` jobs that are due, express first, then the
    /// oldest: available ones whose time has come, and running ones whose
    /// lease has run out.
    pub async fn claim(&self, limit: u16) -> sqlx::Result<Vec<Job>> {
        let lease = Uuid::new_v4();
        let mut jobs = sqlx::query_as!(
            Job,
            r#"WITH due AS (
                 SELECT id FROM jobs
                 WHERE state <> 'dead' AND run_at <= now()
                 ORDER BY priority, run_at, id
                 LIMIT $1
                 FOR UPDATE SKIP LOCKED)
               UPDATE jobs j
               SET state = 'running', run_at = now() + make_interval(secs => $2),
                   lease = $3, leased_by = $4, claims = j.claims + 1
               FROM due WHERE j.id = due.id
               RETURNING j.id, j.order_id, j.message_id, j.lane, j.body::text AS "body!",
                         j.correlation_id, j.attempts, j.claims, j.lease AS "lease!""#,
            i64::from(limit),
            seconds(self.lease),
            lease,
            self.claimant,
        )
        .fetch_all(&self.pool)
        .await?;
        jobs.sort_by_key(|job| (job.lane != "express", job.id));
        Ok(jobs)
    }

    /// When the next job falls due (a retry's time, a lease's end), if any
    /// is waiting or running.
    pub async fn next_due(&self) -> sqlx::Result<Option<DateTime<Utc>>> {
        sqlx::query_scalar!("SELECT min(run_at) FROM jobs WHERE state <> 'dead'")
            .fetch_one(&self.pool)
            .await
    }

    /// Push on the lease of the jobs still held under `lease`; how many.
    pub async fn heartbeat(&self, lease: Uuid) -> sqlx::Result<u64> {
        let renewed = sqlx::query!(
            r#"UPDATE jobs SET run_at = now() + make_interval(secs => $2)
               WHERE lease = $1 AND state = 'running'"#,
            lease,
            seconds(self.lease),
        )
        .execute(&self.pool)
        .await?;
        Ok(renewed.rows_affected())
    }

    /// Delete handled jobs held under `lease`: the ids deleted. A job missing
    /// from the answer had lost its lease to another processor.
    pub async fn finish(&self, lease: Uuid, ids: &[i64]) -> sqlx::Result<Vec<i64>> {
        sqlx::query_scalar!(
            "DELETE FROM jobs WHERE id = ANY($1) AND lease = $2 RETURNING id",
            ids,
            lease,
        )
        .fetch_all(&self.pool)
        .await
    }

    /// Put a failed job back for its next attempt, at the exact time the
    /// retry policy gives; `false` if its lease was lost.
    pub async fn retry(&self, job: &Job, reason: &str) -> sqlx::Result<bool> {
        self.release(job, self.retry_delay(job), 1, reason).await
    }

    /// Put a job back without counting an attempt (it waited for a
    /// connection), due again after `pause`; `false` if its lease was lost.
    /// Its claim is given back too: it ended settled, so it must not count
    /// towards [`MAX_LOST_LEASES`].
    pub async fn put_back(&self, job: &Job, pause: Duration, reason: &str) -> sqlx::Result<bool> {
        self.release(job, pause, 0, reason).await
    }

    /// Make a claimed job available again after `after`, counting
    /// `attempts` (1 or 0) failed attempts; a claim that counts none is
    /// given back, so that [`Job::lost_leases`] counts only the claims whose
    /// processor was gone.
    async fn release(
        &self,
        job: &Job,
        after: Duration,
        attempts: i32,
        reason: &str,
    ) -> sqlx::Result<bool> {
        let released = sqlx::query!(
            r#"UPDATE jobs
               SET state = 'available', run_at = now() + make_interval(secs => $3),
                   attempts = attempts + $4, claims = claims - 1 + $4, reason = $5, lease = NULL
               WHERE id = $1 AND lease = $2"#,
            job.id,
            job.lease,
            seconds(after),
            attempts,
            reason,
        )
        .execute(&self.pool)
        .await?;
        Ok(released.rows_affected() == 1)
    }

    /// How long a job that failed now waits before its next attempt.
    pub fn retry_delay(&self, job: &Job) -> Duration {
        self.retry
            .delay(u32::try_from(job.attempts + 1).unwrap_or(u32::MAX))
    }

    /// Tell the live page's watchers (see [`WATCH_CHANNEL`]) that `job` was
    /// settled as `status`, with `reason`; a failure to tell is only logged.
    pub async fn tell_watchers(&self, job: &Job, status: &str, reason: &str) {
        let customer_id = serde_json::from_str::<serde_json::Value>(&job.body)
            .ok()
            .and_then(|body| Some(body.get("customer_id")?.as_str()?.to_owned()))
            .unwrap_or_default();
        let watched = Watched {
            order_id: job.order_id,
            customer_id,
            status: status.to_owned(),
            reason: reason.chars().take(WATCHED_REASON_CHARS).collect(),
        };
        let Ok(payload) = serde_json::to_string(&watched) else {
            return;
        };
        if let Err(error) = sqlx::query!("SELECT pg_notify($1, $2)", WATCH_CHANNEL, payload)
            .execute(&self.pool)
            .await
        {
            tracing::debug!(error.message = %error, "could not tell the watchers of a job");
        }
    }

    /// Whether a job that failed now has used up its attempts.
    pub fn exhausted(&self, job: &Job) -> bool {
        u32::try_from(job.attempts + 1).unwrap_or(u32::MAX) >= self.retry.max_attempts
    }

    /// Dead-letter a job, with the reason, counting this attempt if it
    /// failed; `false` if its lease was lost.
    pub async fn bury(&self, job: &Job, failed: bool, reason: &str) -> sqlx::Result<bool> {
        let buried = sqlx::query!(
            r#"UPDATE jobs SET state = 'dead', attempts = attempts + $3, reason = $4, lease = NULL
               WHERE id = $1 AND lease = $2"#,
            job.id,
            job.lease,
            i32::from(failed),
            reason,
        )
        .execute(&self.pool)
        .await?;
        Ok(buried.rows_affected() == 1)
    }
}

/// Tell the listening processors that jobs were written, inside the
/// transaction that wrote them: the notification is sent when it commits,
/// and one per transaction at most (Postgres folds identical ones), however
/// many jobs it wrote.
pub async fn notify(conn: &mut PgConnection) -> sqlx::Result<()> {
    sqlx::query!("SELECT pg_notify($1, '')", CHANNEL)
        .execute(conn)
        .await?;
    Ok(())
}

/// How many jobs are in each lane and state, and how many processors hold
/// them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Depth {
    pub lane: String,
    pub state: String,
    pub jobs: i64,
    pub claimants: i64,
}

/// The jobs table's depths, by lane and state.
pub async fn depths(pool: &PgPool) -> sqlx::Result<Vec<Depth>> {
    sqlx::query_as!(
        Depth,
        r#"SELECT lane AS "lane!", state AS "state!", count(*) AS "jobs!",
                  count(DISTINCT leased_by) FILTER (WHERE state = 'running') AS "claimants!"
           FROM jobs GROUP BY lane, state ORDER BY lane, state"#,
    )
    .fetch_all(pool)
    .await
}

/// The dead jobs, oldest first.
pub async fn dead(pool: &PgPool) -> sqlx::Result<Vec<DeadJob>> {
    sqlx::query_as!(
        DeadJob,
        r#"SELECT order_id, message_id, attempts, coalesce(reason, 'unknown') AS "reason!"
           FROM jobs WHERE state = 'dead' ORDER BY id"#,
    )
    .fetch_all(pool)
    .await
}

/// Replay dead jobs (the one with `message_id`, or all of them when
/// `None`): each is due now with its attempts reset, and its held order is
/// accepted again, in one transaction that notifies the processors; the
/// jobs replayed, as they were. A job keeps its message id, so one that had
/// in fact been handled is skipped by the processor's dedupe.
pub async fn replay(pool: &PgPool, message_id: Option<Uuid>) -> sqlx::Result<Vec<DeadJob>> {
    let mut tx = pool.begin().await?;
    let replayed = sqlx::query_as!(
        DeadJob,
        r#"WITH dead AS (
             SELECT id, attempts, reason FROM jobs
             WHERE state = 'dead' AND ($1::uuid IS NULL OR message_id = $1)
             FOR UPDATE),
           replayed AS (
             UPDATE jobs j SET state = 'available', run_at = now(), attempts = 0, claims = 0,
                               reason = NULL, lease = NULL, leased_by = NULL
             FROM dead WHERE j.id = dead.id
             RETURNING j.order_id, j.message_id, dead.attempts, dead.reason),
           moved AS (
             UPDATE orders SET status = 'accepted', reason = NULL, updated_at = now()
             WHERE id IN (SELECT order_id FROM replayed) AND status = 'held'
             RETURNING id),
           history AS (
             INSERT INTO order_status_history (order_id, status, detail, service)
             SELECT id, 'accepted', 'replayed from the dead letters', 'dead-letters' FROM moved)
           SELECT order_id AS "order_id!", message_id AS "message_id!", attempts AS "attempts!",
                  coalesce(reason, 'unknown') AS "reason!"
           FROM replayed"#,
        message_id,
    )
    .fetch_all(&mut *tx)
    .await?;
    if !replayed.is_empty() {
        notify(&mut tx).await?;
    }
    tx.commit().await?;
    Ok(replayed)
}
