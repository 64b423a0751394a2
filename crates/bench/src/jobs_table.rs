//! The `jobs` table of `WORK_QUEUE=postgres` under a long stream of jobs:
//! whether its size stays bounded, and what the jobs' `NOTIFY` costs a
//! commit. No service runs: the jobs go through [`platform::jobs::JobQueue`]
//! itself (the processors' claim and delete) on a private database migrated
//! as orderflow's, so the table, its indexes and its autovacuum settings are
//! the real ones.

use std::time::{Duration, Instant};

use anyhow::Context;
use messaging::consumer::RetryPolicy;
use platform::jobs::{self, JobQueue};
use serde::Serialize;
use sqlx::{PgPool, postgres::PgListener, postgres::PgPoolOptions};
use uuid::Uuid;

use crate::system::{Environment, ScratchDatabase};

/// Jobs written, claimed and deleted at once: the processors' BATCH_SIZE
/// default, and about what one of order-api's group commits writes.
const BATCH: u16 = 10;
/// Claimants working the table at once, each writing its own jobs first.
const WORKERS: usize = 4;

/// How big the table is, and what Postgres's statistics say of it.
#[derive(Debug, Clone, Serialize)]
pub struct TableSize {
    /// `pg_total_relation_size`: the table, its indexes and TOAST.
    pub total_bytes: i64,
    /// `pg_relation_size` of the table alone.
    pub table_bytes: i64,
    /// `pg_relation_size` of each index, by name.
    pub indexes: Vec<(String, i64)>,
    pub live_rows: i64,
    /// `n_dead_tup`: row versions a vacuum has still to reclaim.
    pub dead_rows: i64,
    /// Autovacuums of the table so far.
    pub autovacuums: i64,
}

impl TableSize {
    /// The `jobs` table of the database `pool` is connected to.
    pub async fn of_jobs(pool: &PgPool) -> anyhow::Result<Self> {
        let table = sqlx::query!(
            r#"SELECT pg_total_relation_size(relid) AS "total!",
                      pg_relation_size(relid) AS "table!",
                      n_live_tup AS "live!", n_dead_tup AS "dead!",
                      autovacuum_count AS "autovacuums!"
               FROM pg_stat_user_tables WHERE relid = 'jobs'::regclass"#
        )
        .fetch_one(pool)
        .await
        .context("reading the jobs table's size")?;
        let indexes = sqlx::query!(
            r#"SELECT c.relname::text AS "name!", pg_relation_size(c.oid) AS "bytes!"
               FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
               WHERE i.indrelid = 'jobs'::regclass ORDER BY c.relname"#
        )
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(|index| (index.name, index.bytes))
        .collect();
        Ok(Self {
            total_bytes: table.total,
            table_bytes: table.table,
            indexes,
            live_rows: table.live,
            dead_rows: table.dead,
            autovacuums: table.autovacuums,
        })
    }
}

/// The table's size after so many jobs went through it.
#[derive(Debug, Serialize)]
pub struct Reading {
    pub jobs_done: u64,
    pub size: TableSize,
}

/// The autovacuum settings the `jobs` table runs under.
#[derive(Debug, Serialize)]
pub struct Autovacuum {
    /// The table's own storage parameters (set by its migration).
    pub table_options: Vec<String>,
    /// The server's `autovacuum`, `autovacuum_naptime`,
    /// `autovacuum_vacuum_cost_delay` and `autovacuum_vacuum_cost_limit`.
    pub server: Vec<(String, String)>,
}

impl Autovacuum {
    /// Whether the server runs autovacuum at all: without it the table's
    /// own settings take no effect.
    pub fn server_runs_it(&self) -> bool {
        self.server
            .iter()
            .any(|(name, value)| name == "autovacuum" && value == "on")
    }

    async fn of_jobs(pool: &PgPool) -> anyhow::Result<Self> {
        let settings = sqlx::query!(
            r#"SELECT coalesce(reloptions, '{}') AS "options!",
                      current_setting('autovacuum') AS "autovacuum!",
                      current_setting('autovacuum_naptime') AS "naptime!",
                      current_setting('autovacuum_vacuum_cost_delay') AS "cost_delay!",
                      current_setting('autovacuum_vacuum_cost_limit') AS "cost_limit!"
               FROM pg_class WHERE oid = 'jobs'::regclass"#
        )
        .fetch_one(pool)
        .await?;
        Ok(Self {
            table_options: settings.options,
            server: vec![
                ("autovacuum".into(), settings.autovacuum),
                ("autovacuum_naptime".into(), settings.naptime),
                ("autovacuum_vacuum_cost_delay".into(), settings.cost_delay),
                ("autovacuum_vacuum_cost_limit".into(), settings.cost_limit),
            ],
        })
    }
}

