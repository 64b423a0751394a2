//! This run beside earlier ones: the headline numbers read from their
//! `results.json`, so a change is judged by what the same tool measured
//! before it. The earlier files may come from older versions of the tool;
//! a number one of them lacks is shown as a dash.

use std::{fmt::Write, path::PathBuf};

use anyhow::Context;
use serde_json::Value;

/// An earlier run: its label in the table and its results.
#[derive(Debug, Clone)]
pub struct Earlier {
    pub label: String,
    pub results: Value,
}

impl Earlier {
    /// `LABEL=PATH` to an earlier `results.json`.
    pub fn parse(argument: &str) -> anyhow::Result<Self> {
        let (label, path) = argument
            .split_once('=')
            .context("expected LABEL=PATH to an earlier results.json")?;
        let path = PathBuf::from(path);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let results = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        Ok(Self {
            label: label.to_owned(),
            results,
        })
    }
}

/// One row of the table: what it measures, on which transport, and how to
/// read it from a run.
struct Row {
    what: &'static str,
    /// `rabbitmq` or `postgres`: the runs of the stages run on both are
    /// told apart by it (an older run's, which lack it, were `rabbitmq`).
    transport: &'static str,
    read: Read,
}

enum Read {
    With(fn(&Value, &str) -> Option<String>),
    /// CPU-ms per order of the best no-I/O run, summed over these process
    /// groups (`total` for all of it).
    Cpu(&'static [&'static str]),
}

const RABBITMQ: &str = "rabbitmq";
const POSTGRES: &str = "postgres";

impl Row {
    const fn with(
        what: &'static str,
        transport: &'static str,
        read: fn(&Value, &str) -> Option<String>,
    ) -> Self {
        Self {
            what,
            transport,
            read: Read::With(read),
        }
    }

    const fn cpu(
        what: &'static str,
        transport: &'static str,
        groups: &'static [&'static str],
    ) -> Self {
        Self {
            what,
            transport,
            read: Read::Cpu(groups),
        }
    }

    fn read(&self, results: &Value) -> Option<String> {
        match self.read {
            Read::With(read) => read(results, self.transport),
            Read::Cpu(groups) => cpu(results, self.transport, groups),
        }
    }
}

const ROWS: &[Row] = &[
    Row::with(
        "end to end, no payment I/O, best processor count",
        RABBITMQ,
        best_rate,
    ),
    Row::with(
        "end to end vs the reference pipeline",
        RABBITMQ,
        against_reference,
    ),
    Row::cpu(
        "CPU-ms per order end to end (best no-I/O run)",
        RABBITMQ,
        &["total"],
    ),
    Row::cpu("… order-api", RABBITMQ, &["order-api"]),
    Row::cpu("… order-processors", RABBITMQ, &["order-processors"]),
    Row::cpu(
        "… notification-service + logging-service",
        RABBITMQ,
        &["notification-service", "logging-service"],
    ),
    Row::cpu("… postgres", RABBITMQ, &["postgres"]),
    Row::cpu("… rabbitmq", RABBITMQ, &["rabbitmq"]),
    Row::with(
        "order-api accept rate vs bare axum + one INSERT",
        RABBITMQ,
        |r, _| {
            let (bare, api) = (
                r["http"][0]["per_s"].as_f64()?,
                r["http"][1]["per_s"].as_f64()?,
            );
            Some(format!("{:.0}% ({api:.0}/s)", 100.0 * api / bare))
        },
    ),
    Row::with("p99 POST at half that rate", RABBITMQ, |r, _| {
        ms(&r["http"][2]["latency"]["p99_ms"])
    }),
    Row::with(
        "4 processors vs 1, 20 ms payment I/O, PREFETCH 40",
        RABBITMQ,
        four_against_one,
    ),
    Row::with("20 orders/s: p99 POST", RABBITMQ, |r, transport| {
        ms(&low_load(r, transport)?["post"]["p99_ms"])
    }),
    Row::with(
        "20 orders/s: accept→final p50",
        RABBITMQ,
        |r, transport| ms(&low_load(r, transport)?["accept_to_final"]["p50_ms"]),
    ),
    Row::with(
        "WORK_QUEUE and EVENT_BUS postgres: end to end, no payment I/O, best processor count",
        POSTGRES,
        best_rate,
    ),
    Row::with(
        "… postgres: end to end vs the reference pipeline",
        POSTGRES,
        against_reference,
    ),
    Row::cpu(
        "… postgres: CPU-ms per order end to end (best no-I/O run)",
        POSTGRES,
        &["total"],
    ),
    Row::cpu("… postgres: … of it postgres", POSTGRES, &["postgres"]),
    Row::cpu("… postgres: … of it rabbitmq", POSTGRES, &["rabbitmq"]),
    Row::with(
        "… postgres: 4 processors vs 1, 20 ms payment I/O, PREFETCH 40",
        POSTGRES,
        four_against_one,
    ),
    Row::with(
        "… postgres: 20 orders/s: p99 POST",
        POSTGRES,
        |r, transport| ms(&low_load(r, transport)?["post"]["p99_ms"]),
    ),
    Row::with(
        "… postgres: 20 orders/s: accept→final p50",
        POSTGRES,
        |r, transport| ms(&low_load(r, transport)?["accept_to_final"]["p50_ms"]),
    ),
];

