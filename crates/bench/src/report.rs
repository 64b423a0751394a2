//! What a benchmark run measured, and how it is written down: RESULTS.md,
//! results.json, burst.csv and the summary table printed at the end. The
//! stages run on both transports carry theirs in each row, and RESULTS.md
//! sets the two side by side.

use std::fmt::Write;

use loadgen::{Completion, Percentiles, Posted};
use serde::Serialize;

use crate::{
    before,
    cpu::Usage,
    jobs_table::{JobsTableRun, TableSize},
    raw::Throughput,
    system::{Environment, Notifications, Shape, Transport},
    units::{human_bytes, mib},
};

#[derive(Debug, Serialize)]
pub struct Results {
    pub quick: bool,
    pub started_at: String,
    pub took_s: f64,
    pub command: String,
    pub machine: Machine,
    pub raw: Raw,
    pub http: Vec<HttpRun>,
    pub reference: Reference,
    /// Both transports, taking turns.
    pub scaling: Vec<ScalingRun>,
    /// One per transport.
    pub bursts: Vec<Burst>,
    pub express: Express,
    /// One per transport.
    pub low_load: Vec<LowLoad>,
    pub processor_stage: ProcessorStage,
    pub jobs_table: JobsTableRun,
    /// Of both bursts' services.
    pub memory: Vec<Memory>,
}

/// A backlog drained by two processors with no payment latency: what the
/// processor stage costs per order.
#[derive(Debug, Serialize)]
pub struct ProcessorStage {
    pub orders: u64,
    /// Every order was final before the deadline.
    pub finished: bool,
    pub drained_per_s: f64,
    /// One final status per order, each message handled once.
    pub exactly_once: bool,
    /// What orderflow's database did per order over the drain.
    pub orderflow_database: PerOrder,
    /// The same in the provider's database.
    pub provider_database: PerOrder,
    /// Over the drain only.
    pub cpu: Usage,
}

/// What one database did per order.
#[derive(Debug, Serialize)]
pub struct PerOrder {
    /// Transactions committed (every statement outside a transaction is
    /// one).
    pub commits: f64,
    /// Rows inserted, updated and deleted.
    pub rows_written: f64,
    /// Statements run (round trips; `BEGIN` and `COMMIT` count), where the
    /// server keeps `pg_stat_statements`.
    pub statements: Option<f64>,
}

impl std::fmt::Display for PerOrder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.2} commits, {:.1} rows written",
            self.commits, self.rows_written
        )?;
        match self.statements {
            Some(statements) => write!(f, ", {statements:.1} statements"),
            None => write!(f, " (statements: no pg_stat_statements)"),
        }
    }
}

impl ProcessorStage {
    /// orderflow's Postgres CPU per order (the provider's database apart).
    pub fn postgres_ms_per_order(&self) -> f64 {
        self.cpu.ms_per_op.get("postgres").copied().unwrap_or(0.0)
    }
}

#[derive(Debug, Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub rabbitmq: String,
    pub postgres: String,
    /// Whether the server runs autovacuum (`on` or `off`).
    pub postgres_autovacuum: String,
}

impl Machine {
    /// Read what this machine is; a part that can't be read says so.
    pub async fn describe(environment: &Environment) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let field = |text: &str, name: &str| {
            text.lines()
                .find(|line| line.starts_with(name))
                .and_then(|line| line.split_once(':'))
                .map(|(_, value)| value.trim().to_string())
        };
        let memory_kib: f64 = field(&meminfo, "MemTotal")
            .and_then(|value| value.trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0.0);
        let (postgres, postgres_autovacuum) = match environment.admin_pool().await {
            Ok(pool) => sqlx::query!(
                r#"SELECT current_setting('server_version') AS "version!",
                          current_setting('autovacuum') AS "autovacuum!""#
            )
            .fetch_one(&pool)
            .await
            .map_or_else(
                |error| (format!("unknown ({error})"), "unknown".into()),
                |server| (server.version, server.autovacuum),
            ),
            Err(error) => (format!("unknown ({error})"), "unknown".into()),
        };
        Self {
            cpu: field(&cpuinfo, "model name").unwrap_or_else(|| "unknown".into()),
            cores: std::thread::available_parallelism().map_or(0, usize::from),
            memory_gib: memory_kib / 1024.0 / 1024.0,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map_or_else(|_| "unknown".into(), |kernel| kernel.trim().to_string()),
            rabbitmq: rabbitmq_version(),
            postgres,
            postgres_autovacuum,
        }
    }
}

fn rabbitmq_version() -> String {
    std::process::Command::new("rabbitmqctl")
        .args(["version"])
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_string())
        .filter(|version| !version.is_empty())
        .unwrap_or_else(|| "unknown (rabbitmqctl version failed)".into())
}

/// One raw loop's rate and latency.
#[derive(Debug, Serialize)]
pub struct Rate {
    pub what: String,
    pub concurrency: usize,
    pub operations: u64,
    pub per_s: f64,
    pub latency: Percentiles,
}