/// Commits per second of one-job transactions, with and without the jobs'
/// `NOTIFY` (a processor listening), at the services' pool size.
#[derive(Debug, Serialize)]
pub struct NotifyCost {
    pub clients: usize,
    pub seconds_each: f64,
    pub without_notify_per_s: f64,
    pub with_notify_per_s: f64,
}

/// A stream of jobs through the table, and what it left behind.
#[derive(Debug, Serialize)]
pub struct JobsTableRun {
    /// The server's host and port.
    pub server: String,
    pub jobs: u64,
    pub batch: u16,
    pub workers: usize,
    /// Jobs written, claimed and deleted per second over the whole stream.
    pub per_s: f64,
    pub autovacuum: Autovacuum,
    /// Every `report_every` jobs, and at the end.
    pub readings: Vec<Reading>,
    pub notify: NotifyCost,
}

/// Push `total` jobs through a fresh `jobs` table, reading its size every
/// `report_every`; then time one-job commits with and without `NOTIFY` for
/// `notify_time` each.
pub async fn run(
    environment: &Environment,
    total: u64,
    report_every: u64,
    notify_time: Duration,
    clients: usize,
) -> anyhow::Result<JobsTableRun> {
    let database = ScratchDatabase::create(environment, "jobs").await?;
    let measured = measure(&database, total, report_every, notify_time, clients).await;
    database.drop().await?;
    let server = environment.postgres_url.rsplit('@').next().unwrap_or("?");
    Ok(JobsTableRun {
        server: server.to_owned(),
        ..measured?
    })
}

async fn measure(
    database: &ScratchDatabase,
    total: u64,
    report_every: u64,
    notify_time: Duration,
    clients: usize,
) -> anyhow::Result<JobsTableRun> {
    let pool = PgPoolOptions::new()
        .max_connections(WORKERS as u32 + clients as u32 + 2)
        .connect(&database.url)
        .await?;
    platform::db::MIGRATOR.run(&pool).await?;
    let orders = orders(&pool, WORKERS.max(clients)).await?;
    let body = crate::sample_payload();
    let autovacuum = Autovacuum::of_jobs(&pool).await?;

    let started = Instant::now();
    let mut readings = Vec::new();
    let mut done = 0;
    while done < total {
        let round = report_every.min(total - done);
        stream(&pool, &orders, &body, round).await?;
        done += round;
        let size = TableSize::of_jobs(&pool).await?;
        eprintln!(
            "  {done} jobs: {} total, {} table, dead rows {}, autovacuums {}",
            crate::units::human_bytes(size.total_bytes),
            crate::units::human_bytes(size.table_bytes),
            size.dead_rows,
            size.autovacuums
        );
        readings.push(Reading {
            jobs_done: done,
            size,
        });
    }
    let per_s = total as f64 / started.elapsed().as_secs_f64().max(f64::EPSILON);
    let notify = notify_cost(&pool, &database.url, &orders[..clients], &body, notify_time).await?;
    pool.close().await;
    Ok(JobsTableRun {
        server: String::new(),
        jobs: total,
        batch: BATCH,
        workers: WORKERS,
        per_s,
        autovacuum,
        readings,
        notify,
    })
}

/// `count` orders for the jobs to name, one per writing connection: the
/// table's foreign key needs an order, and nothing stops many jobs from
/// naming the same one, but writers sharing one would queue on its row's
/// key-share lock.
async fn orders(pool: &PgPool, count: usize) -> anyhow::Result<Vec<Uuid>> {
    let ids: Vec<Uuid> = (0..count).map(|_| Uuid::new_v4()).collect();
    sqlx::query!(
        r#"INSERT INTO orders (id, customer_id, email, items, total_cents, currency, lane,
                               status, correlation_id)
           SELECT id, 'bench', 'bench@example.com', '[]', 0, 'EUR', 'standard', 'accepted',
                  'bench'
           FROM unnest($1::uuid[]) AS o(id)"#,
        &ids
    )
    .execute(pool)
    .await?;
    Ok(ids)
}

