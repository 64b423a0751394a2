//! Structured logs: every line names the service; spans add the order id
//! and correlation id. Pretty for people, Bunyan JSON for machines.

use tracing::{Event, Subscriber};
use tracing_bunyan_formatter::{BunyanFormattingLayer, JsonStorageLayer};
use tracing_subscriber::{
    EnvFilter, Registry,
    fmt::{FmtContext, FormatEvent, FormatFields, format::Writer},
    layer::SubscriberExt,
    registry::LookupSpan,
};

/// How log lines are written.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// One readable line per event, prefixed with the service name.
    #[default]
    Pretty,
    /// Bunyan JSON, one object per line, with the service as `name`.
    Json,
}

/// Log settings every service takes.
#[derive(clap::Args, Clone, Debug)]
pub struct LogSettings {
    /// `pretty` or `json`.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty)]
    pub log_format: LogFormat,
}

/// Install the global subscriber for `service`. Filtering follows `RUST_LOG`,
/// defaulting to `info`. Safe to call more than once (later calls are no-ops).
pub fn init(service: &'static str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,lapin=warn,tower_http=info"));
    let _ = tracing_log::LogTracer::init();
    let result = match format {
        LogFormat::Pretty => {
            let layer = tracing_subscriber::fmt::layer()
                .event_format(Prefixed {
                    service,
                    inner: tracing_subscriber::fmt::format().with_target(false),
                })
                .with_ansi(false);
            tracing::subscriber::set_global_default(Registry::default().with(filter).with(layer))
        }
        LogFormat::Json => tracing::subscriber::set_global_default(
            Registry::default()
                .with(filter)
                .with(JsonStorageLayer)
                .with(BunyanFormattingLayer::new(
                    service.to_owned(),
                    std::io::stdout,
                )),
        ),
    };
    drop(result);
}

/// Writes the service name in front of what the inner format writes.
struct Prefixed<F> {
    service: &'static str,
    inner: F,
}

impl<S, N, F> FormatEvent<S, N> for Prefixed<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        write!(writer, "{:<20} ", self.service)?;
        self.inner.format_event(ctx, writer, event)
    }
}
