//! The read model over HTTP: `GET /stats?minutes=N`.

use axum::{
    Json, Router,
    extract::{Query, State, rejection::QueryRejection},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use chrono::{Duration, DurationRound, Utc};
use serde::Deserialize;
use serde_json::json;
use sqlx::PgPool;

use crate::model;

/// The most minutes one request may ask for: a day.
pub const MAX_MINUTES: u32 = 24 * 60;

#[derive(Clone)]
struct Stats {
    pool: PgPool,
    log: Log,
}

/// The log order-stats reads, whose position `/stats` reports.
#[derive(Clone)]
pub enum Log {
    /// RabbitMQ's stream of that name.
    Stream(String),
    /// The event log in Postgres, read as that reader.
    Postgres(&'static str),
}

#[derive(Deserialize)]
struct Window {
    /// The last this many minutes, the current one included; absent: 60.
    minutes: Option<u32>,
}

/// The routes of the read model.
pub fn router(pool: PgPool, log: Log) -> Router {
    Router::new()
        .route("/stats", get(stats))
        .with_state(Stats { pool, log })
}

fn refuse(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

async fn stats(
    State(stats): State<Stats>,
    window: Result<Query<Window>, QueryRejection>,
) -> Response {
    let minutes = match window {
        Ok(Query(Window { minutes: None })) => 60,
        Ok(Query(Window {
            minutes: Some(m @ 1..=MAX_MINUTES),
        })) => m,
        _ => {
            return refuse(
                StatusCode::BAD_REQUEST,
                &format!("minutes must be a whole number from 1 to {MAX_MINUTES}"),
            );
        }
    };
    let now = Utc::now()
        .duration_trunc(Duration::minutes(1))
        .unwrap_or_else(|_| Utc::now());
    let since = now - Duration::minutes(i64::from(minutes) - 1);
    let read = async {
        let position = match &stats.log {
            Log::Stream(stream) => model::position(&stats.pool, stream).await?.map_or_else(
                || json!({ "stream": stream, "next_offset": 0, "events": 0, "skipped": 0 }),
                |p| json!(p),
            ),
            Log::Postgres(reader) => model::log_position(&stats.pool, reader)
                .await?
                .unwrap_or_else(|| json!({ "reader": reader, "events": 0 })),
        };
        let (skus, revenue) = model::since(&stats.pool, since).await?;
        Ok::<_, sqlx::Error>((position, skus, revenue))
    };
    match read.await {
        Ok((position, skus, revenue)) => Json(json!({
            "since": since,
            "log": position,
            "skus": skus,
            "revenue": revenue,
        }))
        .into_response(),
        Err(error) => {
            tracing::error!(error = %error, "could not read the read model");
            refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "the read model is unavailable; try again",
            )
        }
    }
}
