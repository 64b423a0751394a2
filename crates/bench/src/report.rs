//! What a benchmark run measured, and how it is written down: RESULTS.md,
//! results.json, burst.csv and the summary table printed at the end.

use std::fmt::Write;

use loadgen::{Completion, Percentiles, Posted};
use serde::Serialize;

use crate::{
    before,
    cpu::Usage,
    raw::Throughput,
    system::{Environment, Shape},
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
    pub scaling: Vec<ScalingRun>,
    pub burst: Burst,
    pub express: Express,
    pub low_load: LowLoad,
    pub processor_stage: ProcessorStage,
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
        let postgres = match environment.admin_pool().await {
            Ok(pool) => {
                sqlx::query_scalar!(r#"SELECT current_setting('server_version') AS "version!""#)
                    .fetch_one(&pool)
                    .await
                    .unwrap_or_else(|error| format!("unknown ({error})"))
            }
            Err(error) => format!("unknown ({error})"),
        };
        Self {
            cpu: field(&cpuinfo, "model name").unwrap_or_else(|| "unknown".into()),
            cores: std::thread::available_parallelism().map_or(0, usize::from),
            memory_gib: memory_kib / 1024.0 / 1024.0,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map_or_else(|_| "unknown".into(), |kernel| kernel.trim().to_string()),
            rabbitmq: rabbitmq_version(),
            postgres,
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
}

impl ScalingRun {
    pub fn of(shape: Shape, posted: &Posted, completion: Completion, cpu: Usage) -> Self {
        Self {
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
        }
    }
}

/// One reading taken every 250 ms during the burst.
#[derive(Debug, Serialize)]
pub struct Sample {
    pub t_s: f64,
    pub accepted: i64,
    pub finished: i64,
    pub queue_depth: u32,
    /// In the order of [`Burst::services`].
    pub rss_bytes: Vec<u64>,
}

#[derive(Debug, Serialize)]
pub struct Burst {
    pub processors: usize,
    pub payment_latency_ms: u64,
    pub services: Vec<String>,
    pub run: ScalingRun,
    pub samples: Vec<Sample>,
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
    pub fn of(rate: f64, posted: &Posted, completion: &Completion) -> Self {
        let lane = |by_lane: &std::collections::BTreeMap<String, Percentiles>| {
            by_lane.get("standard").cloned().unwrap_or_default()
        };
        Self {
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
    pub service: String,
    pub idle_bytes: u64,
    pub peak_bytes: u64,
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1024.0 / 1024.0
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

/// One row of the targets table.
struct Target {
    name: &'static str,
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
        processors: usize,
        payment_latency_ms: u64,
        prefetch: u16,
    ) -> Option<&ScalingRun> {
        self.scaling.iter().find(|run| {
            run.processors == processors
                && run.payment_latency_ms == payment_latency_ms
                && run.prefetch == prefetch
        })
    }

    /// Guarantees the run broke (not performance targets): errors, lost or
    /// doubled effects.
    pub fn failures(&self) -> Vec<String> {
        let mut failures = Vec::new();
        for run in self.scaling.iter().chain([&self.burst.run]) {
            if !run.complete || !run.exactly_once || run.errors > 0 {
                failures.push(format!(
                    "{} processor(s), {} ms: complete {}, exactly once {}, errors {}",
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
        let low = &self.low_load;
        if !low.complete || !low.exactly_once || low.errors > 0 {
            failures.push(format!(
                "low load: complete {}, exactly once {}, errors {}",
                low.complete, low.exactly_once, low.errors
            ));
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
                name: "order-api accept rate vs bare axum + one INSERT",
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
                name: "p99 POST latency at half that rate",
                goal: "≤ 25 ms".into(),
                measured: format!("{:.1} ms at {:.0}/s", half.latency.p99_ms, half.per_s),
                met: half.latency.p99_ms <= 25.0,
            });
        }
        let best_cpu = self
            .scaling
            .iter()
            .filter(|run| run.payment_latency_ms == 0)
            .max_by(|a, b| a.completed_per_s.total_cmp(&b.completed_per_s));
        if let Some(best) = best_cpu {
            targets.push(Target {
                name: "end to end, no simulated I/O (best processor count)",
                goal: "≥ 1,000 orders/s".into(),
                measured: format!(
                    "{:.0}/s with {} processor(s)",
                    best.completed_per_s, best.processors
                ),
                met: best.completed_per_s >= 1000.0,
            });
            let share = ratio(best.completed_per_s, self.reference.completed_per_s);
            targets.push(Target {
                name: "end to end vs the reference pipeline (same hops, confirms and acks only)",
                goal: "≥ 0.7×".into(),
                measured: format!(
                    "{share:.2}× ({:.0}/s vs {:.0}/s)",
                    best.completed_per_s, self.reference.completed_per_s
                ),
                met: share >= 0.7,
            });
            targets.push(Target {
                name: "CPU per order end to end (best no-I/O run), the stand-in provider's share apart",
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
                self.scaling(1, crate::PAYMENT_IO_MS, prefetch),
                self.scaling(4, crate::PAYMENT_IO_MS, prefetch),
            ) {
                let scale = ratio(four.completed_per_s, one.completed_per_s);
                targets.push(Target {
                    name,
                    goal: "≥ 3.5×".into(),
                    measured: format!(
                        "{scale:.2}× ({:.0}/s vs {:.0}/s)",
                        four.completed_per_s, one.completed_per_s
                    ),
                    met: scale >= 3.5,
                });
            }
        }
        let low = &self.low_load;
        targets.push(Target {
            name: "p99 POST latency at 20 orders/s (nothing to batch)",
            goal: "≤ 10 ms".into(),
            measured: format!("{:.1} ms (p50 {:.1} ms)", low.post.p99_ms, low.post.p50_ms),
            met: low.post.p99_ms <= 10.0,
        });
        targets.push(Target {
            name: "accept→final p50 at 20 orders/s",
            goal: "≤ 6 ms".into(),
            measured: format!(
                "{:.1} ms (accept→notified and audited p50 {:.1} ms)",
                low.accept_to_final.p50_ms, low.accept_to_done.p50_ms
            ),
            met: low.accept_to_final.p50_ms <= 6.0,
        });
        let stage = &self.processor_stage;
        targets.push(Target {
            name: "orderflow's Postgres CPU per order, the processor stage (a backlog, two processors, no payment latency)",
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
            name: "express accept→final p99 behind the backlog",
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
                name: "idle RSS per service",
                goal: "≤ 30 MB".into(),
                measured: format!(
                    "largest {:.1} MiB ({})",
                    mib(fattest.idle_bytes),
                    fattest.service
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
            name: "processor peak RSS during the burst vs idle",
            goal: "≤ 2×".into(),
            measured: format!("{processor_growth:.2}×"),
            met: processor_growth > 0.0 && processor_growth <= 2.0,
        });
        targets
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
    let _ = writeln!(md, "| PostgreSQL | {} |\n", m.postgres);

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
         consumers scaling while the I/O wait, not the CPU, is the limit.\n",
        crate::CONCURRENCY,
        crate::DEFAULT_PREFETCH
    );
    let _ = writeln!(
        md,
        "| payment I/O | prefetch | processors | orders | accepted/s | completed/s | vs 1 processor | accept→final p50 ms | p99 ms | exactly once |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|");
    for run in &results.scaling {
        let one = results
            .scaling(1, run.payment_latency_ms, run.prefetch)
            .map_or(0.0, |one| one.completed_per_s);
        let _ = writeln!(
            md,
            "| {} ms | {} | {} | {} | {:.0} | {:.0} | {:.2}× | {:.0} | {:.0} | {} |",
            run.payment_latency_ms,
            run.prefetch,
            run.processors,
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
    let best = results
        .scaling
        .iter()
        .filter(|run| run.payment_latency_ms == 0)
        .map(|run| run.completed_per_s)
        .fold(0.0, f64::max);
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
         {:.1} CPU-ms per order ({}). orderflow's best no-I/O run above: **{:.2}×** that rate.\n",
        crate::DEFAULT_PREFETCH,
        reference.orders,
        crate::CONCURRENCY,
        reference.completed_per_s,
        reference.cpu.total_ms_per_op,
        groups.join(", "),
        ratio(best, reference.completed_per_s)
    );

    cpu_section(&mut md, results);

    let burst = &results.burst;
    let deepest = burst
        .samples
        .iter()
        .map(|sample| sample.queue_depth)
        .max()
        .unwrap_or(0);
    let _ = writeln!(
        md,
        "\n## 4. Load levelling: a burst of {} orders\n\n![queue depth and completion during the burst](burst.png)\n\n\
         {} processors with {} ms payment I/O. The client posted as fast as {} connections allow: \
         order-api accepted **{:.0}/s** (POST p50 {:.1} ms, p99 {:.1} ms) while the processors \
         drained at **{:.0}/s**; the standard queue peaked at **{deepest}** messages. \
         Exactly once: {}. The samples are in `burst.csv`.\n",
        burst.run.orders,
        burst.processors,
        burst.payment_latency_ms,
        crate::CONCURRENCY,
        burst.run.accepted_per_s,
        burst.run.post_latency.p50_ms,
        burst.run.post_latency.p99_ms,
        burst.run.completed_per_s,
        if burst.run.exactly_once {
            "yes"
        } else {
            "**NO**"
        }
    );

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

    let low = &results.low_load;
    let _ = writeln!(
        md,
        "## 6. Low load\n\n{} orders posted at a steady {:.0}/s to one processor with no \
         payment I/O: every batch is one order, so this is what batching must not cost. In ms:\n",
        low.orders, low.rate
    );
    let _ = writeln!(
        md,
        "| | count | p50 | p90 | p99 | max |\n|---|---|---|---|---|---|"
    );
    for (what, p) in [
        ("POST answered", &low.post),
        ("accept → final status", &low.accept_to_final),
        ("accept → notified and audited", &low.accept_to_done),
    ] {
        let _ = writeln!(md, "| {what} | {} | {} |", p.count, percentiles_cells(p));
    }
    let _ = writeln!(md);

    let _ = writeln!(
        md,
        "## 7. Memory\n\nResident set size of each service of the burst's system: idle (2 s \
         after start-up) and the largest reading during the burst (sampled every 250 ms).\n"
    );
    let _ = writeln!(
        md,
        "| service | idle MiB | peak MiB | peak / idle |\n|---|---|---|---|"
    );
    for memory in &results.memory {
        let _ = writeln!(
            md,
            "| {} | {:.1} | {:.1} | {:.2}× |",
            memory.service,
            mib(memory.idle_bytes),
            mib(memory.peak_bytes),
            ratio(memory.peak_bytes as f64, memory.idle_bytes as f64)
        );
    }
    let _ = writeln!(
        md,
        "\n## How to reproduce\n\n```\nscripts/bench.sh           # this whole run, ~10 minutes\nscripts/bench.sh --quick   # every part briefly\n```\n\n\
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

/// The burst's samples as CSV, for the plot.
pub fn burst_csv(burst: &Burst) -> String {
    let mut csv = String::from("t_s,accepted,finished,queue_depth");
    for service in &burst.services {
        let _ = write!(csv, ",rss_mib_{service}");
    }
    csv.push('\n');
    for sample in &burst.samples {
        let _ = write!(
            csv,
            "{:.3},{},{},{}",
            sample.t_s, sample.accepted, sample.finished, sample.queue_depth
        );
        for rss in &sample.rss_bytes {
            let _ = write!(csv, ",{:.1}", mib(*rss));
        }
        csv.push('\n');
    }
    csv
}

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
                        "end to end, {} processor(s), no I/O (per order)",
                        run.processors
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
    let order = [
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
    let groups: Vec<&str> = order
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
