//! `/healthz` (the process is alive) and `/readyz` (its Postgres and, for
//! a service that has one, RabbitMQ are reachable), served by every service. Both are public, so
//! `/readyz` says which dependency is down but never why: the error text
//! (addresses, user names) goes to the log.

use std::time::Duration;

use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use serde_json::json;
use sqlx::PgPool;

/// What a service needs to be ready.
#[derive(Clone)]
pub struct Readiness {
    pool: PgPool,
    broker: Option<messaging::Broker>,
}

impl Readiness {
    /// Readiness of `pool` and `broker`.
    pub fn new(pool: PgPool, broker: messaging::Broker) -> Self {
        Self {
            pool,
            broker: Some(broker),
        }
    }

    /// Readiness of a service without a broker: `pool` alone.
    pub fn postgres(pool: PgPool) -> Self {
        Self { pool, broker: None }
    }

    /// `Ok` with what answered when every dependency does; otherwise which
    /// is unreachable.
    pub async fn check(&self) -> Result<serde_json::Value, serde_json::Value> {
        let postgres = match tokio::time::timeout(
            Duration::from_secs(2),
            sqlx::query_scalar!(r#"SELECT 1 AS "one!""#).fetch_one(&self.pool),
        )
        .await
        {
            Ok(Ok(_)) => "ok",
            Ok(Err(error)) => {
                tracing::warn!(error.message = %error, "not ready: Postgres does not answer");
                "unreachable"
            }
            Err(_) => {
                tracing::warn!("not ready: Postgres did not answer within 2 s");
                "unreachable"
            }
        };
        let mut answers = json!({ "postgres": postgres });
        let mut ready = postgres == "ok";
        if let Some(broker) = &self.broker {
            let rabbitmq = if broker.is_connected() {
                "ok"
            } else {
                tracing::warn!("not ready: the RabbitMQ connection is closed");
                ready = false;
                "unreachable"
            };
            answers["rabbitmq"] = json!(rabbitmq);
        }
        if ready { Ok(answers) } else { Err(answers) }
    }
}

/// The health routes, for merging into a service's router.
pub fn router<S: Clone + Send + Sync + 'static>(readiness: Readiness) -> Router<S> {
    Router::new()
        .route(
            "/healthz",
            get(|| async { Json(json!({ "status": "ok" })) }),
        )
        .route("/readyz", get(ready))
        .with_state(readiness)
}

async fn ready(State(readiness): State<Readiness>) -> impl IntoResponse {
    match readiness.check().await {
        Ok(mut answers) => {
            answers["status"] = json!("ready");
            (StatusCode::OK, Json(answers))
        }
        Err(details) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "unavailable", "details": details })),
        ),
    }
}
