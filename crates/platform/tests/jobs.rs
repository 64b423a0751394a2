//! The `jobs` table's guarantees, with [`JobQueue`] against a real Postgres
//! (a fresh database per test): the claim order, no job in two claims at
//! once, the lease that fences a claimant once it has run out, the exact
//! retry delays and attempt counting, dead jobs, and their replay.

use std::time::Duration;

use chrono::{DateTime, Utc};
use messaging::consumer::RetryPolicy;
use platform::jobs::{self, DeadJob, Job, JobQueue};
use sqlx::{PgPool, postgres::PgListener};
use uuid::Uuid;

/// A lease no test outlives.
const LONG: Duration = Duration::from_secs(600);

/// Three attempts, 1 s before the first retry, doubling.
fn policy() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 3,
        initial_delay: Duration::from_secs(1),
        max_delay: Duration::from_secs(30),
        max_wait: Duration::ZERO,
    }
}

fn queue(pool: &PgPool, claimant: &str, lease: Duration) -> JobQueue {
    JobQueue::new(pool.clone(), claimant.to_owned(), lease, policy())
}

/// An order of `lane` in `status`: its id.
async fn order(pool: &PgPool, lane: &str, status: &str) -> Uuid {
    let id = Uuid::new_v4();
    sqlx::query!(
        "INSERT INTO orders (id, customer_id, email, items, total_cents, currency, lane, status,
                             reason, correlation_id)
         VALUES ($1, 'c-1', 'c-1@example.com', '[]', 100, 'EUR', $2, $3,
                 CASE WHEN $3 = 'held' THEN 'gave up after 3 attempts: boom' END, 'corr-1')",
        id,
        lane,
        status,
    )
    .execute(pool)
    .await
    .unwrap();
    id
}

