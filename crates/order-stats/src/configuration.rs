//! order-stats' settings, from environment variables (or flags).

use clap::{Parser, ValueEnum};
use platform::settings::ServiceSettings;

/// Where reading starts.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartFrom {
    /// At the offset stored with the read model; at the beginning of the
    /// log when there is none (an empty read model).
    Stored,
    /// Clear the read model and rebuild it from the beginning of the log.
    First,
}

/// Settings of order-stats.
#[derive(Parser, Clone, Debug)]
#[command(
    name = "order-stats",
    about = "Reads the order-event log into orders, units and revenue per minute, served over HTTP"
)]
pub struct Settings {
    #[command(flatten)]
    pub service: ServiceSettings,
    /// Port of the HTTP API (/stats, /healthz, /readyz, /metrics); 0 picks
    /// a free one.
    #[arg(long, env = "HTTP_PORT", default_value_t = 8084)]
    pub http_port: u16,
    /// `stored` carries on from the stored offset; `first` rebuilds the
    /// read model from the beginning of the log.
    #[arg(long, env = "STATS_FROM", value_enum, default_value_t = StartFrom::Stored)]
    pub from: StartFrom,
    /// How long the log keeps events: a number and a unit, Y M D h m or s
    /// (RabbitMQ's `x-max-age`). Whole segments older than this are
    /// dropped.
    #[arg(long, env = "EVENT_LOG_MAX_AGE", default_value = "7D", value_parser = max_age)]
    pub event_log_max_age: String,
    /// The most bytes the log keeps; the oldest segments go first.
    #[arg(long, env = "EVENT_LOG_MAX_BYTES", default_value_t = 1_000_000_000, value_parser = clap::value_parser!(u64).range(1_000_000..))]
    pub event_log_max_bytes: u64,
    /// Most events counted in one transaction (those already delivered;
    /// never a wait to fill one).
    #[arg(long, env = "BATCH_SIZE", default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..))]
    pub batch_size: u16,
}

/// A retention age RabbitMQ accepts: digits, then one of `YMDhms`.
fn max_age(value: &str) -> Result<String, String> {
    let (digits, unit) = value.split_at(value.len().saturating_sub(1));
    let valid = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && digits.parse::<u32>().is_ok_and(|n| n > 0)
        && matches!(unit, "Y" | "M" | "D" | "h" | "m" | "s");
    if valid {
        Ok(value.to_owned())
    } else {
        Err(format!(
            "{value:?} is not an age: a positive number and a unit, one of Y M D h m s (7D, 12h)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_are_a_number_and_a_unit() {
        for good in ["7D", "12h", "1Y", "90s"] {
            assert_eq!(max_age(good).as_deref(), Ok(good));
        }
        for bad in [
            "",
            "D",
            "7",
            "7d",
            "0D",
            "-1D",
            "7 D",
            "1.5h",
            "99999999999D",
        ] {
            assert!(max_age(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn defaults_keep_a_week_or_a_gigabyte() {
        let settings = Settings::parse_from(["order-stats"]);
        assert_eq!(settings.event_log_max_age, "7D");
        assert_eq!(settings.event_log_max_bytes, 1_000_000_000);
        assert_eq!(settings.from, StartFrom::Stored);
    }
}
