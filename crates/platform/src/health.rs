//! `/healthz` (the process is alive) and `/readyz` (its Postgres and
//! RabbitMQ are reachable), served by every service.

use std::time::Duration;

use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use serde_json::json;
use sqlx::PgPool;

/// What a service needs to be ready.
#[derive(Clone)]
pub struct Readiness {
    pool: PgPool,
    broker: messaging::Broker,
}

impl Readiness {
    /// Readiness of `pool` and `broker`.
    pub fn new(pool: PgPool, broker: messaging::Broker) -> Self {
        Self { pool, broker }
    }

    /// `Ok` when both dependencies answer; otherwise what is wrong with each.
    pub async fn check(&self) -> Result<(), serde_json::Value> {
        let postgres = match tokio::time::timeout(
            Duration::from_secs(2),
            sqlx::query("SELECT 1").execute(&self.pool),
        )
        .await
        {
            Ok(Ok(_)) => "ok".to_owned(),
            Ok(Err(error)) => format!("unreachable: {error}"),
            Err(_) => "unreachable: timed out".to_owned(),
        };
        let rabbitmq = if self.broker.is_connected() {
            "ok".to_owned()
        } else {
            "unreachable: connection closed".to_owned()
        };
        if postgres == "ok" && rabbitmq == "ok" {
            Ok(())
        } else {
            Err(json!({ "postgres": postgres, "rabbitmq": rabbitmq }))
        }
    }
}

/// The health routes and `/metrics`, for merging into a service's router.
pub fn router<S: Clone + Send + Sync + 'static>(readiness: Readiness) -> Router<S> {
    Router::new()
        .route(
            "/healthz",
            get(|| async { Json(json!({ "status": "ok" })) }),
        )
        .route("/readyz", get(ready))
        .with_state(readiness)
        .merge(crate::metrics::router())
}

async fn ready(State(readiness): State<Readiness>) -> impl IntoResponse {
    match readiness.check().await {
        Ok(()) => (
            StatusCode::OK,
            Json(json!({ "status": "ready", "postgres": "ok", "rabbitmq": "ok" })),
        ),
        Err(details) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "unavailable", "details": details })),
        ),
    }
}
