//! Load for orderflow: post orders at order-api, wait until every accepted
//! order has reached its final status and been notified and audited, and
//! measure what happened. The `loadgen` binary is the command-line face of
//! this library; `orderflow-bench` drives it for its measurements.

use std::{
    collections::{BTreeMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

/// How much load to send, and of what kind.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// order-api's base URL, e.g. `http://127.0.0.1:8080`.
    pub url: String,
    /// Stop after this many requests (repeats included)...
    pub requests: Option<u64>,
    /// ...or after this long, whichever comes first.
    pub duration: Option<Duration>,
    /// Requests per second; `None` sends as fast as `concurrency` allows.
    pub rate: Option<f64>,
    /// Requests in flight at most.
    pub concurrency: usize,
    /// Fraction of requests that repeat an earlier request's idempotency
    /// key and body (a client retry); each must be answered by a replay.
    pub repeat_fraction: f64,
    /// Fraction of new orders sent with `express: true`.
    pub express_fraction: f64,
    /// SKUs to order, one chosen at random per order.
    pub skus: Vec<String>,
    /// Show a progress bar on stderr (only drawn on a terminal).
    pub progress: bool,
    /// Sent as `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
}

impl LoadOptions {
    /// `requests` orders as fast as `concurrency` allows, standard lane, no
    /// repeats.
    pub fn new(url: impl Into<String>, requests: u64, concurrency: usize) -> Self {
        Self {
            url: url.into(),
            requests: Some(requests),
            duration: None,
            rate: None,
            concurrency,
            repeat_fraction: 0.0,
            express_fraction: 0.0,
            skus: vec!["WIDGET".into(), "GADGET".into(), "GIZMO".into()],
            progress: false,
            api_key: None,
        }
    }
}

/// One accepted order: its id and when the client had the answer.
#[derive(Debug, Clone, Copy)]
pub struct Accepted {
    pub order_id: Uuid,
    pub express: bool,
}

/// What the posting phase saw.
#[derive(Debug)]
pub struct Posted {
    /// Every request sent, repeats included.
    pub requests: u64,
    /// New orders answered with 202 (each a distinct order).
    pub accepted: Vec<Accepted>,
    /// Repeats answered with `Idempotent-Replayed: true` and the same order.
    pub replayed: u64,
    /// Repeats answered as a replay but naming a different order: must be 0.
    pub replay_mismatches: u64,
    /// Failed requests by kind (`http 503`, `timeout`, `connect`, ...).
    pub errors: BTreeMap<String, u64>,
    /// From the first request sent to the last answer.
    pub elapsed: Duration,
    /// Latency of every answered 2xx POST, in microseconds. With a `rate`,
    /// measured from when the request was due, so a client that falls behind
    /// shows it.
    pub latency: Histogram<u64>,
}

impl Posted {
    /// New orders accepted per second of posting.
    pub fn accepted_per_second(&self) -> f64 {
        per_second(self.accepted.len() as u64, self.elapsed)
    }

    /// 2xx answers (new and replayed) per second of posting.
    pub fn answers_per_second(&self) -> f64 {
        per_second(self.accepted.len() as u64 + self.replayed, self.elapsed)
    }
}

fn per_second(count: u64, elapsed: Duration) -> f64 {
    if elapsed.is_zero() {
        0.0
    } else {
        count as f64 / elapsed.as_secs_f64()
    }
}

/// A request answered with 202: what a repeat sends again.
#[derive(Clone)]
struct Sent {
    key: String,
    body: Arc<Vec<u8>>,
    order_id: Uuid,
}

struct Shared {
    client: reqwest::Client,
    options: LoadOptions,
    started: Instant,
    next: AtomicU64,
    /// Requests that were answered with 202, for repeats to pick from.
    sent: Mutex<Vec<Sent>>,
    progress: ProgressBar,
}

#[derive(Default)]
struct Tally {
    requests: u64,
    accepted: Vec<Accepted>,
    replayed: u64,
    replay_mismatches: u64,
    errors: BTreeMap<String, u64>,
    latency: Option<Histogram<u64>>,
    last_answer: Option<Instant>,
}

/// Send the load described by `options` and tally the answers.
pub async fn post_orders(options: LoadOptions) -> anyhow::Result<Posted> {
    anyhow::ensure!(options.concurrency > 0, "concurrency must be at least 1");
    anyhow::ensure!(
        options.requests.is_some() || options.duration.is_some(),
        "give a number of requests or a duration"
    );
    anyhow::ensure!(!options.skus.is_empty(), "give at least one SKU");
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(key) = &options.api_key {
        let mut value = reqwest::header::HeaderValue::try_from(format!("Bearer {key}"))
            .context("the API key is not a valid header value")?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(options.concurrency)
        .default_headers(headers)
        .build()
        .context("building the HTTP client")?;
    let progress = progress_bar(&options);
    let shared = Arc::new(Shared {
        client,
        started: Instant::now(),
        next: AtomicU64::new(0),
        sent: Mutex::new(Vec::new()),
        progress,
        options,
    });
    let workers: Vec<_> = (0..shared.options.concurrency)
        .map(|_| tokio::spawn(worker(shared.clone())))
        .collect();
    let mut total = Tally::default();
    for worker in workers {
        let tally = worker.await.context("a load worker panicked")??;
        total.requests += tally.requests;
        total.accepted.extend(tally.accepted);
        total.replayed += tally.replayed;
        total.replay_mismatches += tally.replay_mismatches;
        for (kind, count) in tally.errors {
            *total.errors.entry(kind).or_default() += count;
        }
        if let Some(latency) = tally.latency {
            match &mut total.latency {
                Some(all) => all.add(latency).context("merging latencies")?,
                None => total.latency = Some(latency),
            }
        }
        total.last_answer = total.last_answer.max(tally.last_answer);
    }
    shared.progress.finish_and_clear();
    Ok(Posted {
        requests: total.requests,
        accepted: total.accepted,
        replayed: total.replayed,
        replay_mismatches: total.replay_mismatches,
        errors: total.errors,
        elapsed: total
            .last_answer
            .map_or(Duration::ZERO, |last| last - shared.started),
        latency: total.latency.unwrap_or_else(new_histogram),
    })
}

/// Microseconds from 1 µs to an hour, to 3 significant figures.
fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

fn progress_bar(options: &LoadOptions) -> ProgressBar {
    if !options.progress {
        return ProgressBar::hidden();
    }
    match options.requests {
        Some(requests) => ProgressBar::new(requests).with_style(
            ProgressStyle::with_template(
                "posting {bar:40.cyan/blue} {pos}/{len} {per_sec} eta {eta} {msg}",
            )
            .expect("a valid progress template"),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("posting {spinner} {pos} sent {per_sec} {elapsed} {msg}")
                .expect("a valid progress template"),
        ),
    }
}

/// One connection's loop: claim the next request number, wait until it is
/// due (with a rate), send it, tally the answer.
async fn worker(shared: Arc<Shared>) -> anyhow::Result<Tally> {
    let options = &shared.options;
    let mut tally = Tally {
        latency: Some(new_histogram()),
        ..Tally::default()
    };
    loop {
        let index = shared.next.fetch_add(1, Ordering::Relaxed);
        if options.requests.is_some_and(|requests| index >= requests) {
            break;
        }
        let due = match options.rate {
            Some(rate) => shared.started + Duration::from_secs_f64(index as f64 / rate),
            None => Instant::now(),
        };
        if options
            .duration
            .is_some_and(|duration| due.duration_since(shared.started) >= duration)
        {
            break;
        }
        tokio::time::sleep_until(due.into()).await;
        let repeat = (fastrand::f64() < options.repeat_fraction)
            .then(|| pick_earlier(&shared))
            .flatten();
        let (key, body, kind) = match repeat {
            Some(Sent {
                key,
                body,
                order_id,
            }) => (key, body, Kind::Repeat { order_id }),
            None => {
                let express = fastrand::f64() < options.express_fraction;
                (
                    Uuid::new_v4().to_string(),
                    Arc::new(new_order(options, express)),
                    Kind::New { express },
                )
            }
        };
        tally.requests += 1;
        let answer = send(&shared.client, &options.url, &key, &body).await;
        let now = Instant::now();
        tally.last_answer = Some(now);
        shared.progress.inc(1);
        match answer {
            Ok(answer) if (200..300).contains(&answer.status) => {
                if let Some(latency) = &mut tally.latency {
                    latency.saturating_record(micros(now - due));
                }
                match kind {
                    Kind::Repeat { order_id } => {
                        if answer.replayed && answer.order_id == Some(order_id) {
                            tally.replayed += 1;
                        } else {
                            tally.replay_mismatches += 1;
                        }
                    }
                    Kind::New { express } => match answer.order_id {
                        Some(order_id) => {
                            tally.accepted.push(Accepted { order_id, express });
                            shared
                                .sent
                                .lock()
                                .expect("the sent list is never poisoned")
                                .push(Sent {
                                    key,
                                    body,
                                    order_id,
                                });
                        }
                        None => {
                            *tally
                                .errors
                                .entry("2xx without an order id".into())
                                .or_default() += 1
                        }
                    },
                }
            }
            Ok(answer) => {
                *tally
                    .errors
                    .entry(format!("http {}", answer.status))
                    .or_default() += 1;
            }
            Err(kind) => *tally.errors.entry(kind).or_default() += 1,
        }
    }
    Ok(tally)
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

fn pick_earlier(shared: &Shared) -> Option<Sent> {
    let sent = shared.sent.lock().expect("the sent list is never poisoned");
    if sent.is_empty() {
        return None;
    }
    sent.get(fastrand::usize(..sent.len())).cloned()
}

fn new_order(options: &LoadOptions, express: bool) -> Vec<u8> {
    let sku = &options.skus[fastrand::usize(..options.skus.len())];
    let order = serde_json::json!({
        "customer_id": format!("loadgen-{}", fastrand::u16(..1000)),
        "email": "loadgen@example.com",
        "items": [{"sku": sku, "quantity": fastrand::u8(1..=3)}],
        "express": express,
    });
    serde_json::to_vec(&order).expect("a JSON value always serialises")
}

/// What a request is: a new order, or a client's retry of an earlier one.
enum Kind {
    New { express: bool },
    Repeat { order_id: Uuid },
}

struct Answer {
    status: u16,
    replayed: bool,
    order_id: Option<Uuid>,
}

/// How many times a `503` (order-api out of database connections for the
/// moment) is tried again, after 100 ms and then twice as long each time,
/// as a client should: the idempotency key makes a retry safe. The time
/// counts in the request's latency.
const RETRIES_OF_503: u32 = 5;

async fn send(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    body: &Arc<Vec<u8>>,
) -> Result<Answer, String> {
    let mut pause = Duration::from_millis(100);
    for _ in 0..RETRIES_OF_503 {
        match send_once(client, url, key, body).await? {
            Answer { status: 503, .. } => {
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
            answer => return Ok(answer),
        }
    }
    send_once(client, url, key, body).await
}

async fn send_once(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    body: &Arc<Vec<u8>>,
) -> Result<Answer, String> {
    let response = client
        .post(format!("{url}/orders"))
        .header("content-type", "application/json")
        .header("idempotency-key", key)
        .body(body.as_ref().clone())
        .send()
        .await
        .map_err(|error| transport_error(&error))?;
    let status = response.status().as_u16();
    let replayed = response.headers().contains_key("idempotent-replayed");
    let bytes = response
        .bytes()
        .await
        .map_err(|error| transport_error(&error))?;
    let order_id = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|body| {
            let id = body.get("id").or_else(|| body.get("order_id"))?;
            id.as_str()?.parse().ok()
        });
    Ok(Answer {
        status,
        replayed,
        order_id,
    })
}

fn transport_error(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        "timeout".into()
    } else if error.is_connect() {
        "connect".into()
    } else {
        "transport".into()
    }
}

/// p50, p90, p99 and max of a latency histogram, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    /// Of a histogram recorded in microseconds.
    pub fn of_micros(histogram: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            count: histogram.len(),
            p50_ms: ms(histogram.value_at_quantile(0.50)),
            p90_ms: ms(histogram.value_at_quantile(0.90)),
            p99_ms: ms(histogram.value_at_quantile(0.99)),
            max_ms: ms(histogram.max()),
        }
    }
}