/// The transport a row of a run ran on.
fn transport_of(row: &Value) -> &str {
    row["transport"].as_str().unwrap_or(RABBITMQ)
}

/// The end-to-end rows of `transport`.
fn scaling<'a>(results: &'a Value, transport: &'a str) -> impl Iterator<Item = &'a Value> {
    results["scaling"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(move |row| transport_of(row) == transport)
}

/// The low-load row of `transport`: one of a list, or, in an older run,
/// the one object (on RabbitMQ).
fn low_load<'a>(results: &'a Value, transport: &str) -> Option<&'a Value> {
    match &results["low_load"] {
        Value::Array(rows) => rows.iter().find(|row| transport_of(row) == transport),
        row @ Value::Object(_) if transport == RABBITMQ => Some(row),
        _ => None,
    }
}

/// The no-I/O end-to-end run on `transport` that completed the most orders
/// per second.
fn best_no_io<'a>(results: &'a Value, transport: &'a str) -> Option<(f64, &'a Value)> {
    scaling(results, transport)
        .filter(|row| row["payment_latency_ms"] == 0)
        .filter_map(|row| Some((row["completed_per_s"].as_f64()?, row)))
        .max_by(|a, b| a.0.total_cmp(&b.0))
}

fn best_rate(results: &Value, transport: &str) -> Option<String> {
    best_no_io(results, transport)
        .map(|(rate, row)| format!("{rate:.0}/s ({} processors)", row["processors"]))
}

fn against_reference(results: &Value, transport: &str) -> Option<String> {
    let (rate, _) = best_no_io(results, transport)?;
    Some(format!(
        "{:.2}×",
        rate / results["reference"]["completed_per_s"].as_f64()?
    ))
}

fn four_against_one(results: &Value, transport: &str) -> Option<String> {
    let rate = |processors: u64| {
        scaling(results, transport).find(|row| {
            row["payment_latency_ms"] == 20
                && row["prefetch"].as_u64() > Some(1)
                && row["processors"] == processors
        })?["completed_per_s"]
            .as_f64()
    };
    Some(format!("{:.2}×", rate(4)? / rate(1)?))
}

/// CPU-ms per order of the best no-I/O run on `transport`, summed over
/// `groups`.
fn cpu(results: &Value, transport: &str, groups: &[&str]) -> Option<String> {
    let (_, row) = best_no_io(results, transport)?;
    let cpu = &row["cpu"];
    let sum = groups
        .iter()
        .map(|group| match *group {
            "total" => cpu["total_ms_per_op"].as_f64(),
            group => cpu["ms_per_op"][group].as_f64(),
        })
        .sum::<Option<f64>>()?;
    Some(format!("{sum:.2}"))
}

fn ms(value: &Value) -> Option<String> {
    value.as_f64().map(|ms| format!("{ms:.1} ms"))
}