/// `count` new jobs, `BATCH` to a transaction with its `NOTIFY` as
/// order-api writes them, or without.
async fn write_jobs(
    pool: &PgPool,
    order_id: Uuid,
    body: &serde_json::Value,
    count: u16,
    notify: bool,
) -> anyhow::Result<()> {
    let message_ids: Vec<Uuid> = (0..count).map(|_| Uuid::new_v4()).collect();
    let mut tx = pool.begin().await?;
    sqlx::query!(
        r#"INSERT INTO jobs (order_id, message_id, lane, body, correlation_id)
           SELECT $1, message_id, 'standard', $2, 'bench' FROM unnest($3::uuid[]) AS m(message_id)"#,
        order_id,
        body,
        &message_ids,
    )
    .execute(&mut *tx)
    .await?;
    if notify {
        jobs::notify(&mut tx).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// `count` jobs through the table: `WORKERS` claimants each write a batch,
/// claim a batch (anyone's) and delete it, until their share is done; then
/// whatever a claim skipped is claimed and deleted too, so the table ends
/// empty of live jobs.
async fn stream(
    pool: &PgPool,
    orders: &[Uuid],
    body: &serde_json::Value,
    count: u64,
) -> anyhow::Result<()> {
    let batches = count.div_ceil(u64::from(BATCH));
    let workers = (0..WORKERS as u64).map(|worker| {
        let queue = queue(pool, worker);
        let order_id = orders[worker as usize];
        let share = batches / WORKERS as u64 + u64::from(worker < batches % WORKERS as u64);
        async move {
            for _ in 0..share {
                write_jobs(pool, order_id, body, BATCH, true).await?;
                settle(&queue, BATCH).await?;
            }
            anyhow::Ok(())
        }
    });
    futures_util::future::try_join_all(workers).await?;
    let sweeper = queue(pool, WORKERS as u64);
    while settle(&sweeper, 100).await? > 0 {}
    Ok(())
}

/// A claimant as a processor makes it.
fn queue(pool: &PgPool, worker: u64) -> JobQueue {
    let retry = RetryPolicy {
        max_attempts: 5,
        initial_delay: Duration::from_secs(1),
        max_delay: Duration::from_secs(60),
        max_wait: Duration::from_secs(60),
    };
    JobQueue::new(
        pool.clone(),
        format!("bench-{worker}"),
        Duration::from_secs(30),
        retry,
    )
}

/// Claim up to `limit` due jobs and delete them as handled: how many.
async fn settle(queue: &JobQueue, limit: u16) -> anyhow::Result<usize> {
    let claimed = queue.claim(limit).await?;
    let Some(lease) = claimed.first().map(|job| job.lease) else {
        return Ok(0);
    };
    let ids: Vec<i64> = claimed.iter().map(|job| job.id).collect();
    queue.finish(lease, &ids).await?;
    Ok(ids.len())
}

/// `clients` connections committing one job each per transaction, as fast
/// as they go, alternately with and without the `NOTIFY`, while a
/// connection listens on the channel as a processor would. The slices
/// alternate so that both see the table at about the same size.
async fn notify_cost(
    pool: &PgPool,
    url: &str,
    orders: &[Uuid],
    body: &serde_json::Value,
    each: Duration,
) -> anyhow::Result<NotifyCost> {
    let clients = orders.len();
    let mut listener = PgListener::connect(url).await?;
    listener.listen(jobs::CHANNEL).await?;
    let listening = tokio::spawn(async move { while listener.recv().await.is_ok() {} });
    let slice = each / 2;
    let (mut with, mut without) = (0, 0);
    for notify in [false, true, false, true] {
        let deadline = Instant::now() + slice;
        let commits = orders.iter().map(|&order_id| async move {
            let mut commits = 0u64;
            while Instant::now() < deadline {
                write_jobs(pool, order_id, body, 1, notify).await?;
                commits += 1;
            }
            anyhow::Ok(commits)
        });
        let commits: u64 = futures_util::future::try_join_all(commits)
            .await?
            .iter()
            .sum();
        *(if notify { &mut with } else { &mut without }) += commits;
    }
    listening.abort();
    let seconds = each.as_secs_f64();
    let cost = NotifyCost {
        clients,
        seconds_each: seconds,
        without_notify_per_s: without as f64 / seconds,
        with_notify_per_s: with as f64 / seconds,
    };
    eprintln!(
        "  one-job commits, {clients} clients: {:.0}/s without NOTIFY, {:.0}/s with",
        cost.without_notify_per_s, cost.with_notify_per_s
    );
    Ok(cost)
}
