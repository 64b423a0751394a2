//! `orderflow-bench`: measures orderflow against the raw limits of its
//! broker and database on the same machine, in one run, and writes
//! `RESULTS.md`, `results.json` and `burst.csv` (which
//! `crates/bench/plot_burst.py` draws into `burst.png`). The end-to-end,
//! processor-count, low-load and burst stages run once per transport
//! (`WORK_QUEUE` and `EVENT_BUS` both `rabbitmq`, then both `postgres`),
//! side by side. Run it through `scripts/bench.sh`, which builds the
//! release binaries first.

mod before;
mod cpu;
mod jobs_table;
mod raw;
mod reference;
mod report;
mod system;
mod units;

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use loadgen::{LoadOptions, Percentiles, Posted};
use messaging::contracts::Lane;
use report::{
    Burst, Express, HttpRun, LowLoad, Machine, Memory, PerOrder, ProcessorStage, Rate, Raw,
    Reference, Results, Sample, ScalingRun,
};
use system::{Activity, Environment, ScratchDatabase, Shape, System, Transport};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Measure orderflow and the raw bounds of its broker and database"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Run every part briefly: proves the tool works, numbers mean little.
    #[arg(long)]
    quick: bool,
    /// Where RESULTS.md, results.json and burst.csv are written.
    #[arg(long, default_value = "bench")]
    out: PathBuf,
    /// Where each service's log goes.
    #[arg(long, default_value = "target/bench-logs")]
    log_dir: PathBuf,
    /// The service binaries (default: beside this one).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
    /// RabbitMQ's management API (default: beside AMQP_URL, port 15672).
    #[arg(long, env = "RABBITMQ_MANAGEMENT_URL", hide_env_values = true)]
    management_url: Option<String>,
    /// Postgres without a database name; each part gets a fresh database.
    #[arg(
        long,
        env = "BENCH_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432"
    )]
    postgres_url: String,
    /// Postgres for the jobs-table stage, without a database name (default:
    /// --postgres-url). The stage shows what autovacuum keeps the jobs
    /// table's size to, so it wants a server with autovacuum on.
    #[arg(long, env = "BENCH_JOBS_POSTGRES_URL")]
    jobs_postgres_url: Option<String>,
    /// The command line to print in RESULTS.md.
    #[arg(long, default_value = "scripts/bench.sh")]
    command_line: String,
    /// An earlier run to set beside this one in RESULTS.md's before/after
    /// table, as LABEL=PATH to its results.json (read before this run
    /// overwrites it); may be given more than once.
    #[arg(long, value_name = "LABEL=PATH", value_parser = before::Earlier::parse)]
    before: Vec<before::Earlier>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The reference server: axum with one sqlx INSERT per POST (used by the
    /// benchmark itself).
    BareAxum {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        database_url: String,
    },
    /// The reference pipeline: orderflow's hops with no guarantees beyond
    /// confirms and acks (used by the benchmark itself).
    ReferencePipeline {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        database_url: String,
    },
    /// One end-to-end run of the whole system, printed with its CPU per
    /// order by process group: for profiling one change without the full
    /// run (writes nothing).
    EndToEnd {
        #[arg(long, value_enum, default_value_t = Transport::Rabbitmq)]
        transport: Transport,
        #[arg(long, default_value_t = 2)]
        processors: usize,
        #[arg(long, default_value_t = 0)]
        payment_latency_ms: u64,
        #[arg(long, default_value_t = DEFAULT_PREFETCH)]
        prefetch: u16,
        #[arg(long, default_value_t = 10_000)]
        orders: u64,
    },
    /// The full run's low-load row alone (20 orders/s to one processor),
    /// printed: for setting the services of another build (--bin-dir)
    /// beside this one's on the same machine (writes nothing).
    LowLoad {
        #[arg(long, value_enum, default_value_t = Transport::Rabbitmq)]
        transport: Transport,
    },
    /// The full run's jobs-table stage alone: a million jobs (with --quick,
    /// 20,000) written, claimed and deleted through a private `jobs` table,
    /// its size read every tenth; then one-job commits with and without the
    /// jobs' NOTIFY, printed (writes nothing).
    JobsTable,
    /// The full run's processor-stage row alone (a backlog drained by two
    /// processors), printed (writes nothing).
    ProcessorStage,
    /// The full run's HTTP rows alone (bare axum + one INSERT, order-api as
    /// fast as it goes, order-api at half that rate), printed (writes
    /// nothing).
    Http,
}

