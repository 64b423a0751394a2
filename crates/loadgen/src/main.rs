//! `loadgen`: post orders at a running orderflow and report what happened.
//!
//! ```text
//! loadgen --orders 5000 --concurrency 32 --repeat-fraction 0.1
//! loadgen --duration 30 --rate 200 --express-fraction 0.05 --json
//! ```

use std::{process::ExitCode, time::Duration};

use anyhow::Context;
use clap::Parser;
use loadgen::{LoadOptions, Summary};
use sqlx::postgres::PgPoolOptions;

/// Post orders at order-api, wait until every accepted order is final,
/// notified and audited, and print rates, latency percentiles and the
/// exactly-once check.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// order-api's base URL.
    #[arg(long, env = "ORDER_API_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// order-api key to send (`api-keys create --client NAME` makes one).
    #[arg(long, env = "ORDERFLOW_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The services' database, read to follow each order to its end.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/orderflow"
    )]
    database_url: String,
    /// Send this many requests (repeats included).
    #[arg(long, short = 'n', required_unless_present = "duration")]
    orders: Option<u64>,
    /// Send for this many seconds.
    #[arg(long, short = 'd')]
    duration: Option<f64>,
    /// Requests per second (default: as fast as --concurrency allows).
    #[arg(long, short = 'r')]
    rate: Option<f64>,
    /// Requests in flight at most.
    #[arg(long, short = 'c', default_value_t = 32)]
    concurrency: usize,
    /// Fraction of requests that repeat an earlier idempotency key and body.
    #[arg(long, default_value_t = 0.0, value_parser = fraction)]
    repeat_fraction: f64,
    /// Fraction of new orders sent on the express lane.
    #[arg(long, default_value_t = 0.0, value_parser = fraction)]
    express_fraction: f64,
    /// SKUs to order, comma-separated; one is picked at random per order.
    #[arg(long, value_delimiter = ',', default_value = "WIDGET,GADGET,GIZMO")]
    skus: Vec<String>,
    /// Don't wait for the orders to finish; report the posting only.
    #[arg(long)]
    no_wait: bool,
    /// Give up waiting for the orders to finish after this many seconds.
    #[arg(long, default_value_t = 600.0)]
    wait_timeout: f64,
    /// Print the summary as JSON on stdout (no progress bar).
    #[arg(long)]
    json: bool,
}

fn fraction(value: &str) -> Result<f64, String> {
    let fraction: f64 = value
        .parse()
        .map_err(|_| format!("{value:?} is not a number"))?;
    if (0.0..=1.0).contains(&fraction) {
        Ok(fraction)
    } else {
        Err(format!("{fraction} is not between 0 and 1"))
    }
}

fn seconds(value: f64, what: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value)
        .with_context(|| format!("{what} must be a positive number of seconds"))
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(summary) if summary.ok() => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(2),
        Err(error) => {
            eprintln!("loadgen: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<Summary> {
    let pool = if cli.no_wait {
        None
    } else {
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(5))
            .connect(&cli.database_url)
            .await
            .context("connecting to the services' database (pass --no-wait to only post)")?;
        Some(pool)
    };
    let options = LoadOptions {
        url: cli.url.trim_end_matches('/').to_string(),
        requests: cli.orders,
        duration: cli.duration.map(|d| seconds(d, "--duration")).transpose()?,
        rate: cli.rate,
        concurrency: cli.concurrency,
        repeat_fraction: cli.repeat_fraction,
        express_fraction: cli.express_fraction,
        skus: cli.skus,
        progress: !cli.json,
        api_key: cli.api_key,
    };
    let posted = loadgen::post_orders(options).await?;
    let completion = match &pool {
        Some(pool) => Some(
            loadgen::await_completion(
                pool,
                &posted.accepted,
                seconds(cli.wait_timeout, "--wait-timeout")?,
                !cli.json,
            )
            .await?,
        ),
        None => None,
    };
    let summary = Summary::new(&posted, completion);
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!("{summary}");
    }
    Ok(summary)
}
