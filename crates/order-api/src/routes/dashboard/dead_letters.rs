//! The dead letters: listed, and one replayed, from the page.

use std::sync::Arc;

use axum::{
    Extension, Json,
    extract::State,
    response::{IntoResponse, Response},
};
use messaging::Broker;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::PgPool;
use tokio::sync::Mutex;

use super::admin;
use crate::{
    auth::Caller,
    error::{ApiError, FieldError, Result},
    routes::JsonBody,
    state::Transports,
};

/// Held while the dead-letter queue is read or replayed from: listing takes
/// every dead letter off the queue for a moment, so a replay at the same
/// time would find nothing.
#[derive(Clone, Default)]
pub struct DeadLetterLock(Arc<Mutex<()>>);

/// A dead letter, as the page lists it.
#[derive(Debug, Serialize)]
pub struct DeadLetterView {
    message_id: String,
    order_id: String,
    reason: String,
    attempts: u32,
    service: String,
    queue: Option<String>,
}

impl From<dead_letters::DeadLetter> for DeadLetterView {
    fn from(letter: dead_letters::DeadLetter) -> Self {
        Self {
            message_id: letter.message_id,
            order_id: letter.order_id,
            reason: letter.reason,
            attempts: letter.attempts,
            service: letter.service,
            queue: letter.queue,
        }
    }
}

fn broker_error(error: anyhow::Error) -> ApiError {
    ApiError::BrokerUnavailable(error)
}

/// `GET /dashboard/dead-letters`: what is in the dead-letter queue and
/// which jobs are dead, and why.
pub async fn dead_letters(
    State(broker): State<Broker>,
    State(pool): State<PgPool>,
    State(transports): State<Transports>,
    State(DeadLetterLock(lock)): State<DeadLetterLock>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<DeadLetterView>>> {
    admin(&caller)?;
    let _only_reader = lock.lock().await;
    let broker = transports.use_rabbitmq().then_some(&broker);
    let letters = dead_letters::list(broker, &pool)
        .await
        .map_err(broker_error)?;
    Ok(Json(letters.into_iter().map(Into::into).collect()))
}

/// Which dead letter to replay.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Replay {
    message_id: String,
}

/// `POST /dashboard/dead-letters/replay`: put one dead letter back on its
/// queue (it keeps its message id, so the consumer's dedupe makes a replay
/// of something already done harmless).
pub async fn replay(
    State(broker): State<Broker>,
    State(pool): State<PgPool>,
    State(transports): State<Transports>,
    State(DeadLetterLock(lock)): State<DeadLetterLock>,
    Extension(caller): Extension<Caller>,
    body: std::result::Result<JsonBody<Replay>, ApiError>,
) -> Result<Response> {
    admin(&caller)?;
    let JsonBody(Replay { message_id }) = body?;
    // "-" is how a letter without a message id is listed: it would pick
    // every such letter, not one.
    if message_id.is_empty() || message_id == "-" {
        return Err(ApiError::Validation(vec![FieldError::new(
            "message_id",
            "a dead letter's message id (one without an id is replayed with the dead-letters CLI's --all)",
        )]));
    }
    let selection = dead_letters::Selection::MessageId(message_id.clone());
    let _only_reader = lock.lock().await;
    let broker = transports.use_rabbitmq().then_some(&broker);
    let replayed = dead_letters::replay(broker, &pool, &selection)
        .await
        .map_err(|error| match error.downcast::<sqlx::Error>() {
            Ok(database) => ApiError::from(database),
            Err(broker) => broker_error(broker),
        })?;
    tracing::info!(client = %caller.client, replayed = replayed.len(), "dead letter replay asked from the live page");
    let replayed: Vec<DeadLetterView> = replayed.into_iter().map(Into::into).collect();
    if replayed.is_empty() {
        return Err(ApiError::DeadLetterNotFound(message_id));
    }
    Ok(Json(json!({"replayed": replayed})).into_response())
}