/// How big each part is.
struct Sizes {
    amqp_messages: u64,
    postgres: Duration,
    http: Duration,
    warm_up: Duration,
    scaling_io_orders: u64,
    scaling_serial_orders: u64,
    scaling_cpu_orders: u64,
    burst_orders: u64,
    express_backlog: u64,
    express_orders: u64,
    low_load_orders: u64,
    stage_orders: u64,
    /// Jobs through the jobs-table stage, its size read every tenth.
    jobs: u64,
    /// How long one-job commits run with the NOTIFY, and how long without.
    notify: Duration,
}

impl Sizes {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                amqp_messages: 2_000,
                postgres: Duration::from_secs(2),
                http: Duration::from_secs(3),
                warm_up: Duration::from_millis(500),
                scaling_io_orders: 150,
                scaling_serial_orders: 40,
                scaling_cpu_orders: 300,
                burst_orders: 2_000,
                express_backlog: 500,
                express_orders: 20,
                low_load_orders: 60,
                stage_orders: 300,
                jobs: 20_000,
                notify: Duration::from_secs(2),
            }
        } else {
            Self {
                amqp_messages: 30_000,
                postgres: Duration::from_secs(10),
                http: Duration::from_secs(15),
                warm_up: Duration::from_secs(2),
                scaling_io_orders: 3_000,
                scaling_serial_orders: 600,
                scaling_cpu_orders: 10_000,
                burst_orders: 20_000,
                express_backlog: 5_000,
                express_orders: 100,
                low_load_orders: 600,
                stage_orders: 20_000,
                jobs: 1_000_000,
                notify: Duration::from_secs(10),
            }
        }
    }
}

/// Connections the load generator keeps busy when sending as fast as it can.
const CONCURRENCY: usize = 64;
/// Connections in order-api's pool (its DB_MAX_CONNECTIONS default): the raw
/// Postgres bound is measured at the same concurrency.
const SERVICE_POOL: usize = 10;
/// The processors' simulated payment I/O for the I/O-bound runs.
const PAYMENT_IO_MS: u64 = 20;
/// The processors' PREFETCH in the benchmark's runs (the services default to
/// 10): 40 in hand, in batches of BATCH_SIZE's default, 10.
const DEFAULT_PREFETCH: u16 = 40;
const WAIT: Duration = Duration::from_secs(900);
/// Orders per second in the low-load run.
const LOW_LOAD_RATE: f64 = 20.0;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(
        Command::BareAxum { port, database_url }
        | Command::ReferencePipeline { port, database_url },
    ) = &cli.command
    {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", *port)).await?;
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            stop.cancel();
        });
        return match cli.command {
            Some(Command::ReferencePipeline { .. }) => {
                reference::serve(
                    listener,
                    database_url,
                    &cli.amqp_url,
                    SERVICE_POOL as u32,
                    DEFAULT_PREFETCH,
                    shutdown,
                )
                .await
            }
            _ => raw::serve_bare_axum(listener, database_url, SERVICE_POOL as u32, shutdown).await,
        };
    }
    let bin_dir = match cli.bin_dir.clone() {
        Some(dir) => dir,
        None => std::env::current_exe()?
            .parent()
            .context("the benchmark binary has no directory")?
            .to_path_buf(),
    };
    std::fs::create_dir_all(&cli.out)?;
    std::fs::create_dir_all(&cli.log_dir)?;
    let environment = Environment {
        bin_dir,
        log_dir: cli.log_dir.clone(),
        amqp_url: cli.amqp_url.clone(),
        management_url: cli.management_url.clone(),
        postgres_url: cli.postgres_url.clone(),
    };
    if let Some(Command::EndToEnd {
        transport,
        processors,
        payment_latency_ms,
        prefetch,
        orders,
    }) = cli.command
    {
        let shape = Shape {
            transport,
            processors,
            payment_latency_ms,
            prefetch,
            subscribers: true,
        };
        let run = scaling_run(&environment, shape, orders).await?;
        println!("{}", serde_json::to_string_pretty(&run)?);
        return Ok(());
    }
    let sizes = Sizes::new(cli.quick);
    if let Some(Command::LowLoad { transport }) = cli.command {
        let row = low_load(&environment, &sizes, transport).await?;
        println!("{}", serde_json::to_string_pretty(&row)?);
        return Ok(());
    }
    if let Some(Command::JobsTable) = cli.command {
        let run = jobs_table(&cli, &environment, &sizes).await?;
        println!("{}", serde_json::to_string_pretty(&run)?);
        return Ok(());
    }
    if let Some(Command::ProcessorStage) = cli.command {
        let row = processor_stage(&environment, &sizes).await?;
        println!("{}", serde_json::to_string_pretty(&row)?);
        return Ok(());
    }
    if let Some(Command::Http) = cli.command {
        let runs = http_runs(&environment, &sizes).await?;
        println!("{}", serde_json::to_string_pretty(&runs)?);
        return Ok(());
    }
    // On Ctrl-C the run is dropped, and with it every service it started.
    let results = tokio::select! {
        results = run(&cli, &environment, &sizes) => results?,
        _ = tokio::signal::ctrl_c() => bail!(
            "interrupted: the services were stopped; drop the orderflow_bench_* databases by hand"
        ),
    };
    let json = serde_json::to_string_pretty(&results)?;
    std::fs::write(cli.out.join("results.json"), json)?;
    std::fs::write(
        cli.out.join("burst.csv"),
        report::burst_csv(&results.bursts),
    )?;
    let markdown = report::markdown(&results, &cli.before)?;
    std::fs::write(cli.out.join("RESULTS.md"), &markdown)?;
    println!("{}", report::summary_table(&results));
    println!("wrote {}", cli.out.join("RESULTS.md").display());
    if let Some(failure) = results.failures().first() {
        bail!("the run broke a guarantee: {failure}");
    }
    Ok(())
}