/// How the accepted orders finished, from the database's own records.
#[derive(Debug, Clone, Serialize)]
pub struct Completion {
    /// Every accepted order reached its final status and was notified and
    /// audited before the deadline.
    pub complete: bool,
    /// From the first order's acceptance to the last order's last effect
    /// (notification or audit row), by the database's clock.
    pub elapsed_s: f64,
    /// Accepted orders per second over `elapsed_s`: the end-to-end rate.
    pub completed_per_s: f64,
    pub processed: u64,
    pub rejected: u64,
    /// Accept → final status (processed or rejected), per lane.
    pub accept_to_final: BTreeMap<String, Percentiles>,
    /// Accept → notified and audited, per lane.
    pub accept_to_done: BTreeMap<String, Percentiles>,
    pub exactly_once: ExactlyOnce,
}

/// The effectively-once check: one row of each effect per accepted order.
#[derive(Debug, Clone, Serialize)]
pub struct ExactlyOnce {
    /// Distinct orders the API accepted.
    pub accepted: u64,
    /// Rows in `orders` for them.
    pub orders: u64,
    /// Final status changes recorded in their history.
    pub final_statuses: u64,
    pub notifications: u64,
    pub audit_rows: u64,
    /// Every count equals `accepted`.
    pub ok: bool,
}