/// The table, this run last; empty when there is nothing to compare.
pub fn table(now: &Value, earlier: &[Earlier]) -> String {
    if earlier.is_empty() {
        return String::new();
    }
    let mut md = String::from("| | ");
    for run in earlier {
        let started = run.results["started_at"].as_str().unwrap_or("?");
        let _ = write!(md, "{} ({started}) | ", run.label);
    }
    md.push_str("this run |\n|---|");
    md.push_str(&"---|".repeat(earlier.len() + 1));
    md.push('\n');
    for row in ROWS {
        let _ = write!(md, "| {} |", row.what);
        for results in earlier.iter().map(|run| &run.results).chain([now]) {
            let cell = row.read(results).unwrap_or_else(|| "–".into());
            let _ = write!(md, " {cell} |");
        }
        md.push('\n');
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_an_older_run_lacks_are_dashes_and_the_rest_are_read() {
        let old = serde_json::json!({
            "started_at": "then",
            "reference": {"completed_per_s": 1000.0},
            "scaling": [
                {"processors": 1, "payment_latency_ms": 0, "prefetch": 40, "completed_per_s": 200.0,
                 "cpu": {"total_ms_per_op": 9.0, "ms_per_op": {"postgres": 5.0}}},
                {"processors": 4, "payment_latency_ms": 0, "prefetch": 40, "completed_per_s": 250.0,
                 "cpu": {"total_ms_per_op": 8.0, "ms_per_op": {"postgres": 4.5}}}
            ],
            "http": [{"per_s": 4000.0}, {"per_s": 1000.0}, {"latency": {"p99_ms": 12.0}}]
        });
        let now = serde_json::json!({"low_load": {"post": {"p99_ms": 7.5}}});
        let earlier = [Earlier {
            label: "before".into(),
            results: old,
        }];
        let table = table(&now, &earlier);
        assert!(table.contains("| before (then) | this run |"), "{table}");
        assert!(table.contains("| 250/s (4 processors) | – |"), "{table}");
        assert!(table.contains("| 0.25× | – |"), "{table}");
        assert!(table.contains("best no-I/O run) | 8.00 | – |"), "{table}");
        assert!(table.contains("| … postgres | 4.50 | – |"), "{table}");
        assert!(table.contains("| … order-api | – | – |"), "{table}");
        assert!(table.contains("| 25% (1000/s) | – |"), "{table}");
        assert!(
            table.contains("| 20 orders/s: p99 POST | – | 7.5 ms |"),
            "{table}"
        );
    }

    #[test]
    fn the_transports_are_read_apart() {
        let now = serde_json::json!({
            "reference": {"completed_per_s": 1000.0},
            "scaling": [
                {"transport": "rabbitmq", "processors": 2, "payment_latency_ms": 0,
                 "completed_per_s": 400.0, "cpu": {"total_ms_per_op": 5.0, "ms_per_op": {}}},
                {"transport": "postgres", "processors": 1, "payment_latency_ms": 0,
                 "completed_per_s": 500.0, "cpu": {"total_ms_per_op": 4.0, "ms_per_op": {}}}
            ],
            "low_load": [
                {"transport": "rabbitmq", "post": {"p99_ms": 7.0}},
                {"transport": "postgres", "post": {"p99_ms": 9.0}}
            ]
        });
        let earlier = [Earlier {
            label: "before".into(),
            results: serde_json::json!({}),
        }];
        let table = table(&now, &earlier);
        assert!(
            table.contains(
                "| end to end, no payment I/O, best processor count | – | 400/s (2 processors) |"
            ),
            "{table}"
        );
        assert!(
            table.contains("best processor count | – | 500/s (1 processors) |"),
            "{table}"
        );
        assert!(
            table.contains("| 20 orders/s: p99 POST | – | 7.0 ms |"),
            "{table}"
        );
        assert!(
            table.contains("| … postgres: 20 orders/s: p99 POST | – | 9.0 ms |"),
            "{table}"
        );
        assert!(
            table.contains(
                "| … postgres: CPU-ms per order end to end (best no-I/O run) | – | 4.00 |"
            ),
            "{table}"
        );
    }

    #[test]
    fn no_earlier_run_no_table() {
        assert_eq!(table(&serde_json::json!({}), &[]), "");
    }
}