async fn run(cli: &Cli, environment: &Environment, sizes: &Sizes) -> anyhow::Result<Results> {
    let started = chrono::Utc::now();
    let clock = Instant::now();
    let machine = Machine::describe(environment).await;
    step("raw bounds: RabbitMQ publish-confirm → consume-ack, Postgres single-row commits");
    let raw = raw_bounds(environment, sizes).await?;
    step("HTTP: a bare axum handler with one INSERT, then order-api");
    let http = http_runs(environment, sizes).await?;
    step("the reference pipeline: the same hops, no guarantees beyond confirms and acks");
    let reference = reference_run(environment, sizes).await?;
    step("end to end with 1, 2 and 4 processors, on each transport");
    let mut scaling = Vec::new();
    for (payment_latency_ms, prefetch, orders) in [
        (PAYMENT_IO_MS, 1, sizes.scaling_serial_orders),
        (PAYMENT_IO_MS, DEFAULT_PREFETCH, sizes.scaling_io_orders),
        (0, DEFAULT_PREFETCH, sizes.scaling_cpu_orders),
    ] {
        for processors in [1, 2, 4] {
            // The transports take turns, so both see the machine about as busy.
            for transport in Transport::ALL {
                let shape = Shape {
                    transport,
                    processors,
                    payment_latency_ms,
                    prefetch,
                    subscribers: true,
                };
                scaling.push(scaling_run(environment, shape, orders).await?);
            }
        }
    }
    let (mut bursts, mut memory) = (Vec::new(), Vec::new());
    for transport in Transport::ALL {
        step(&format!(
            "load levelling: a burst of {} orders, {transport}",
            sizes.burst_orders
        ));
        let (burst, used) = burst(environment, sizes, transport).await?;
        bursts.push(burst);
        memory.extend(used);
    }
    step(&format!(
        "express lane: {} express orders behind {} standard ones",
        sizes.express_orders, sizes.express_backlog
    ));
    let express = express(environment, sizes).await?;
    step(&format!(
        "low load: {} orders at {LOW_LOAD_RATE:.0}/s, where there is nothing to batch",
        sizes.low_load_orders
    ));
    let mut low_loads = Vec::new();
    for transport in Transport::ALL {
        low_loads.push(low_load(environment, sizes, transport).await?);
    }
    step(&format!(
        "the processor stage: a backlog of {} orders drained by two processors",
        sizes.stage_orders
    ));
    let processor_stage = processor_stage(environment, sizes).await?;
    step(&format!(
        "the jobs table: {} jobs written, claimed and deleted; NOTIFY's cost to a commit",
        sizes.jobs
    ));
    let jobs_table = jobs_table(cli, environment, sizes).await?;
    Ok(Results {
        quick: cli.quick,
        started_at: started.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        took_s: clock.elapsed().as_secs_f64(),
        command: cli.command_line.clone(),
        machine,
        raw,
        http,
        reference,
        scaling,
        bursts,
        express,
        low_load: low_loads,
        processor_stage,
        jobs_table,
        memory,
    })
}

