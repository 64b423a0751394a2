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

/// One row of the table: what it measures and how to read it from a run.
struct Row {
    what: &'static str,
    read: Read,
}

enum Read {
    With(fn(&Value) -> Option<String>),
    /// CPU-ms per order of the best no-I/O run, summed over these process
    /// groups (`total` for all of it).
    Cpu(&'static [&'static str]),
}

impl Row {
    const fn cpu(what: &'static str, groups: &'static [&'static str]) -> Self {
        Self {
            what,
            read: Read::Cpu(groups),
        }
    }

    fn read(&self, results: &Value) -> Option<String> {
        match self.read {
            Read::With(read) => read(results),
            Read::Cpu(groups) => cpu(results, groups),
        }
    }
}

const ROWS: &[Row] = &[
    Row {
        what: "end to end, no payment I/O, best processor count",
        read: Read::With(|r| {
            best_no_io(r)
                .map(|(rate, row)| format!("{rate:.0}/s ({} processors)", row["processors"]))
        }),
    },
    Row {
        what: "end to end vs the reference pipeline",
        read: Read::With(|r| {
            let (rate, _) = best_no_io(r)?;
            Some(format!(
                "{:.2}×",
                rate / r["reference"]["completed_per_s"].as_f64()?
            ))
        }),
    },
    Row::cpu("CPU-ms per order end to end (best no-I/O run)", &["total"]),
    Row::cpu("… order-api", &["order-api"]),
    Row::cpu("… order-processors", &["order-processors"]),
    Row::cpu(
        "… notification-service + logging-service",
        &["notification-service", "logging-service"],
    ),
    Row::cpu("… postgres", &["postgres"]),
    Row::cpu("… rabbitmq", &["rabbitmq"]),
    Row {
        what: "order-api accept rate vs bare axum + one INSERT",
        read: Read::With(|r| {
            let (bare, api) = (
                r["http"][0]["per_s"].as_f64()?,
                r["http"][1]["per_s"].as_f64()?,
            );
            Some(format!("{:.0}% ({api:.0}/s)", 100.0 * api / bare))
        }),
    },
    Row {
        what: "p99 POST at half that rate",
        read: Read::With(|r| ms(&r["http"][2]["latency"]["p99_ms"])),
    },
    Row {
        what: "4 processors vs 1, 20 ms payment I/O, PREFETCH 40",
        read: Read::With(|r| {
            let rows = r["scaling"].as_array()?;
            let rate = |processors: u64| {
                rows.iter().find(|row| {
                    row["payment_latency_ms"] == 20
                        && row["prefetch"].as_u64() > Some(1)
                        && row["processors"] == processors
                })?["completed_per_s"]
                    .as_f64()
            };
            Some(format!("{:.2}×", rate(4)? / rate(1)?))
        }),
    },
    Row {
        what: "20 orders/s: p99 POST",
        read: Read::With(|r| ms(&r["low_load"]["post"]["p99_ms"])),
    },
    Row {
        what: "20 orders/s: accept→final p50",
        read: Read::With(|r| ms(&r["low_load"]["accept_to_final"]["p50_ms"])),
    },
];

/// The no-I/O end-to-end run that completed the most orders per second.
fn best_no_io(results: &Value) -> Option<(f64, &Value)> {
    results["scaling"]
        .as_array()?
        .iter()
        .filter(|row| row["payment_latency_ms"] == 0)
        .filter_map(|row| Some((row["completed_per_s"].as_f64()?, row)))
        .max_by(|a, b| a.0.total_cmp(&b.0))
}

/// CPU-ms per order of the best no-I/O run, summed over `groups`.
fn cpu(results: &Value, groups: &[&str]) -> Option<String> {
    let (_, row) = best_no_io(results)?;
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
    fn no_earlier_run_no_table() {
        assert_eq!(table(&serde_json::json!({}), &[]), "");
    }
}
