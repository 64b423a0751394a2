//! Prometheus metrics: one recorder per process, rendered at `/metrics`
//! by every service (order-api on its HTTP port, the workers on their
//! health port). Instrumented code uses the `metrics` macros.

use std::sync::OnceLock;

use axum::{
    Router,
    http::header,
    response::{IntoResponse, Response},
    routing::get,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Buckets for durations in seconds: 1 ms to 10 s.
const SECONDS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// The process's recorder, installed on first use.
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS)
            .expect("static buckets are valid")
            .build_recorder();
        let handle = recorder.handle();
        // Tests may start several services in one process: the first wins.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// Every metric so far, as a Prometheus text answer.
pub fn render() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle().render(),
    )
        .into_response()
}

/// `GET /metrics` in the Prometheus text format.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    handle();
    Router::new().route("/metrics", get(|| async { render() }))
}