/// How long Postgres may take to count a backend's last commits: an idle
/// backend reports its counters within 10 s (PGSTAT_IDLE_INTERVAL).
const STATISTICS_LAG: Duration = Duration::from_secs(11);

/// The processor stage alone: orders posted while no processor runs (their
/// messages wait on the work queue, published), then drained by two
/// processors with no payment latency and no subscribers. The CPU is read
/// over the drain only, so it is what processing costs: the processors,
/// orderflow's Postgres, RabbitMQ, and the provider beside them.
async fn processor_stage(
    environment: &Environment,
    sizes: &Sizes,
) -> anyhow::Result<ProcessorStage> {
    let shape = Shape {
        transport: Transport::Rabbitmq,
        processors: 0,
        payment_latency_ms: 0,
        prefetch: DEFAULT_PREFETCH,
        subscribers: false,
    };
    let mut system = System::start(environment, "processor-stage", shape).await?;
    let posted = loadgen::post_orders(LoadOptions {
        progress: true,
        ..system.load(sizes.stage_orders, CONCURRENCY)
    })
    .await?;
    let orders = posted.accepted.len() as u64;
    system.wait_published(WAIT).await?;
    // Let the statistics catch up with order-api's last commits.
    tokio::time::sleep(STATISTICS_LAG).await;
    let activity_before = system.activity().await?;
    let before = cpu::snapshot(&system.pids());
    let start = system.clock().await?;
    system.start_processors(2).await?;
    let finished = system.wait_final(orders, WAIT).await?;
    let drained_s = system.seconds_since(start).await?;
    let usage = before.usage_since(&cpu::snapshot(&system.pids()), orders);
    tokio::time::sleep(STATISTICS_LAG).await;
    let activity_after = system.activity().await?;
    let per_order = |before: i64, after: i64| (after - before) as f64 / orders.max(1) as f64;
    let per_order_of = |before: &Activity, after: &Activity| PerOrder {
        commits: per_order(before.commits, after.commits),
        rows_written: per_order(before.rows_written, after.rows_written),
        statements: before
            .statements
            .zip(after.statements)
            .map(|(before, after)| per_order(before, after)),
    };
    let exactly_once = system.finals_once(orders).await?;
    system.stop().await?;
    let stage = ProcessorStage {
        orders,
        finished,
        drained_per_s: orders as f64 / drained_s.max(f64::EPSILON),
        exactly_once,
        orderflow_database: per_order_of(&activity_before.0, &activity_after.0),
        provider_database: per_order_of(&activity_before.1, &activity_after.1),
        cpu: usage,
    };
    eprintln!(
        "  drained {:.0}/s; per order, orderflow's Postgres {:.2} ms, {}; the provider's {:.2} ms, {}",
        stage.drained_per_s,
        stage.postgres_ms_per_order(),
        stage.orderflow_database,
        stage
            .cpu
            .ms_per_op
            .get(cpu::PROVIDER_POSTGRES)
            .copied()
            .unwrap_or(0.0),
        stage.provider_database
    );
    Ok(stage)
}

/// The jobs table's stage: [`jobs_table::run`] at this run's size, on
/// `--jobs-postgres-url`, with the services' pool size of clients for the
/// NOTIFY's cost.
async fn jobs_table(
    cli: &Cli,
    environment: &Environment,
    sizes: &Sizes,
) -> anyhow::Result<jobs_table::JobsTableRun> {
    let environment = Environment {
        postgres_url: cli
            .jobs_postgres_url
            .clone()
            .unwrap_or_else(|| environment.postgres_url.clone()),
        ..environment.clone()
    };
    jobs_table::run(
        &environment,
        sizes.jobs,
        sizes.jobs / 10,
        sizes.notify,
        SERVICE_POOL,
    )
    .await
}

fn step(what: &str) {
    eprintln!("\n==> {what}");
}

/// The JSON of an order as order-api publishes it, for the raw loops.
fn sample_payload() -> serde_json::Value {
    serde_json::json!({
        "schema_version": 1,
        "message_id": uuid::Uuid::new_v4(),
        "occurred_at": chrono::Utc::now(),
        "order_id": uuid::Uuid::new_v4(),
        "customer_id": "loadgen-42",
        "email": "loadgen@example.com",
        "items": [{"sku": "WIDGET", "quantity": 2, "unit_price_cents": 1999}],
        "total_cents": 3998,
        "currency": "EUR",
        "lane": "standard",
        "callback_url": null,
    })
}