fn distinct_ids(accepted: &[Accepted]) -> Vec<Uuid> {
    let mut seen = HashSet::new();
    accepted
        .iter()
        .map(|order| order.order_id)
        .filter(|id| seen.insert(*id))
        .collect()
}

/// How many of `ids` are final, notified and audited right now.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    pub finished: u64,
    pub notified: u64,
    pub audited: u64,
}

async fn count_finished(pool: &PgPool, ids: &[Uuid]) -> anyhow::Result<u64> {
    let finished = sqlx::query_scalar!(
        r#"SELECT count(*) AS "finished!" FROM orders
           WHERE id = ANY($1) AND status IN ('processed', 'rejected')"#,
        ids
    )
    .fetch_one(pool)
    .await
    .context("counting final orders")?;
    Ok(finished.try_into().unwrap_or_default())
}

/// Count the orders among `ids` that are final, notified and audited.
pub async fn progress(pool: &PgPool, ids: &[Uuid]) -> anyhow::Result<Progress> {
    let counted = sqlx::query!(
        r#"SELECT
            (SELECT count(*) FROM orders WHERE id = ANY($1) AND status IN ('processed', 'rejected'))
                AS "finished!",
            (SELECT count(*) FROM notifications WHERE order_id = ANY($1)) AS "notified!",
            (SELECT count(*) FROM audit_log WHERE order_id = ANY($1)) AS "audited!""#,
        ids
    )
    .fetch_one(pool)
    .await
    .context("counting finished orders")?;
    let (finished, notified, audited) = (counted.finished, counted.notified, counted.audited);
    Ok(Progress {
        finished: finished.try_into().unwrap_or_default(),
        notified: notified.try_into().unwrap_or_default(),
        audited: audited.try_into().unwrap_or_default(),
    })
}