/// A job for `order_id` on `lane`, due now: its id.
async fn job(pool: &PgPool, order_id: Uuid, lane: &str) -> i64 {
    sqlx::query_scalar!(
        "INSERT INTO jobs (order_id, message_id, lane, body, correlation_id)
         VALUES ($1, $2, $3, $4, 'corr-1') RETURNING id",
        order_id,
        Uuid::new_v4(),
        lane,
        serde_json::json!({ "order_id": order_id }),
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// An order of `lane` with its job: the job's id.
async fn order_with_job(pool: &PgPool, lane: &str) -> i64 {
    let order_id = order(pool, lane, "accepted").await;
    job(pool, order_id, lane).await
}

/// What the table holds of one job.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Row {
    state: String,
    run_at: DateTime<Utc>,
    attempts: i32,
    claims: i32,
    lease: Option<Uuid>,
    leased_by: Option<String>,
    reason: Option<String>,
}

async fn row(pool: &PgPool, id: i64) -> Row {
    sqlx::query_as!(
        Row,
        "SELECT state, run_at, attempts, claims, lease, leased_by, reason FROM jobs WHERE id = $1",
        id,
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Postgres's clock.
async fn now(pool: &PgPool) -> DateTime<Utc> {
    sqlx::query_scalar!(r#"SELECT now() AS "now!""#)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Time passes for job `id`: it is due now.
async fn make_due(pool: &PgPool, id: i64) {
    sqlx::query!("UPDATE jobs SET run_at = now() WHERE id = $1", id)
        .execute(pool)
        .await
        .unwrap();
}

/// The one job a claim of one returns.
async fn claim_one(queue: &JobQueue) -> Job {
    let mut jobs = queue.claim(1).await.unwrap();
    assert_eq!(jobs.len(), 1, "one job claimed: {jobs:?}");
    jobs.remove(0)
}

/// Run `settle` (a statement that moves job `id`'s `run_at` to `after`
/// from its own now) and check that it did: `run_at` lies `after` past a
/// moment between just before and just after it.
async fn settles_due_after<F: Future<Output = bool>>(
    pool: &PgPool,
    id: i64,
    after: Duration,
    settle: F,
) -> Row {
    let before = now(pool).await;
    assert!(settle.await, "settled under its own lease");
    let later = now(pool).await;
    let row = row(pool, id).await;
    let after = chrono::Duration::from_std(after).unwrap();
    assert!(
        before + after <= row.run_at && row.run_at <= later + after,
        "due {after} after the statement, between {} and {}: {row:?}",
        before + after,
        later + after,
    );
    row
}

#[tokio::test]
async fn claims_take_express_before_standard_then_the_longest_due() {
    let (_, pool) = test_support::fresh_database().await;
    let q = queue(&pool, "a", LONG);
    let standard: Vec<i64> = [
        order_with_job(&pool, "standard").await,
        order_with_job(&pool, "standard").await,
    ]
    .into();
    let express: Vec<i64> = [
        order_with_job(&pool, "express").await,
        order_with_job(&pool, "express").await,
    ]
    .into();
    // A retry that fell due before all of them, and one not due yet.
    let retried = order_with_job(&pool, "standard").await;
    sqlx::query!(
        "UPDATE jobs SET run_at = now() - interval '1 minute', attempts = 1 WHERE id = $1",
        retried
    )
    .execute(&pool)
    .await
    .unwrap();
    let later = order_with_job(&pool, "express").await;
    sqlx::query!(
        "UPDATE jobs SET run_at = now() + interval '1 hour' WHERE id = $1",
        later
    )
    .execute(&pool)
    .await
    .unwrap();

    let mut claimed = Vec::new();
    loop {
        let jobs = q.claim(1).await.unwrap();
        let Some(job) = jobs.first() else { break };
        claimed.push(job.id);
    }
    let expected = [express.as_slice(), &[retried], standard.as_slice()].concat();
    assert_eq!(
        claimed, expected,
        "express first (oldest first), then standard by when each fell due; the job due \
         in an hour is not claimed"
    );

    // A batch comes express first too.
    let (s, e) = (
        order_with_job(&pool, "standard").await,
        order_with_job(&pool, "express").await,
    );
    let batch: Vec<(i64, String)> = q
        .claim(10)
        .await
        .unwrap()
        .into_iter()
        .map(|job| (job.id, job.lane))
        .collect();
    assert_eq!(
        batch,
        [(e, "express".to_owned()), (s, "standard".to_owned())],
        "a batch of both lanes"
    );
}

#[tokio::test]
async fn concurrent_claimants_never_get_the_same_job() {
    let (url, _) = test_support::fresh_database().await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(&url)
        .await
        .unwrap();
    let order_id = order(&pool, "standard", "accepted").await;
    let total = sqlx::query!(
        "INSERT INTO jobs (order_id, message_id, lane, body, correlation_id)
         SELECT $1, gen_random_uuid(), CASE WHEN g % 3 = 0 THEN 'express' ELSE 'standard' END,
                '{}', 'corr-1'
         FROM generate_series(1, 300) g",
        order_id
    )
    .execute(&pool)
    .await
    .unwrap()
    .rows_affected();

    let claimants: Vec<_> = (0..6)
        .map(|i| {
            let (q, pool) = (queue(&pool, &format!("claimant-{i}"), LONG), pool.clone());
            tokio::spawn(async move {
                let mut got: Vec<Job> = Vec::new();
                loop {
                    let jobs = q.claim(7).await.unwrap();
                    if jobs.is_empty() {
                        let available = sqlx::query_scalar!(
                            r#"SELECT count(*) AS "n!" FROM jobs WHERE state = 'available'"#
                        )
                        .fetch_one(&pool)
                        .await
                        .unwrap();
                        if available == 0 {
                            return (format!("claimant-{i}"), got);
                        }
                    }
                    got.extend(jobs);
                }
            })
        })
        .collect();
    let mut by_job = std::collections::HashMap::new();
    let mut per_claimant = Vec::new();
    for claimant in claimants {
        let (name, jobs) = claimant.await.unwrap();
        per_claimant.push((name.clone(), jobs.len()));
        for job in jobs {
            by_job
                .entry(job.id)
                .or_insert_with(Vec::new)
                .push(name.clone());
        }
    }
    let twice: Vec<_> = by_job.iter().filter(|(_, who)| who.len() > 1).collect();
    assert!(twice.is_empty(), "jobs claimed twice: {twice:?}");
    assert_eq!(
        by_job.len() as u64,
        total,
        "every job claimed once; per claimant: {per_claimant:?}"
    );
    let rows = sqlx::query!(
        r#"SELECT id, state, claims, leased_by AS "leased_by!" FROM jobs WHERE leased_by IS NOT NULL"#
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let wrong: Vec<_> = rows
        .iter()
        .filter(|r| r.state != "running" || r.claims != 1 || by_job[&r.id] != [r.leased_by.clone()])
        .map(|r| (r.id, &r.state, r.claims, &r.leased_by, &by_job[&r.id]))
        .collect();
    assert_eq!(rows.len() as u64, total, "every row leased");
    assert!(
        wrong.is_empty(),
        "rows not running once under the claimant that got them \
         (id, state, claims, leased_by, claimed by): {wrong:?}"
    );
}

#[tokio::test]
async fn a_lease_that_ran_out_passes_the_job_on_and_fences_its_first_claimant() {
    let (_, pool) = test_support::fresh_database().await;
    let (a, b) = (
        queue(&pool, "a", Duration::from_millis(300)),
        queue(&pool, "b", LONG),
    );
    let id = order_with_job(&pool, "standard").await;
    let first = claim_one(&a).await;
    assert_eq!((first.id, first.claims, first.lost_leases()), (id, 1, 0));

    // a's processor hangs: no heartbeat; once the lease is over, b claims.
    let second = test_support::eventually(
        Duration::from_secs(30),
        "a's lease to run out and b to claim the job",
        || async { b.claim(1).await.unwrap().pop() },
    )
    .await;
    assert_eq!(second.id, id);
    assert_ne!(second.lease, first.lease, "a new lease");
    assert_eq!((second.claims, second.lost_leases()), (2, 1));
    let held_by_b = row(&pool, id).await;
    assert_eq!(
        (
            held_by_b.state.as_str(),
            held_by_b.lease,
            held_by_b.leased_by.as_deref()
        ),
        ("running", Some(second.lease), Some("b"))
    );

    // a wakes up: nothing it does under its old lease changes the job.
    assert_eq!(a.heartbeat(first.lease).await.unwrap(), 0, "heartbeat");
    assert_eq!(
        a.finish(first.lease, &[id]).await.unwrap(),
        Vec::<i64>::new(),
        "finish"
    );
    assert!(!a.retry(&first, "late").await.unwrap(), "retry");
    assert!(
        !a.put_back(&first, Duration::ZERO, "late").await.unwrap(),
        "put back"
    );
    assert!(!a.bury(&first, true, "late").await.unwrap(), "bury");
    assert_eq!(
        row(&pool, id).await,
        held_by_b,
        "the job as b's claim left it"
    );

    assert_eq!(b.finish(second.lease, &[id]).await.unwrap(), [id]);
    assert_eq!(
        test_support::count!(&pool, r#"SELECT count(*) AS "n!" FROM jobs"#),
        0,
        "finished by the lease holder"
    );
}

#[tokio::test]
async fn a_heartbeat_pushes_the_lease_on() {
    let (_, pool) = test_support::fresh_database().await;
    let id = order_with_job(&pool, "standard").await;
    let claimed = claim_one(&queue(&pool, "a", Duration::from_millis(300))).await;
    // The same claimant with a long lease: its heartbeat moves the lease's
    // end that far.
    let renewed = settles_due_after(&pool, id, LONG, async {
        queue(&pool, "a", LONG)
            .heartbeat(claimed.lease)
            .await
            .unwrap()
            == 1
    })
    .await;
    assert_eq!(
        (renewed.state.as_str(), renewed.lease),
        ("running", Some(claimed.lease))
    );
    assert!(
        queue(&pool, "b", LONG).claim(1).await.unwrap().is_empty(),
        "a job whose lease is renewed is nobody else's"
    );
}

#[tokio::test]
async fn a_retry_is_due_at_the_policys_delay_and_counts_the_attempt() {
    let (_, pool) = test_support::fresh_database().await;
    let q = queue(&pool, "a", LONG);
    let id = order_with_job(&pool, "standard").await;

    let first = claim_one(&q).await;
    assert_eq!(first.attempts, 0);
    assert!(!q.exhausted(&first), "attempt 1 of 3");
    let retried = settles_due_after(&pool, id, Duration::from_secs(1), async {
        q.retry(&first, "boom 1").await.unwrap()
    })
    .await;
    assert_eq!(
        (
            retried.state.as_str(),
            retried.attempts,
            retried.reason.as_deref(),
            retried.lease
        ),
        ("available", 1, Some("boom 1"), None)
    );
    assert!(q.claim(1).await.unwrap().is_empty(), "not due before then");

    make_due(&pool, id).await;
    let second = claim_one(&q).await;
    assert_eq!(
        (second.attempts, second.claims, second.lost_leases()),
        (1, 2, 0)
    );
    assert!(!q.exhausted(&second), "attempt 2 of 3");
    let retried = settles_due_after(&pool, id, Duration::from_secs(2), async {
        q.retry(&second, "boom 2").await.unwrap()
    })
    .await;
    assert_eq!(retried.attempts, 2, "the second retry waits twice as long");

    make_due(&pool, id).await;
    let third = claim_one(&q).await;
    assert_eq!(third.attempts, 2);
    assert!(q.exhausted(&third), "attempt 3 of 3 is the last");
    assert!(
        q.bury(&third, true, "gave up after 3 attempts: boom 3")
            .await
            .unwrap()
    );
    let dead = row(&pool, id).await;
    assert_eq!(
        (dead.state.as_str(), dead.attempts, dead.lease),
        ("dead", 3, None)
    );
    make_due(&pool, id).await;
    assert!(
        q.claim(1).await.unwrap().is_empty(),
        "a dead job is not claimed"
    );
    let order_id = sqlx::query_scalar!("SELECT order_id FROM jobs WHERE id = $1", id)
        .fetch_one(&pool)
        .await
        .unwrap();
    let listed = jobs::dead(&pool).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (
            listed[0].order_id,
            listed[0].attempts,
            listed[0].reason.as_str()
        ),
        (order_id, 3, "gave up after 3 attempts: boom 3")
    );
}

#[tokio::test]
async fn a_job_put_back_counts_no_attempt_and_no_lost_lease() {
    let (_, pool) = test_support::fresh_database().await;
    let q = queue(&pool, "a", LONG);
    let id = order_with_job(&pool, "standard").await;
    // Waiting for a connection again and again, more often than leases may
    // be lost.
    for _ in 0..=jobs::MAX_LOST_LEASES {
        let job = claim_one(&q).await;
        assert_eq!(
            (job.attempts, job.lost_leases()),
            (0, 0),
            "no attempt and no lost lease counted for waiting: {job:?}"
        );
        let put_back = settles_due_after(&pool, id, Duration::from_millis(500), async {
            q.put_back(&job, Duration::from_millis(500), "no connection")
                .await
                .unwrap()
        })
        .await;
        assert_eq!(
            (
                put_back.state.as_str(),
                put_back.attempts,
                put_back.reason.as_deref(),
                put_back.lease
            ),
            ("available", 0, Some("no connection"), None)
        );
        make_due(&pool, id).await;
    }
}

#[tokio::test]
async fn replaying_a_dead_job_makes_it_due_accepts_its_held_order_and_notifies() {
    let (_, pool) = test_support::fresh_database().await;
    let q = queue(&pool, "a", LONG);
    let order_id = order(&pool, "standard", "held").await;
    let id = job(&pool, order_id, "standard").await;
    for _ in 0..3 {
        let job = claim_one(&q).await;
        if q.exhausted(&job) {
            assert!(
                q.bury(&job, true, "gave up after 3 attempts: boom")
                    .await
                    .unwrap()
            );
        } else {
            assert!(q.retry(&job, "boom").await.unwrap());
            make_due(&pool, id).await;
        }
    }
    assert_eq!(row(&pool, id).await.state, "dead");
    // Another dead job, which a replay of the first leaves dead.
    let other = order_with_job(&pool, "standard").await;
    sqlx::query!(
        "UPDATE jobs SET state = 'dead', reason = 'poison' WHERE id = $1",
        other
    )
    .execute(&pool)
    .await
    .unwrap();
    let message_id = sqlx::query_scalar!("SELECT message_id FROM jobs WHERE id = $1", id)
        .fetch_one(&pool)
        .await
        .unwrap();
    let mut listener = PgListener::connect_with(&pool).await.unwrap();
    listener.listen(jobs::CHANNEL).await.unwrap();

    assert!(
        jobs::replay(&pool, Some(Uuid::new_v4()))
            .await
            .unwrap()
            .is_empty(),
        "no dead job with that message id"
    );
    let replayed = jobs::replay(&pool, Some(message_id)).await.unwrap();
    assert_eq!(
        replayed,
        [DeadJob {
            order_id,
            message_id,
            attempts: 3,
            reason: "gave up after 3 attempts: boom".into(),
        }],
        "the dead job, as it was"
    );
    let notified = tokio::time::timeout(Duration::from_secs(10), listener.recv())
        .await
        .expect("a notification within 10 s")
        .unwrap();
    assert_eq!(notified.channel(), jobs::CHANNEL);

    let replayed_row = row(&pool, id).await;
    assert_eq!(
        (
            replayed_row.state.as_str(),
            replayed_row.attempts,
            replayed_row.claims,
            replayed_row.lease,
            replayed_row.reason.as_deref()
        ),
        ("available", 0, 0, None, None)
    );
    assert!(replayed_row.run_at <= now(&pool).await, "due now");
    let order = sqlx::query!(
        r#"SELECT status, reason, (SELECT count(*) FROM order_status_history h
             WHERE h.order_id = o.id AND h.status = 'accepted' AND h.service = 'dead-letters')
             AS "replays!"
           FROM orders o WHERE id = $1"#,
        order_id
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (order.status.as_str(), order.reason, order.replays),
        ("accepted", None, 1),
        "the held order is accepted again, with a line of history"
    );
    assert_eq!(
        jobs::dead(&pool)
            .await
            .unwrap()
            .iter()
            .map(|d| d.reason.as_str())
            .collect::<Vec<_>>(),
        ["poison"],
        "only the job replayed left the dead"
    );
    let claimed: Vec<i64> = q.claim(10).await.unwrap().iter().map(|j| j.id).collect();
    assert_eq!(claimed, [id], "the replayed job is claimed again");
}