async fn raw_bounds(environment: &Environment, sizes: &Sizes) -> anyhow::Result<Raw> {
    let payload = sample_payload();
    let bytes = serde_json::to_vec(&payload)?;
    let queue = |kind: &str| format!("bench-raw-{kind}-{}", uuid::Uuid::new_v4().simple());
    let amqp_serial = raw::amqp_confirm_loop(
        &environment.amqp_url,
        &queue("serial"),
        &bytes,
        sizes.amqp_messages / 4,
        1,
    )
    .await
    .context("the serial publish-confirm loop")?;
    eprintln!(
        "publish, await confirm, one at a time: {:.0}/s",
        amqp_serial.per_second()
    );
    let amqp_pipelined = raw::amqp_confirm_loop(
        &environment.amqp_url,
        &queue("pipelined"),
        &bytes,
        sizes.amqp_messages,
        CONCURRENCY,
    )
    .await
    .context("the pipelined publish-confirm loop")?;
    eprintln!(
        "publish-confirm with {CONCURRENCY} in flight: {:.0}/s",
        amqp_pipelined.per_second()
    );
    let database = ScratchDatabase::create(environment, "raw").await?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(SERVICE_POOL as u32)
        .connect(&database.url)
        .await?;
    let mut postgres = Vec::new();
    for concurrency in [1, SERVICE_POOL] {
        let table = format!("raw_inserts_{concurrency}");
        let run = raw::postgres_inserts(&pool, &table, &payload, concurrency, sizes.postgres)
            .await
            .context("the Postgres insert loop")?;
        eprintln!(
            "Postgres single-row commits, {concurrency} clients: {:.0}/s",
            run.per_second()
        );
        postgres.push(Rate::of(
            &format!("{concurrency} clients"),
            &run,
            concurrency,
        ));
    }
    pool.close().await;
    database.drop().await?;
    Ok(Raw {
        payload_bytes: bytes.len(),
        amqp: vec![
            Rate::of("one confirm awaited at a time", &amqp_serial, 1),
            Rate::of(
                &format!("{CONCURRENCY} publishers sharing a channel"),
                &amqp_pipelined,
                CONCURRENCY,
            ),
        ],
        postgres,
    })
}

/// POST as fast as `concurrency` allows (or at `rate`) for `duration`,
/// after a warm-up whose answers are not counted.
async fn hammer(
    url: &str,
    api_key: Option<&str>,
    sizes: &Sizes,
    concurrency: usize,
    rate: Option<f64>,
    watched: &[(String, u32)],
) -> anyhow::Result<(Posted, cpu::Usage)> {
    let options = |duration| LoadOptions {
        requests: None,
        duration: Some(duration),
        rate,
        api_key: api_key.map(str::to_owned),
        ..LoadOptions::new(url, 0, concurrency)
    };
    loadgen::post_orders(options(sizes.warm_up)).await?;
    let before = cpu::snapshot(watched);
    let posted = loadgen::post_orders(LoadOptions {
        progress: true,
        ..options(sizes.http)
    })
    .await?;
    let usage = before.usage_since(&cpu::snapshot(watched), posted.requests);
    Ok((posted, usage))
}

async fn http_runs(environment: &Environment, sizes: &Sizes) -> anyhow::Result<Vec<HttpRun>> {
    let mut runs = Vec::new();

    let database = ScratchDatabase::create(environment, "bare").await?;
    let bare = Helper::start("bare-axum", "bare axum", &database, environment).await?;
    let (posted, usage) = hammer(&bare.url, None, sizes, CONCURRENCY, None, &bare.watched).await?;
    eprintln!(
        "bare axum + one INSERT: {:.0}/s",
        posted.answers_per_second()
    );
    runs.push(HttpRun::of(
        "bare axum handler, one INSERT",
        CONCURRENCY,
        None,
        &posted,
        usage,
    ));
    bare.stop().await;
    database.drop().await?;

    let (posted, usage) = order_api_alone(environment, sizes, "http", None).await?;
    let full_rate = posted.accepted_per_second();
    eprintln!("order-api accepting: {full_rate:.0}/s");
    runs.push(HttpRun::of(
        "order-api, as fast as it goes",
        CONCURRENCY,
        None,
        &posted,
        usage,
    ));
    let half = (full_rate / 2.0).max(1.0);
    let (posted, usage) = order_api_alone(environment, sizes, "http-half", Some(half)).await?;
    eprintln!(
        "order-api at {half:.0}/s: p99 {:.1} ms",
        Percentiles::of_micros(&posted.latency).p99_ms
    );
    runs.push(HttpRun::of(
        "order-api at half that rate",
        CONCURRENCY,
        Some(half),
        &posted,
        usage,
    ));
    Ok(runs)
}