/// Wait up to `timeout` for every accepted order to be final, notified and
/// audited, then measure latencies and check that each effect happened
/// exactly once.
pub async fn await_completion(
    pool: &PgPool,
    accepted: &[Accepted],
    timeout: Duration,
    show_progress: bool,
) -> anyhow::Result<Completion> {
    let ids = distinct_ids(accepted);
    let total = ids.len() as u64;
    let bar = if show_progress {
        ProgressBar::new(total).with_style(
            ProgressStyle::with_template(
                "completing {bar:40.green/blue} {pos}/{len} {per_sec} {msg}",
            )
            .expect("a valid progress template"),
        )
    } else {
        ProgressBar::hidden()
    };
    let deadline = Instant::now() + timeout;
    let complete = loop {
        // Until every order is final, count only that: the other counts
        // cost the database as much again while they can't be complete.
        let finished = count_finished(pool, &ids).await?;
        if finished < total {
            bar.set_position(finished);
            bar.set_message(format!("final {finished}"));
            if Instant::now() >= deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        let now = progress(pool, &ids).await?;
        bar.set_position(now.finished.min(now.notified).min(now.audited));
        bar.set_message(format!(
            "final {} notified {} audited {}",
            now.finished, now.notified, now.audited
        ));
        if now.finished >= total && now.notified >= total && now.audited >= total {
            break true;
        }
        if Instant::now() >= deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    bar.finish_and_clear();
    measure(pool, &ids, complete).await
}

/// One order's timings, in seconds after its acceptance (and of the
/// acceptance itself since the epoch), by the database's clock.
struct Timing {
    lane: String,
    status: String,
    final_s: Option<f64>,
    done_s: Option<f64>,
    created_s: f64,
}

async fn measure(pool: &PgPool, ids: &[Uuid], complete: bool) -> anyhow::Result<Completion> {
    let rows = sqlx::query_as!(
        Timing,
        r#"SELECT o.lane, o.status,
                extract(epoch FROM (h.at - o.created_at))::float8 AS final_s,
                extract(epoch FROM (greatest(n.at, a.at) - o.created_at))::float8 AS done_s,
                extract(epoch FROM o.created_at)::float8 AS "created_s!"
         FROM orders o
         LEFT JOIN LATERAL (SELECT min(at) AS at FROM order_status_history
                            WHERE order_id = o.id AND status IN ('processed', 'rejected')) h ON true
         LEFT JOIN LATERAL (SELECT min(created_at) AS at FROM notifications WHERE order_id = o.id) n ON true
         LEFT JOIN LATERAL (SELECT min(recorded_at) AS at FROM audit_log WHERE order_id = o.id) a ON true
         WHERE o.id = ANY($1)"#,
        ids
    )
    .fetch_all(pool)
    .await
    .context("reading the orders' timings")?;

    let mut to_final: BTreeMap<String, Histogram<u64>> = BTreeMap::new();
    let mut to_done: BTreeMap<String, Histogram<u64>> = BTreeMap::new();
    let (mut processed, mut rejected) = (0, 0);
    let mut first_accept = f64::INFINITY;
    let mut last_done = f64::NEG_INFINITY;
    for Timing {
        lane,
        status,
        final_s,
        done_s,
        created_s,
    } in &rows
    {
        match status.as_str() {
            "processed" => processed += 1,
            "rejected" => rejected += 1,
            _ => {}
        }
        first_accept = first_accept.min(*created_s);
        for (histograms, seconds) in [(&mut to_final, final_s), (&mut to_done, done_s)] {
            if let Some(seconds) = seconds {
                let micros = (seconds.max(0.0) * 1e6) as u64;
                for key in [lane.as_str(), "all"] {
                    histograms
                        .entry(key.to_string())
                        .or_insert_with(new_histogram)
                        .saturating_record(micros);
                }
            }
        }
        if let Some(done_s) = done_s {
            last_done = last_done.max(created_s + done_s);
        }
    }
    let elapsed_s = if last_done > first_accept {
        last_done - first_accept
    } else {
        0.0
    };
    let percentiles = |histograms: BTreeMap<String, Histogram<u64>>| {
        histograms
            .into_iter()
            .map(|(lane, histogram)| (lane, Percentiles::of_micros(&histogram)))
            .collect()
    };
    Ok(Completion {
        complete,
        elapsed_s,
        completed_per_s: if elapsed_s > 0.0 {
            rows.len() as f64 / elapsed_s
        } else {
            0.0
        },
        processed,
        rejected,
        accept_to_final: percentiles(to_final),
        accept_to_done: percentiles(to_done),
        exactly_once: exactly_once(pool, ids).await?,
    })
}

async fn exactly_once(pool: &PgPool, ids: &[Uuid]) -> anyhow::Result<ExactlyOnce> {
    let counted = sqlx::query!(
        r#"SELECT
            (SELECT count(*) FROM orders WHERE id = ANY($1)) AS "orders!",
            (SELECT count(*) FROM order_status_history
              WHERE order_id = ANY($1) AND status IN ('processed', 'rejected')) AS "finals!",
            (SELECT count(*) FROM notifications WHERE order_id = ANY($1)) AS "notifications!",
            (SELECT count(*) FROM audit_log WHERE order_id = ANY($1)) AS "audits!""#,
        ids
    )
    .fetch_one(pool)
    .await
    .context("counting each order's effects")?;
    let (orders, finals, notifications, audits) = (
        counted.orders,
        counted.finals,
        counted.notifications,
        counted.audits,
    );
    let accepted = ids.len() as u64;
    let [orders, final_statuses, notifications, audit_rows] =
        [orders, finals, notifications, audits].map(|n| u64::try_from(n).unwrap_or_default());
    Ok(ExactlyOnce {
        accepted,
        orders,
        final_statuses,
        notifications,
        audit_rows,
        ok: [orders, final_statuses, notifications, audit_rows]
            .iter()
            .all(|n| *n == accepted),
    })
}

/// Everything `loadgen` reports, as printed by `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub requests: u64,
    pub accepted: u64,
    pub express: u64,
    pub replayed: u64,
    pub replay_mismatches: u64,
    pub errors: BTreeMap<String, u64>,
    pub post_elapsed_s: f64,
    pub accepted_per_s: f64,
    pub post_latency: Percentiles,
    pub completion: Option<Completion>,
}

impl Summary {
    pub fn new(posted: &Posted, completion: Option<Completion>) -> Self {
        Self {
            requests: posted.requests,
            accepted: posted.accepted.len() as u64,
            express: posted.accepted.iter().filter(|order| order.express).count() as u64,
            replayed: posted.replayed,
            replay_mismatches: posted.replay_mismatches,
            errors: posted.errors.clone(),
            post_elapsed_s: posted.elapsed.as_secs_f64(),
            accepted_per_s: posted.accepted_per_second(),
            post_latency: Percentiles::of_micros(&posted.latency),
            completion,
        }
    }

    /// Whether the run met the guarantees: no failed request, every replay a
    /// true replay, and (when checked) every order effective exactly once.
    pub fn ok(&self) -> bool {
        self.errors.is_empty()
            && self.replay_mismatches == 0
            && self
                .completion
                .as_ref()
                .is_none_or(|completion| completion.complete && completion.exactly_once.ok)
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = |p: &Percentiles| {
            format!(
                "p50 {:.1} ms  p90 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
                p.p50_ms, p.p90_ms, p.p99_ms, p.max_ms
            )
        };
        writeln!(
            f,
            "requests      {}  (accepted {}, of them express {}; replayed {}; replay mismatches {})",
            self.requests, self.accepted, self.express, self.replayed, self.replay_mismatches
        )?;
        let errors = if self.errors.is_empty() {
            "none".to_string()
        } else {
            self.errors
                .iter()
                .map(|(kind, count)| format!("{kind}: {count}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        writeln!(f, "errors        {errors}")?;
        writeln!(
            f,
            "accepted/s    {:.0}  over {:.2} s",
            self.accepted_per_s, self.post_elapsed_s
        )?;
        writeln!(f, "POST latency  {}", p(&self.post_latency))?;
        let Some(completion) = &self.completion else {
            return Ok(());
        };
        writeln!(
            f,
            "completed/s   {:.0} end to end (first accept → last notified and audited: {:.2} s){}",
            completion.completed_per_s,
            completion.elapsed_s,
            if completion.complete {
                ""
            } else {
                "  INCOMPLETE: timed out"
            }
        )?;
        writeln!(
            f,
            "outcomes      processed {}  rejected {}",
            completion.processed, completion.rejected
        )?;
        for (name, lanes) in [
            ("accept→final", &completion.accept_to_final),
            ("accept→done ", &completion.accept_to_done),
        ] {
            for (lane, percentiles) in lanes {
                writeln!(f, "{name}  {lane:<8} {}", p(percentiles))?;
            }
        }
        let check = &completion.exactly_once;
        write!(
            f,
            "exactly once  {}: accepted {}  orders {}  final statuses {}  notifications {}  audit rows {}",
            if check.ok { "OK" } else { "FAILED" },
            check.accepted,
            check.orders,
            check.final_statuses,
            check.notifications,
            check.audit_rows
        )
    }
}