impl Rate {
    pub fn of(what: &str, run: &Throughput, concurrency: usize) -> Self {
        Self {
            what: what.into(),
            concurrency,
            operations: run.operations,
            per_s: run.per_second(),
            latency: Percentiles::of_micros(&run.latency),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Raw {
    pub payload_bytes: usize,
    pub amqp: Vec<Rate>,
    pub postgres: Vec<Rate>,
}

/// One HTTP measurement: 2xx answers per second and their latency.
#[derive(Debug, Serialize)]
pub struct HttpRun {
    pub what: String,
    pub concurrency: usize,
    pub rate: Option<f64>,
    pub requests: u64,
    pub per_s: f64,
    pub latency: Percentiles,
    pub errors: u64,
    /// CPU per request.
    pub cpu: Usage,
}

impl HttpRun {
    pub fn of(
        what: &str,
        concurrency: usize,
        rate: Option<f64>,
        posted: &Posted,
        cpu: Usage,
    ) -> Self {
        Self {
            what: what.into(),
            concurrency,
            rate,
            requests: posted.requests,
            per_s: posted.answers_per_second(),
            latency: Percentiles::of_micros(&posted.latency),
            errors: posted.errors.values().sum(),
            cpu,
        }
    }
}

/// Orders posted at a whole system and followed to the end.
/// The reference pipeline's run (see `reference.rs`).
#[derive(Debug, Serialize)]
pub struct Reference {
    pub orders: u64,
    pub errors: u64,
    /// Orders over the time from the first POST to the last order acked by
    /// both subscribers.
    pub completed_per_s: f64,
    pub cpu: Usage,
}

#[derive(Debug, Serialize)]
pub struct ScalingRun {
    pub transport: Transport,
    pub processors: usize,
    pub payment_latency_ms: u64,
    pub prefetch: u16,
    pub orders: u64,
    pub accepted_per_s: f64,
    pub post_latency: Percentiles,
    pub completed_per_s: f64,
    pub accept_to_final: Percentiles,
    pub errors: u64,
    pub complete: bool,
    pub exactly_once: bool,
    /// CPU per order, from the first POST to the last order audited.
    pub cpu: Usage,
    /// With the Postgres transport, the notifications sent over the same
    /// time.
    pub notifications: Option<Notifications>,
}

impl ScalingRun {
    pub fn of(shape: Shape, posted: &Posted, completion: Completion, cpu: Usage) -> Self {
        Self {
            transport: shape.transport,
            processors: shape.processors,
            payment_latency_ms: shape.payment_latency_ms,
            prefetch: shape.prefetch,
            orders: posted.accepted.len() as u64,
            accepted_per_s: posted.accepted_per_second(),
            post_latency: Percentiles::of_micros(&posted.latency),
            completed_per_s: completion.completed_per_s,
            accept_to_final: completion
                .accept_to_final
                .get("all")
                .copied()
                .unwrap_or_default(),
            errors: posted.errors.values().sum(),
            complete: completion.complete,
            exactly_once: completion.exactly_once.ok,
            cpu,
            notifications: None,
        }
    }

    /// The run with the notifications counted over it.
    pub fn with(self, notifications: Option<Notifications>) -> Self {
        Self {
            notifications,
            ..self
        }
    }

    /// Notifications per order on the jobs' and the events' channels.
    pub fn notifications_per_order(&self) -> Option<(f64, f64)> {
        let sent = self.notifications?;
        let orders = self.orders.max(1) as f64;
        Some((sent.jobs as f64 / orders, sent.events as f64 / orders))
    }
}

/// One reading taken every 250 ms during the burst.
#[derive(Debug, Serialize)]
pub struct Sample {
    pub t_s: f64,
    pub accepted: i64,
    pub finished: i64,
    /// Orders waiting for a processor: ready on the work queues, or jobs
    /// rows not dead.
    pub backlog: u64,
    /// In the order of [`Burst::services`].
    pub rss_bytes: Vec<u64>,
}

#[derive(Debug, Serialize)]
pub struct Burst {
    pub transport: Transport,
    pub processors: usize,
    pub payment_latency_ms: u64,
    pub services: Vec<String>,
    pub run: ScalingRun,
    pub samples: Vec<Sample>,
    /// With the Postgres transport, the jobs table once the burst is done.
    pub jobs_table: Option<TableSize>,
}

impl Burst {
    fn deepest(&self) -> u64 {
        self.samples
            .iter()
            .map(|sample| sample.backlog)
            .max()
            .unwrap_or(0)
    }
}

#[derive(Debug, Serialize)]
pub struct Express {
    pub backlog: u64,
    pub processors: usize,
    pub payment_latency_ms: u64,
    pub rate_per_lane: f64,
    pub express: Percentiles,
    pub standard_alongside: Percentiles,
    pub backlog_standard: Percentiles,
    pub exactly_once: bool,
    pub errors: u64,
}

/// Orders at a steady low rate, where every batch is one order.
#[derive(Debug, Serialize)]
pub struct LowLoad {
    pub transport: Transport,
    pub rate: f64,
    pub orders: u64,
    pub post: Percentiles,
    /// Standard lane (the only one posted).
    pub accept_to_final: Percentiles,
    pub accept_to_done: Percentiles,
    pub complete: bool,
    pub exactly_once: bool,
    pub errors: u64,
}

impl LowLoad {
    pub fn of(transport: Transport, rate: f64, posted: &Posted, completion: &Completion) -> Self {
        let lane = |by_lane: &std::collections::BTreeMap<String, Percentiles>| {
            by_lane.get("standard").cloned().unwrap_or_default()
        };
        Self {
            transport,
            rate,
            orders: posted.accepted.len() as u64,
            post: Percentiles::of_micros(&posted.latency),
            accept_to_final: lane(&completion.accept_to_final),
            accept_to_done: lane(&completion.accept_to_done),
            complete: completion.complete,
            exactly_once: completion.exactly_once.ok,
            errors: posted.errors.values().sum(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Memory {
    pub transport: Transport,
    pub service: String,
    pub idle_bytes: u64,
    pub peak_bytes: u64,
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

/// One row of the targets table.
struct Target {
    name: String,
    goal: String,
    measured: String,
    met: bool,
}

impl Results {
    fn http(&self, prefix: &str) -> Option<&HttpRun> {
        self.http.iter().find(|run| run.what.starts_with(prefix))
    }

    fn scaling(
        &self,
        transport: Transport,
        processors: usize,
        payment_latency_ms: u64,
        prefetch: u16,
    ) -> Option<&ScalingRun> {
        self.scaling.iter().find(|run| {
            run.transport == transport
                && run.processors == processors
                && run.payment_latency_ms == payment_latency_ms
                && run.prefetch == prefetch
        })
    }

    /// The no-I/O end-to-end run on `transport` that completed the most
    /// orders per second.
    fn best_no_io(&self, transport: Transport) -> Option<&ScalingRun> {
        self.scaling
            .iter()
            .filter(|run| run.transport == transport && run.payment_latency_ms == 0)
            .max_by(|a, b| a.completed_per_s.total_cmp(&b.completed_per_s))
    }

    fn low_load(&self, transport: Transport) -> Option<&LowLoad> {
        self.low_load.iter().find(|low| low.transport == transport)
    }

    fn burst(&self, transport: Transport) -> Option<&Burst> {
        self.bursts
            .iter()
            .find(|burst| burst.transport == transport)
    }

    /// Guarantees the run broke (not performance targets): errors, lost or
    /// doubled effects.
    pub fn failures(&self) -> Vec<String> {
        let mut failures = Vec::new();
        let bursts = self.bursts.iter().map(|burst| &burst.run);
        for run in self.scaling.iter().chain(bursts) {
            if !run.complete || !run.exactly_once || run.errors > 0 {
                failures.push(format!(
                    "{}: {} processor(s), {} ms: complete {}, exactly once {}, errors {}",
                    run.transport,
                    run.processors,
                    run.payment_latency_ms,
                    run.complete,
                    run.exactly_once,
                    run.errors
                ));
            }
        }
        let stage = &self.processor_stage;
        if !stage.finished || !stage.exactly_once {
            failures.push(format!(
                "processor stage: finished {}, exactly once {}",
                stage.finished, stage.exactly_once
            ));
        }
        for low in &self.low_load {
            if !low.complete || !low.exactly_once || low.errors > 0 {
                failures.push(format!(
                    "{}: low load: complete {}, exactly once {}, errors {}",
                    low.transport, low.complete, low.exactly_once, low.errors
                ));
            }
        }
        if !self.express.exactly_once || self.express.errors > 0 {
            failures.push(format!(
                "express lane: exactly once {}, errors {}",
                self.express.exactly_once, self.express.errors
            ));
        }
        if self.reference.errors > 0 {
            failures.push(format!(
                "reference pipeline: {} failed requests",
                self.reference.errors
            ));
        }
        for run in &self.http {
            if run.errors > 0 {
                failures.push(format!("{}: {} failed requests", run.what, run.errors));
            }
        }
        failures
    }

    fn targets(&self) -> Vec<Target> {
        let mut targets = Vec::new();
        if let (Some(bare), Some(api), Some(half)) = (
            self.http("bare"),
            self.http("order-api, as fast"),
            self.http("order-api at half"),
        ) {
            let share = ratio(api.per_s, bare.per_s);
            targets.push(Target {
                name: "order-api accept rate vs bare axum + one INSERT".into(),
                goal: "≥ 40%".into(),
                measured: format!(
                    "{:.0}% ({:.0}/s vs {:.0}/s)",
                    share * 100.0,
                    api.per_s,
                    bare.per_s
                ),
                met: share >= 0.40,
            });
            targets.push(Target {
                name: "p99 POST latency at half that rate".into(),
                goal: "≤ 25 ms".into(),
                measured: format!("{:.1} ms at {:.0}/s", half.latency.p99_ms, half.per_s),
                met: half.latency.p99_ms <= 25.0,
            });
        }
        for transport in Transport::ALL {
            self.transport_targets(transport, &mut targets);
        }
        let stage = &self.processor_stage;
        targets.push(Target {
            name: "orderflow's Postgres CPU per order, the processor stage (a backlog, two processors, no payment latency)".into(),
            goal: "≤ 0.9 ms".into(),
            measured: format!(
                "{:.2} ms; {} (the provider's database {:.2} ms; {:.0} orders/s)",
                stage.postgres_ms_per_order(),
                stage.orderflow_database,
                stage
                    .cpu
                    .ms_per_op
                    .get(crate::cpu::PROVIDER_POSTGRES)
                    .copied()
                    .unwrap_or(0.0),
                stage.drained_per_s
            ),
            met: stage.postgres_ms_per_order() <= 0.9,
        });
        targets.push(Target {
            name: "express accept→final p99 behind the backlog".into(),
            goal: "< 1 s".into(),
            measured: format!(
                "{:.0} ms behind {} standard orders",
                self.express.express.p99_ms, self.express.backlog
            ),
            met: self.express.express.p99_ms < 1000.0,
        });
        let fattest = self.memory.iter().max_by_key(|memory| memory.idle_bytes);
        if let Some(fattest) = fattest {
            targets.push(Target {
                name: "idle RSS per service".into(),
                goal: "≤ 30 MB".into(),
                measured: format!(
                    "largest {:.1} MiB ({}, {})",
                    mib(fattest.idle_bytes),
                    fattest.service,
                    fattest.transport
                ),
                met: self
                    .memory
                    .iter()
                    .all(|memory| memory.idle_bytes <= 30 * 1_000_000),
            });
        }
        let processor_growth = self
            .memory
            .iter()
            .filter(|memory| memory.service.starts_with("order-processor"))
            .map(|memory| ratio(memory.peak_bytes as f64, memory.idle_bytes as f64))
            .fold(0.0, f64::max);
        targets.push(Target {
            name: "processor peak RSS during the bursts vs idle".into(),
            goal: "≤ 2×".into(),
            measured: format!("{processor_growth:.2}×"),
            met: processor_growth > 0.0 && processor_growth <= 2.0,
        });
        targets
    }

    /// The targets of the stages run on each transport, named with it.
    fn transport_targets(&self, transport: Transport, targets: &mut Vec<Target>) {
        let named = |name: &str| format!("{name} — {transport}");
        if let Some(best) = self.best_no_io(transport) {
            targets.push(Target {
                name: named("end to end, no simulated I/O (best processor count)"),
                goal: "≥ 1,000 orders/s".into(),
                measured: format!(
                    "{:.0}/s with {} processor(s)",
                    best.completed_per_s, best.processors
                ),
                met: best.completed_per_s >= 1000.0,
            });
            let share = ratio(best.completed_per_s, self.reference.completed_per_s);
            targets.push(Target {
                name: named(
                    "end to end vs the reference pipeline (same hops, confirms and acks only)",
                ),
                goal: "≥ 0.7×".into(),
                measured: format!(
                    "{share:.2}× ({:.0}/s vs {:.0}/s)",
                    best.completed_per_s, self.reference.completed_per_s
                ),
                met: share >= 0.7,
            });
            targets.push(Target {
                name: named(
                    "CPU per order end to end (best no-I/O run), the stand-in provider's share apart",
                ),
                goal: "≤ 2.0 ms".into(),
                measured: format!(
                    "{:.1} ms, and {:.1} ms the provider's (reference pipeline {:.1} ms)",
                    best.cpu.orderflow_ms_per_op(),
                    best.cpu.provider_ms_per_op(),
                    self.reference.cpu.total_ms_per_op
                ),
                met: best.cpu.orderflow_ms_per_op() <= 2.0,
            });
        }
        for (prefetch, name) in [
            (
                1,
                "4 processors vs 1, 20 ms payment I/O, one order at a time each",
            ),
            (
                crate::DEFAULT_PREFETCH,
                "4 processors vs 1, 20 ms payment I/O, PREFETCH 40 (in batches of 10)",
            ),
        ] {
            if let (Some(one), Some(four)) = (
                self.scaling(transport, 1, crate::PAYMENT_IO_MS, prefetch),
                self.scaling(transport, 4, crate::PAYMENT_IO_MS, prefetch),
            ) {
                let scale = ratio(four.completed_per_s, one.completed_per_s);
                targets.push(Target {
                    name: named(name),
                    goal: "≥ 3.5×".into(),
                    measured: format!(
                        "{scale:.2}× ({:.0}/s vs {:.0}/s)",
                        four.completed_per_s, one.completed_per_s
                    ),
                    met: scale >= 3.5,
                });
            }
        }
        if let Some(low) = self.low_load(transport) {
            targets.push(Target {
                name: named("p99 POST latency at 20 orders/s (nothing to batch)"),
                goal: "≤ 10 ms".into(),
                measured: format!("{:.1} ms (p50 {:.1} ms)", low.post.p99_ms, low.post.p50_ms),
                met: low.post.p99_ms <= 10.0,
            });
            targets.push(Target {
                name: named("accept→final p50 at 20 orders/s"),
                goal: "≤ 6 ms".into(),
                measured: format!(
                    "{:.1} ms (accept→notified and audited p50 {:.1} ms)",
                    low.accept_to_final.p50_ms, low.accept_to_done.p50_ms
                ),
                met: low.accept_to_final.p50_ms <= 6.0,
            });
        }
    }
}

/// The targets as a markdown table: what the note and the terminal show.
pub fn summary_table(results: &Results) -> String {
    let mut out = String::from("| target | goal | measured | met |\n|---|---|---|---|\n");
    for target in results.targets() {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            target.name,
            target.goal,
            target.measured,
            if target.met { "yes" } else { "**no**" }
        );
    }
    out
}

fn percentiles_cells(p: &Percentiles) -> String {
    format!(
        "{:.1} | {:.1} | {:.1} | {:.1}",
        p.p50_ms, p.p90_ms, p.p99_ms, p.max_ms
    )
}

/// RESULTS.md.
pub fn markdown(results: &Results, earlier: &[before::Earlier]) -> anyhow::Result<String> {
    let mut md = String::new();
    let m = &results.machine;
    let _ = writeln!(md, "# orderflow benchmark results\n");
    if results.quick {
        let _ = writeln!(
            md,
            "> **Quick run** (`--quick`): every part briefly, to prove the tool works. \
             These numbers are not the measurements; run `scripts/bench.sh` for those.\n"
        );
    }
    let _ = writeln!(
        md,
        "Measured {} in one run of `{}` ({:.0} s). Everything — broker, database, services \
         and the load generator — shares this machine's cores, so compare the ratios \
         measured in this run, not absolute numbers across runs (they vary ±30%).\n",
        results.started_at, results.command, results.took_s
    );
    let _ = writeln!(md, "## Machine\n");
    let _ = writeln!(md, "| | |\n|---|---|");
    let _ = writeln!(md, "| CPU | {} |", m.cpu);
    let _ = writeln!(md, "| cores | {} |", m.cores);
    let _ = writeln!(md, "| memory | {:.1} GiB |", m.memory_gib);
    let _ = writeln!(md, "| kernel | {} |", m.kernel);
    let _ = writeln!(md, "| RabbitMQ | {} |", m.rabbitmq);
    let _ = writeln!(
        md,
        "| PostgreSQL | {} (autovacuum {}) |\n",
        m.postgres, m.postgres_autovacuum
    );

    let _ = writeln!(md, "## Targets\n\n{}", summary_table(results));
    if !earlier.is_empty() {
        let _ = writeln!(
            md,
            "## Before and after\n\nThe headline numbers of earlier runs of this tool (from their \
             `results.json`) beside this one's. Runs at different times see a differently busy \
             machine: compare the ratios more than the rates.\n\n{}",
            before::table(&serde_json::to_value(results)?, earlier)
        );
    }
    side_by_side(&mut md, results);

    let _ = writeln!(
        md,
        "## 1. Raw bounds\n\nThe same {}-byte order payload on the same broker and database, \
         with no service logic. RabbitMQ: persistent messages to a quorum queue with publisher \
         confirms, one consumer acking each (prefetch 100); a message counts when it is acked. \
         Postgres: single-row INSERT commits (autocommit), at 1 client and at the services' pool \
         size. Latency is per publish→confirm or per INSERT.\n",
        results.raw.payload_bytes
    );
    let _ = writeln!(
        md,
        "| loop | ops | per second | p50 ms | p90 ms | p99 ms | max ms |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|");
    for (kind, rates) in [
        ("RabbitMQ", &results.raw.amqp),
        ("Postgres", &results.raw.postgres),
    ] {
        for rate in rates {
            let _ = writeln!(
                md,
                "| {kind}: {} | {} | {:.0} | {} |",
                rate.what,
                rate.operations,
                rate.per_s,
                percentiles_cells(&rate.latency)
            );
        }
    }

    let _ = writeln!(
        md,
        "\n## 2. Accepting orders over HTTP\n\nPOSTs with a fresh idempotency key each, \
         answered 202, from the benchmark's own client ({} connections). The bare handler \
         parses the JSON and does one INSERT through a pool of the same size as order-api's; \
         order-api validates, prices, stores the order, its history, idempotency key and \
         outbox row in one transaction, and publishes with a confirm. Only order-api runs \
         (no processors compete for the cores). At half rate, latency is measured from when \
         each request was due.\n",
        crate::CONCURRENCY
    );
    let _ = writeln!(
        md,
        "| server | offered | answered/s | p50 ms | p90 ms | p99 ms | max ms | errors |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
    for run in &results.http {
        let offered = run.rate.map_or_else(
            || "as fast as it goes".to_string(),
            |rate| format!("{rate:.0}/s"),
        );
        let _ = writeln!(
            md,
            "| {} | {offered} | {:.0} | {} | {} |",
            run.what,
            run.per_s,
            percentiles_cells(&run.latency),
            run.errors
        );
    }
    if let (Some(bare), Some(api)) = (results.http("bare"), results.http("order-api, as fast")) {
        let best_amqp = results
            .raw
            .amqp
            .iter()
            .map(|rate| rate.per_s)
            .fold(0.0, f64::max);
        let best_pg = results
            .raw
            .postgres
            .iter()
            .map(|rate| rate.per_s)
            .fold(0.0, f64::max);
        let _ = writeln!(
            md,
            "\norder-api accepts at **{:.0}%** of the bare handler's rate, {:.0}% of the pipelined \
             publish-confirm bound and {:.0}% of the pooled INSERT bound (each accepted order \
             costs one transaction and one confirmed publish).",
            ratio(api.per_s, bare.per_s) * 100.0,
            ratio(api.per_s, best_amqp) * 100.0,
            ratio(api.per_s, best_pg) * 100.0
        );
    }

    let _ = writeln!(
        md,
        "\n## 3. End to end: competing consumers\n\nA fresh system per row: order-api, N \
         order-processors, notification-service and logging-service. The orders are posted as fast as \
         {} connections allow; *completed/s* is orders over the time from the first acceptance \
         to the last order notified and audited, by the database's clock. Accept→final is \
         from the order's commit in order-api to its final status commit in a processor. \
         *Prefetch* is how many orders each processor has in hand per lane: {} is the \
         services' default, handled in batches of up to 20 (BATCH_SIZE), two batches at once; \
         with 1 each processor is a classic one-at-a-time worker, which shows competing \
         consumers scaling while the I/O wait, not the CPU, is the limit. Each row runs on \
         both transports in turn: *rabbitmq* (`WORK_QUEUE` and `EVENT_BUS` both `rabbitmq`) \
         and *postgres* (both `postgres`).\n",
        crate::CONCURRENCY,
        crate::DEFAULT_PREFETCH
    );
    let _ = writeln!(
        md,
        "| payment I/O | prefetch | processors | transport | orders | accepted/s | completed/s | vs 1 processor | accept→final p50 ms | p99 ms | exactly once |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|");
    for run in &results.scaling {
        let one = results
            .scaling(run.transport, 1, run.payment_latency_ms, run.prefetch)
            .map_or(0.0, |one| one.completed_per_s);
        let _ = writeln!(
            md,
            "| {} ms | {} | {} | {} | {} | {:.0} | {:.0} | {:.2}× | {:.0} | {:.0} | {} |",
            run.payment_latency_ms,
            run.prefetch,
            run.processors,
            run.transport,
            run.orders,
            run.accepted_per_s,
            run.completed_per_s,
            ratio(run.completed_per_s, one),
            run.accept_to_final.p50_ms,
            run.accept_to_final.p99_ms,
            if run.exactly_once { "yes" } else { "**NO**" }
        );
    }

    let reference = &results.reference;
    let against_reference: Vec<String> = Transport::ALL
        .iter()
        .filter_map(|&transport| {
            let best = results.best_no_io(transport)?;
            Some(format!(
                "**{:.2}×** that rate on {transport}",
                ratio(best.completed_per_s, reference.completed_per_s)
            ))
        })
        .collect();
    let groups: Vec<String> = reference
        .cpu
        .ms_per_op
        .iter()
        .filter(|(_, ms)| **ms >= 0.05)
        .map(|(group, ms)| format!("{group} {ms:.1}"))
        .collect();
    let _ = writeln!(
        md,
        "\n**The reference pipeline** (`reference.rs` in the benchmark): the same hops with no \
         guarantee beyond confirms and acks. HTTP → one INSERT and a confirmed publish to a quorum \
         work queue → a consumer (prefetch {}): one INSERT and a confirmed publish to a fanout, \
         then ack → two subscribers on quorum queues that ack. {} orders posted as fast as {} \
         connections allow went through at **{:.0}/s** (first POST to last ack by both), \
         {:.1} CPU-ms per order ({}). orderflow's best no-I/O run above: {}.\n",
        crate::DEFAULT_PREFETCH,
        reference.orders,
        crate::CONCURRENCY,
        reference.completed_per_s,
        reference.cpu.total_ms_per_op,
        groups.join(", "),
        against_reference.join(", ")
    );

    cpu_section(&mut md, results);

    burst_section(&mut md, results);

    let e = &results.express;
    let _ = writeln!(
        md,
        "## 5. Express lane\n\n{} standard orders were queued while no processor ran; then {} \
         processors ({} ms payment I/O) started and express and standard orders were posted side \
         by side at {:.0}/s each. Accept→final, in ms:\n",
        e.backlog, e.processors, e.payment_latency_ms, e.rate_per_lane
    );
    let _ = writeln!(
        md,
        "| orders | count | p50 | p90 | p99 | max |\n|---|---|---|---|---|---|"
    );
    for (what, p) in [
        ("express, posted during the backlog", &e.express),
        ("standard, posted alongside them", &e.standard_alongside),
        ("standard, the backlog itself", &e.backlog_standard),
    ] {
        let _ = writeln!(md, "| {what} | {} | {} |", p.count, percentiles_cells(p));
    }
    let _ = writeln!(
        md,
        "\nExactly once over all three groups: {}.\n",
        if e.exactly_once { "yes" } else { "**NO**" }
    );

    low_load_section(&mut md, results);

    let _ = writeln!(
        md,
        "## 7. Memory\n\nResident set size of each service of the bursts' systems: idle (2 s \
         after start-up) and the largest reading during the burst (sampled every 250 ms).\n"
    );
    let _ = writeln!(
        md,
        "| service | transport | idle MiB | peak MiB | peak / idle |\n|---|---|---|---|---|"
    );
    for memory in &results.memory {
        let _ = writeln!(
            md,
            "| {} | {} | {:.1} | {:.1} | {:.2}× |",
            memory.service,
            memory.transport,
            mib(memory.idle_bytes),
            mib(memory.peak_bytes),
            ratio(memory.peak_bytes as f64, memory.idle_bytes as f64)
        );
    }
    md.push('\n');
    jobs_table_section(&mut md, &results.jobs_table);

    let _ = writeln!(
        md,
        "\n## How to reproduce\n\n```\nscripts/bench.sh           # this whole run, ~25 minutes\nscripts/bench.sh --quick   # every part briefly\n```\n\n\
         `scripts/bench.sh` builds the release binaries, runs `target/release/orderflow-bench` \
         against the RabbitMQ and Postgres on 127.0.0.1 (override with `AMQP_URL` and \
         `BENCH_POSTGRES_URL`), and draws `burst.png` from `burst.csv`. Every part runs on \
         its own database and topology, dropped afterwards; the services' logs are in \
         `target/bench-logs/`. The before/after table sets the run this one replaced beside it \
         (and any earlier `results.json` given with `--before LABEL=PATH`). `loadgen --help` \
         runs the same load by hand against `scripts/run-local.sh`."
    );
    Ok(md)
}

/// Both bursts' samples as CSV, for the plot: one line per sample, named
/// by its transport.
pub fn burst_csv(bursts: &[Burst]) -> String {
    let mut csv = String::from("transport,t_s,accepted,finished,backlog");
    let services = bursts.first().map_or(&[][..], |burst| &burst.services[..]);
    for service in services {
        let _ = write!(csv, ",rss_mib_{service}");
    }
    csv.push('\n');
    for burst in bursts {
        for sample in &burst.samples {
            let _ = write!(
                csv,
                "{},{:.3},{},{},{}",
                burst.transport, sample.t_s, sample.accepted, sample.finished, sample.backlog
            );
            for rss in &sample.rss_bytes {
                let _ = write!(csv, ",{:.1}", mib(*rss));
            }
            csv.push('\n');
        }
    }
    csv
}

/// The process groups of the CPU tables, in their order.
const CPU_GROUPS: [&str; 11] = [
    "load generator",
    "bare axum",
    "order-api",
    "order-processors",
    "notification-service",
    "logging-service",
    "postgres",
    "rabbitmq",
    "payment-provider",
    crate::cpu::PROVIDER_POSTGRES,
    "other",
];

/// Where the CPU went, per request or per order, for the runs that are
/// bound by it: the HTTP runs and the end-to-end runs with no payment I/O.
fn cpu_section(md: &mut String, results: &Results) {
    let mut rows: Vec<(String, &Usage)> = results
        .http
        .iter()
        .filter(|run| run.rate.is_none())
        .map(|run| (format!("{} (per request)", run.what), &run.cpu))
        .collect();
    rows.extend(
        results
            .scaling
            .iter()
            .filter(|run| run.payment_latency_ms == 0)
            .map(|run| {
                (
                    format!(
                        "end to end, {}, {} processor(s), no I/O (per order)",
                        run.transport, run.processors
                    ),
                    &run.cpu,
                )
            }),
    );
    rows.push((
        format!(
            "the processor stage: a backlog of {} drained by 2 processors, no I/O (per order)",
            results.processor_stage.orders
        ),
        &results.processor_stage.cpu,
    ));
    let groups: Vec<&str> = CPU_GROUPS
        .iter()
        .copied()
        .filter(|group| {
            rows.iter()
                .any(|(_, usage)| usage.ms_per_op.contains_key(*group))
        })
        .collect();
    let _ = writeln!(
        md,
        "\n## Where the CPU goes\n\nCPU milliseconds per request or per order, read from /proc \
         (user + system time of each process; *other* is the rest of the machine's busy time), \
         and how busy the {} cores were. Two cores give at most 2,000 CPU-ms per second, so \
         *ceiling* = 2,000 / total is the most this work could do here if nothing else ran. \
         *payment-provider* and *postgres (provider)* are the stand-in payment provider (its \
         service, and the Postgres backends of its own database): another company's cost in \
         real life, counted in *total* but not in orderflow's CPU per order above.\n",
        results.machine.cores
    );
    let _ = write!(md, "| run | cores busy | total ms | ceiling/s |");
    for group in &groups {
        let _ = write!(md, " {group} |");
    }
    let _ = write!(md, "\n|---|---|---|---|");
    for _ in &groups {
        let _ = write!(md, "---|");
    }
    md.push('\n');
    let cores = results.machine.cores.max(1) as f64;
    for (name, usage) in rows {
        let _ = write!(
            md,
            "| {name} | {:.0}% | {:.2} | {:.0} |",
            usage.machine_busy_pct,
            usage.total_ms_per_op,
            ratio(cores * 1000.0, usage.total_ms_per_op)
        );
        for group in &groups {
            match usage.ms_per_op.get(*group) {
                Some(ms) => {
                    let _ = write!(md, " {ms:.2} |");
                }
                None => md.push_str(" |"),
            }
        }
        md.push('\n');
    }
}

/// One line of the side-by-side table: the value on each transport, and
/// postgres's over rabbitmq's.
fn compare(
    md: &mut String,
    what: &str,
    cell: fn(f64) -> String,
    read: impl Fn(Transport) -> Option<f64>,
) {
    let (rabbitmq, postgres) = (read(Transport::Rabbitmq), read(Transport::Postgres));
    let shown = |value: Option<f64>| value.map_or_else(|| "–".to_string(), cell);
    let against = match (rabbitmq, postgres) {
        (Some(rabbitmq), Some(postgres)) if rabbitmq > 0.0 => {
            format!("{:.2}×", postgres / rabbitmq)
        }
        _ => "–".into(),
    };
    let _ = writeln!(
        md,
        "| {what} | {} | {} | {against} |",
        shown(rabbitmq),
        shown(postgres)
    );
}

fn per_s(value: f64) -> String {
    format!("{value:.0}/s")
}

fn ms(value: f64) -> String {
    format!("{value:.1} ms")
}

fn count(value: f64) -> String {
    format!("{value:.0}")
}

fn per_order(value: f64) -> String {
    format!("{value:.2}")
}

/// The stages run on both transports, each headline beside the other's.
fn side_by_side(md: &mut String, results: &Results) {
    let _ = writeln!(
        md,
        "## The two transports side by side\n\n*rabbitmq*: `WORK_QUEUE=rabbitmq` and \
         `EVENT_BUS=rabbitmq`, the orders' messages on RabbitMQ's work queues and their events \
         on its fanout. *postgres*: both `postgres`, the messages as rows of the `jobs` table \
         claimed with SKIP LOCKED, the events appended to the `events` table, each woken by \
         NOTIFY. The same stages, taking turns in this run; the last column is postgres's \
         number over rabbitmq's. Details in sections 3, 4 and 6.\n"
    );
    let _ = writeln!(
        md,
        "| | rabbitmq | postgres | postgres / rabbitmq |\n|---|---|---|---|"
    );
    let best = |transport| results.best_no_io(transport);
    compare(
        md,
        "end to end, no payment I/O, best processor count: completed",
        per_s,
        |t| Some(best(t)?.completed_per_s),
    );
    compare(md, "… CPU-ms per order, all of it", per_order, |t| {
        Some(best(t)?.cpu.total_ms_per_op)
    });
    compare(
        md,
        "… CPU-ms per order, orderflow's (the provider apart)",
        per_order,
        |t| Some(best(t)?.cpu.orderflow_ms_per_op()),
    );
    for group in CPU_GROUPS
        .iter()
        .filter(|group| !["load generator", "bare axum"].contains(group))
    {
        compare(
            md,
            &format!("… CPU-ms per order, {group}"),
            per_order,
            |t| best(t)?.cpu.ms_per_op.get(*group).copied(),
        );
    }
    compare(
        md,
        "… NOTIFYs per order on the jobs' channel",
        per_order,
        |t| Some(best(t)?.notifications_per_order()?.0),
    );
    compare(
        md,
        "… NOTIFYs per order on the events' channel",
        per_order,
        |t| Some(best(t)?.notifications_per_order()?.1),
    );
    for (prefetch, how) in [
        (1, "one order at a time each"),
        (crate::DEFAULT_PREFETCH, "PREFETCH 40"),
    ] {
        for processors in [1, 2, 4] {
            compare(
                md,
                &format!(
                    "{} ms payment I/O, {how}, {processors} processor(s): completed",
                    crate::PAYMENT_IO_MS
                ),
                per_s,
                |t| {
                    let run = results.scaling(t, processors, crate::PAYMENT_IO_MS, prefetch)?;
                    Some(run.completed_per_s)
                },
            );
        }
    }
    let low = |transport| results.low_load(transport);
    compare(md, "20 orders/s: POST p99", ms, |t| {
        Some(low(t)?.post.p99_ms)
    });
    compare(md, "20 orders/s: accept→final p50", ms, |t| {
        Some(low(t)?.accept_to_final.p50_ms)
    });
    compare(
        md,
        "20 orders/s: accept→notified and audited p50",
        ms,
        |t| Some(low(t)?.accept_to_done.p50_ms),
    );
    let burst = |transport| results.burst(transport);
    compare(md, "burst: accepted", per_s, |t| {
        Some(burst(t)?.run.accepted_per_s)
    });
    compare(md, "burst: completed", per_s, |t| {
        Some(burst(t)?.run.completed_per_s)
    });
    compare(md, "burst: deepest backlog", count, |t| {
        Some(burst(t)?.deepest() as f64)
    });
    compare(md, "burst: POST p99", ms, |t| {
        Some(burst(t)?.run.post_latency.p99_ms)
    });
    md.push('\n');
}

/// The bursts: each one's rates, the backlog of both over time, and the
/// jobs table the Postgres one left.
fn burst_section(md: &mut String, results: &Results) {
    let orders = results.bursts.first().map_or(0, |burst| burst.run.orders);
    let _ = writeln!(
        md,
        "\n## 4. Load levelling: a burst of {orders} orders\n\n\
         ![the backlog and completion during the bursts, both transports](burst.png)\n\n\
         The backlog is what waits for a processor: with *rabbitmq* the messages ready on the \
         work queues, with *postgres* the `jobs` rows not dead. The samples are in `burst.csv`.\n"
    );
    for burst in &results.bursts {
        let _ = writeln!(
            md,
            "- **{}**: {} processors with {} ms payment I/O. The client posted as fast as {} \
             connections allow: order-api accepted **{:.0}/s** (POST p50 {:.1} ms, p99 {:.1} ms) \
             while the processors drained at **{:.0}/s**; the backlog peaked at **{}**. \
             Exactly once: {}.",
            burst.transport,
            burst.processors,
            burst.payment_latency_ms,
            crate::CONCURRENCY,
            burst.run.accepted_per_s,
            burst.run.post_latency.p50_ms,
            burst.run.post_latency.p99_ms,
            burst.run.completed_per_s,
            burst.deepest(),
            if burst.run.exactly_once {
                "yes"
            } else {
                "**NO**"
            }
        );
    }
    backlog_series(md, &results.bursts);
    for burst in &results.bursts {
        if let Some(size) = &burst.jobs_table {
            let _ = writeln!(
                md,
                "\nThe jobs table once the {} burst was done: {}.",
                burst.transport,
                describe_size(size)
            );
        }
    }
    md.push('\n');
}

/// Rows of the backlog series: about this many, at whole seconds.
const SERIES_ROWS: f64 = 24.0;

/// The backlog of each burst over time, one row every few seconds; a dash
/// once that burst's run was over.
fn backlog_series(md: &mut String, bursts: &[Burst]) {
    let longest = bursts
        .iter()
        .filter_map(|burst| burst.samples.last())
        .map(|sample| sample.t_s)
        .fold(0.0, f64::max);
    let step = (longest / SERIES_ROWS).ceil().max(1.0);
    let _ = write!(md, "\n| seconds |");
    for burst in bursts {
        let _ = write!(md, " {} backlog |", burst.transport);
    }
    let _ = write!(md, "\n|---|{}\n", "---|".repeat(bursts.len()));
    let mut t = 0.0;
    while t <= longest {
        let cells: Vec<String> = bursts
            .iter()
            .map(|burst| backlog_at(burst, t).map_or("–".into(), |backlog| backlog.to_string()))
            .collect();
        let _ = writeln!(md, "| {t:.0} | {} |", cells.join(" | "));
        t += step;
    }
}

/// The last backlog sampled at or before `t` seconds, if the burst's run
/// lasted that long.
fn backlog_at(burst: &Burst, t: f64) -> Option<u64> {
    let last = burst.samples.last()?;
    if t > last.t_s {
        return None;
    }
    burst
        .samples
        .iter()
        .take_while(|sample| sample.t_s <= t)
        .last()
        .or(burst.samples.first())
        .map(|sample| sample.backlog)
}

/// A table size in words: in all, the table, each index, and the rows.
fn describe_size(size: &TableSize) -> String {
    let indexes: Vec<String> = size
        .indexes
        .iter()
        .map(|(name, bytes)| format!("{name} {}", human_bytes(*bytes)))
        .collect();
    format!(
        "{} in all (`pg_total_relation_size`); the table {}, {}; {} live rows, {} dead \
         (`n_dead_tup`), {} autovacuums so far",
        human_bytes(size.total_bytes),
        human_bytes(size.table_bytes),
        indexes.join(", "),
        size.live_rows,
        size.dead_rows,
        size.autovacuums
    )
}

/// The low-load rows of both transports.
fn low_load_section(md: &mut String, results: &Results) {
    let Some(first) = results.low_load.first() else {
        return;
    };
    let _ = writeln!(
        md,
        "## 6. Low load\n\n{} orders posted at a steady {:.0}/s to one processor with no \
         payment I/O, on each transport: every batch is one order, so this is what batching \
         must not cost, and what a NOTIFY wake-up takes against an AMQP push. In ms:\n",
        first.orders, first.rate
    );
    let _ = writeln!(
        md,
        "| | transport | count | p50 | p90 | p99 | max |\n|---|---|---|---|---|---|---|"
    );
    for (what, read) in [
        (
            "POST answered",
            (|low| &low.post) as fn(&LowLoad) -> &Percentiles,
        ),
        ("accept → final status", |low| &low.accept_to_final),
        ("accept → notified and audited", |low| &low.accept_to_done),
    ] {
        for low in &results.low_load {
            let p = read(low);
            let _ = writeln!(
                md,
                "| {what} | {} | {} | {} |",
                low.transport,
                p.count,
                percentiles_cells(p)
            );
        }
    }
    md.push('\n');
}

/// The jobs table under a long stream of jobs, and the NOTIFY's cost.
fn jobs_table_section(md: &mut String, run: &JobsTableRun) {
    let options = if run.autovacuum.table_options.is_empty() {
        "none".to_string()
    } else {
        format!("`{}`", run.autovacuum.table_options.join("`, `"))
    };
    let server: Vec<String> = run
        .autovacuum
        .server
        .iter()
        .map(|(name, value)| format!("`{name} = {value}`"))
        .collect();
    let _ = writeln!(
        md,
        "## 8. The jobs table under {} jobs\n\n\
         No service runs: on a private database (on the Postgres at {}) migrated as \
         orderflow's, {} claimants each \
         write {} jobs in a transaction with its NOTIFY (as order-api's group commit does), \
         claim {} due jobs (anyone's) and delete them, through `platform::jobs::JobQueue`'s \
         own claim and finish; after every tenth of the jobs, what a claim skipped is claimed \
         too and the table's size read. {:.0} jobs/s went through. The table's autovacuum \
         settings (its migration): {options}; the server's: {}.\n",
        run.jobs,
        run.server,
        run.workers,
        run.batch,
        run.batch,
        run.per_s,
        server.join(", ")
    );
    if !run.autovacuum.server_runs_it() {
        let _ = writeln!(
            md,
            "**Autovacuum is off on that server**: the table's own settings take no effect and \
             nothing reclaims the dead rows, so this does not show what autovacuum keeps the \
             size to. Point `BENCH_JOBS_POSTGRES_URL` at a server with autovacuum on.\n"
        );
    }
    let index_names: Vec<&str> = run
        .readings
        .first()
        .map(|reading| {
            reading
                .size
                .indexes
                .iter()
                .map(|(name, _)| name.as_str())
                .collect()
        })
        .unwrap_or_default();
    let _ = write!(md, "| jobs so far | in all | table |");
    for name in &index_names {
        let _ = write!(md, " {name} |");
    }
    let _ = writeln!(
        md,
        " live rows | dead rows | autovacuums |\n|---|---|---|{}---|---|---|",
        "---|".repeat(index_names.len())
    );
    for reading in &run.readings {
        let size = &reading.size;
        let _ = write!(
            md,
            "| {} | {} | {} |",
            reading.jobs_done,
            human_bytes(size.total_bytes),
            human_bytes(size.table_bytes)
        );
        for (_, bytes) in &size.indexes {
            let _ = write!(md, " {} |", human_bytes(*bytes));
        }
        let _ = writeln!(
            md,
            " {} | {} | {} |",
            size.live_rows, size.dead_rows, size.autovacuums
        );
    }
    if let (Some(first), Some(last)) = (run.readings.first(), run.readings.last()) {
        let _ = writeln!(
            md,
            "\nIn all, the last reading over the first: **{:.2}×** after {}× the jobs.",
            ratio(last.size.total_bytes as f64, first.size.total_bytes as f64),
            ratio(last.jobs_done as f64, first.jobs_done as f64)
        );
    }
    let notify = &run.notify;
    let _ = writeln!(
        md,
        "\n**The jobs' NOTIFY at full rate**: one-job transactions from {} connections, \
         {:.0} s with the NOTIFY and {:.0} s without, in alternating halves, while one \
         connection listens: **{:.0}** commits/s without, **{:.0}** with ({:.2}×). In the \
         services a NOTIFY goes with each of order-api's group commits, not each order: the \
         NOTIFYs per order are in the side-by-side table.",
        notify.clients,
        notify.seconds_each,
        notify.seconds_each,
        notify.without_notify_per_s,
        notify.with_notify_per_s,
        ratio(notify.with_notify_per_s, notify.without_notify_per_s)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn burst(transport: Transport, backlogs: &[(f64, u64)]) -> Burst {
        let samples = backlogs
            .iter()
            .map(|&(t_s, backlog)| Sample {
                t_s,
                accepted: 0,
                finished: 0,
                backlog,
                rss_bytes: Vec::new(),
            })
            .collect();
        Burst {
            transport,
            processors: 2,
            payment_latency_ms: 20,
            services: Vec::new(),
            run: ScalingRun {
                transport,
                processors: 2,
                payment_latency_ms: 20,
                prefetch: 40,
                orders: 0,
                accepted_per_s: 0.0,
                post_latency: Percentiles::default(),
                completed_per_s: 0.0,
                accept_to_final: Percentiles::default(),
                errors: 0,
                complete: true,
                exactly_once: true,
                cpu: Usage {
                    wall_s: 0.0,
                    machine_busy_pct: 0.0,
                    ms_per_op: Default::default(),
                    total_ms_per_op: 0.0,
                },
                notifications: None,
            },
            samples,
            jobs_table: None,
        }
    }

    #[test]
    fn the_backlog_series_sets_both_bursts_side_by_side_until_the_longer_ends() {
        let bursts = [
            burst(Transport::Rabbitmq, &[(0.0, 0), (0.5, 10), (1.2, 0)]),
            burst(
                Transport::Postgres,
                &[(0.0, 0), (0.9, 30), (1.9, 20), (2.4, 0)],
            ),
        ];
        let mut md = String::new();
        backlog_series(&mut md, &bursts);
        assert!(
            md.contains("| seconds | rabbitmq backlog | postgres backlog |"),
            "{md}"
        );
        assert!(
            md.contains("| 0 | 0 | 0 |\n| 1 | 10 | 30 |\n| 2 | – | 20 |\n"),
            "{md}"
        );
        assert!(!md.contains("| 3 |"), "{md}");
    }
}