/// order-api alone, posted to as fast as it goes or at `rate`: accepting is
/// all that is measured, so nothing else competes for the two cores; the
/// accepted orders wait on their queue. Each run starts from an empty system:
/// without processors a full-rate run leaves tens of thousands of orders
/// behind, and a run after it would measure Postgres and RabbitMQ keeping up
/// with that backlog (checkpoints, a queue only ever growing) as much as
/// order-api.
async fn order_api_alone(
    environment: &Environment,
    sizes: &Sizes,
    name: &str,
    rate: Option<f64>,
) -> anyhow::Result<(Posted, cpu::Usage)> {
    let shape = Shape {
        transport: Transport::Rabbitmq,
        processors: 0,
        payment_latency_ms: 0,
        prefetch: DEFAULT_PREFETCH,
        subscribers: false,
    };
    let system = System::start(environment, name, shape).await?;
    let measured = hammer(
        &system.api_url(),
        Some(system.api_key()),
        sizes,
        CONCURRENCY,
        rate,
        &system.pids(),
    )
    .await;
    system.stop().await?;
    measured
}

/// The reference pipeline with as many orders as the no-I/O end-to-end
/// runs, posted as fast as they go: orders over the time from the first
/// POST to the last order acked by both subscribers.
async fn reference_run(environment: &Environment, sizes: &Sizes) -> anyhow::Result<Reference> {
    let database = ScratchDatabase::create(environment, "reference").await?;
    let pipeline = Helper::start(
        "reference-pipeline",
        "reference pipeline",
        &database,
        environment,
    )
    .await?;
    let (url, watched) = (&pipeline.url, &pipeline.watched);
    let orders = sizes.scaling_cpu_orders;
    let before = cpu::snapshot(watched);
    let started = Instant::now();
    let posted = loadgen::post_orders(LoadOptions {
        progress: true,
        ..LoadOptions::new(url, orders, CONCURRENCY)
    })
    .await?;
    let accepted = posted.accepted.len() as u64;
    let client = reqwest::Client::new();
    loop {
        let done: u64 = client
            .get(format!("{url}/done"))
            .send()
            .await?
            .text()
            .await?
            .parse()?;
        if done >= accepted {
            break;
        }
        if started.elapsed() > WAIT {
            bail!("the reference pipeline finished {done} of {accepted} orders in {WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    let usage = before.usage_since(&cpu::snapshot(watched), accepted);
    let completed_per_s = accepted as f64 / elapsed.as_secs_f64();
    eprintln!("reference pipeline end to end: {completed_per_s:.0}/s");
    pipeline.stop().await;
    database.drop().await?;
    Ok(Reference {
        orders: accepted,
        errors: posted.errors.values().sum(),
        completed_per_s,
        cpu: usage,
    })
}

/// One of this binary's own servers (a subcommand) on a scratch database.
struct Helper {
    child: tokio::process::Child,
    url: String,
    /// Its pid, for the CPU table.
    watched: Vec<(String, u32)>,
}

impl Helper {
    async fn start(
        subcommand: &str,
        name: &str,
        database: &ScratchDatabase,
        environment: &Environment,
    ) -> anyhow::Result<Self> {
        let port = test_support::process::free_port();
        let child = tokio::process::Command::new(std::env::current_exe()?)
            .args([subcommand, "--port"])
            .arg(port.to_string())
            .args(["--database-url", &database.url])
            .env("AMQP_URL", &environment.amqp_url)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting the {name}"))?;
        wait_for_port(port).await?;
        let watched = child
            .id()
            .map(|pid| (name.to_owned(), pid))
            .into_iter()
            .collect();
        Ok(Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            watched,
        })
    }

    /// Stop it with SIGINT, as a person would, and wait a while for it.
    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-INT", &pid.to_string()])
                .status();
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

async fn wait_for_port(port: u16) -> anyhow::Result<()> {
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("nothing listens on port {port} after 10 s")
}

async fn scaling_run(
    environment: &Environment,
    shape: Shape,
    orders: u64,
) -> anyhow::Result<ScalingRun> {
    eprintln!(
        "{}: {} processor(s), prefetch {}, {} ms payment I/O, {orders} orders",
        shape.transport, shape.processors, shape.prefetch, shape.payment_latency_ms
    );
    let system = System::start(
        environment,
        &format!(
            "scaling-{}-{}ms-prefetch{}-{}p",
            shape.transport, shape.payment_latency_ms, shape.prefetch, shape.processors
        ),
        shape,
    )
    .await?;
    let watched = system.pids();
    let notified_before = system.notifications();
    let before = cpu::snapshot(&watched);
    let posted = loadgen::post_orders(LoadOptions {
        progress: true,
        ..system.load(orders, CONCURRENCY)
    })
    .await?;
    let completion = loadgen::await_completion(&system.pool, &posted.accepted, WAIT, true).await?;
    let usage = before.usage_since(&cpu::snapshot(&watched), posted.accepted.len() as u64);
    let notifications = notified_before
        .zip(system.notifications())
        .map(|(before, after)| after.since(before));
    eprintln!(
        "  end to end {:.0}/s, exactly once: {}",
        completion.completed_per_s, completion.exactly_once.ok
    );
    system.stop().await?;
    Ok(ScalingRun::of(shape, &posted, completion, usage).with(notifications))
}

/// Orders at a steady [`LOW_LOAD_RATE`] to one processor with no payment
/// I/O: what batching must not cost when every batch is one order.
async fn low_load(
    environment: &Environment,
    sizes: &Sizes,
    transport: Transport,
) -> anyhow::Result<LowLoad> {
    let shape = Shape {
        transport,
        processors: 1,
        payment_latency_ms: 0,
        prefetch: DEFAULT_PREFETCH,
        subscribers: true,
    };
    let system = System::start(environment, &format!("low-load-{transport}"), shape).await?;
    let posted = loadgen::post_orders(LoadOptions {
        rate: Some(LOW_LOAD_RATE),
        progress: true,
        ..system.load(sizes.low_load_orders, CONCURRENCY)
    })
    .await?;
    let completion = loadgen::await_completion(&system.pool, &posted.accepted, WAIT, true).await?;
    system.stop().await?;
    let low_load = LowLoad::of(transport, LOW_LOAD_RATE, &posted, &completion);
    eprintln!(
        "  {transport}: POST p99 {:.1} ms, accept→final p50 {:.1} ms",
        low_load.post.p99_ms, low_load.accept_to_final.p50_ms
    );
    Ok(low_load)
}

/// 20,000 orders as fast as they can be posted at two processors with
/// payment I/O, sampling the backlog, progress and memory as they drain.
/// With the Postgres transport the jobs table's size is read at the end.
async fn burst(
    environment: &Environment,
    sizes: &Sizes,
    transport: Transport,
) -> anyhow::Result<(Burst, Vec<Memory>)> {
    let shape = Shape {
        transport,
        processors: 2,
        payment_latency_ms: PAYMENT_IO_MS,
        prefetch: DEFAULT_PREFETCH,
        subscribers: true,
    };
    let system = Arc::new(System::start(environment, &format!("burst-{transport}"), shape).await?);
    // Let start-up allocations settle before reading the idle size.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = system.rss();

    let done = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn({
        let system = system.clone();
        let done = done.clone();
        async move {
            let started = Instant::now();
            let mut samples = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let (accepted, finished) = system.order_counts().await?;
                let backlog = system.backlog().await?;
                samples.push(Sample {
                    t_s: started.elapsed().as_secs_f64(),
                    accepted,
                    finished,
                    backlog,
                    rss_bytes: system
                        .rss()
                        .into_iter()
                        .map(|(_, rss)| rss.unwrap_or(0))
                        .collect(),
                });
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            anyhow::Ok(samples)
        }
    });
    let watched = system.pids();
    let before = cpu::snapshot(&watched);
    let posted = loadgen::post_orders(LoadOptions {
        progress: true,
        ..system.load(sizes.burst_orders, CONCURRENCY)
    })
    .await?;
    let completion = loadgen::await_completion(&system.pool, &posted.accepted, WAIT, true).await?;
    let usage = before.usage_since(&cpu::snapshot(&watched), posted.accepted.len() as u64);
    // A last second of samples shows the queue empty and memory settling.
    tokio::time::sleep(Duration::from_secs(1)).await;
    done.store(true, Ordering::Relaxed);
    let samples = sampler.await.context("the sampler panicked")??;
    let jobs_table = match transport {
        Transport::Postgres => Some(jobs_table::TableSize::of_jobs(&system.pool).await?),
        Transport::Rabbitmq => None,
    };
    let system = Arc::into_inner(system).context("the sampler still holds the system")?;
    let names: Vec<String> = system
        .services
        .iter()
        .map(|service| service.name.clone())
        .collect();
    let memory = names
        .iter()
        .enumerate()
        .map(|(i, name)| Memory {
            transport,
            service: name.clone(),
            idle_bytes: idle.get(i).and_then(|(_, rss)| *rss).unwrap_or(0),
            peak_bytes: samples
                .iter()
                .filter_map(|sample| sample.rss_bytes.get(i).copied())
                .max()
                .unwrap_or(0),
        })
        .collect();
    eprintln!(
        "  accepted {:.0}/s, completed {:.0}/s, deepest backlog {}",
        posted.accepted_per_second(),
        completion.completed_per_s,
        samples
            .iter()
            .map(|sample| sample.backlog)
            .max()
            .unwrap_or(0)
    );
    system.stop().await?;
    Ok((
        Burst {
            transport,
            processors: shape.processors,
            payment_latency_ms: shape.payment_latency_ms,
            services: names,
            run: ScalingRun::of(shape, &posted, completion, usage),
            samples,
            jobs_table,
        },
        memory,
    ))
}

/// A standard backlog queued while no processor runs; then two processors
/// start and express and standard orders arrive side by side.
async fn express(environment: &Environment, sizes: &Sizes) -> anyhow::Result<Express> {
    let processors = 2;
    let mut system = System::start(
        environment,
        "express",
        Shape {
            transport: Transport::Rabbitmq,
            processors: 0,
            payment_latency_ms: PAYMENT_IO_MS,
            prefetch: DEFAULT_PREFETCH,
            subscribers: true,
        },
    )
    .await?;
    let backlog = loadgen::post_orders(LoadOptions {
        progress: true,
        ..system.load(sizes.express_backlog, CONCURRENCY)
    })
    .await?;
    // The outbox publishes right after each commit; give stragglers a moment.
    let mut depth = 0;
    for _ in 0..50 {
        depth = system.queue_depth(Lane::Standard).await?;
        if u64::from(depth) >= backlog.accepted.len() as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("  backlog of {depth} standard orders; starting {processors} processors");
    system.start_processors(processors).await?;
    let rate = 50.0;
    let side_by_side = |express: f64| LoadOptions {
        rate: Some(rate),
        express_fraction: express,
        ..system.load(sizes.express_orders, 8)
    };
    let (express, standard) = tokio::join!(
        loadgen::post_orders(side_by_side(1.0)),
        loadgen::post_orders(side_by_side(0.0))
    );
    let (express, standard) = (express?, standard?);
    let express_done =
        loadgen::await_completion(&system.pool, &express.accepted, WAIT, true).await?;
    let standard_done =
        loadgen::await_completion(&system.pool, &standard.accepted, WAIT, true).await?;
    let backlog_done =
        loadgen::await_completion(&system.pool, &backlog.accepted, WAIT, true).await?;
    let lane = |completion: &loadgen::Completion, lane: &str| {
        completion
            .accept_to_final
            .get(lane)
            .copied()
            .unwrap_or_default()
    };
    let result = Express {
        backlog: u64::from(depth),
        processors,
        payment_latency_ms: PAYMENT_IO_MS,
        rate_per_lane: rate,
        express: lane(&express_done, "express"),
        standard_alongside: lane(&standard_done, "standard"),
        backlog_standard: lane(&backlog_done, "standard"),
        exactly_once: [&express_done, &standard_done, &backlog_done]
            .iter()
            .all(|completion| completion.complete && completion.exactly_once.ok),
        errors: express
            .errors
            .values()
            .chain(standard.errors.values())
            .sum::<u64>()
            + backlog.errors.values().sum::<u64>(),
    };
    eprintln!(
        "  express p99 {:.0} ms, standard alongside p99 {:.0} ms",
        result.express.p99_ms, result.standard_alongside.p99_ms
    );
    system.stop().await?;
    Ok(result)
}
