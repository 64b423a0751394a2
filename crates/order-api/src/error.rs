//! Every error the API answers with, as `{"error": {"code", "message",
//! "details"}}`. Internal causes are logged once and never sent to clients.

use axum::{
    Json,
    extract::rejection::JsonRejection,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

/// What a client over its stream cap is told to wait, in seconds.
const STREAM_RETRY_SECS: u64 = 5;

/// The crate's result type.
pub type Result<T, E = ApiError> = std::result::Result<T, E>;

/// An error answered to a client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("the request body is not valid JSON: {0}")]
    MalformedJson(String),
    #[error("the request body does not match the order schema: {0}")]
    InvalidBody(String),
    #[error("expected Content-Type: application/json")]
    UnsupportedMediaType,
    #[error("the request body exceeds the size limit")]
    PayloadTooLarge,
    #[error("the order is invalid")]
    Validation(Vec<FieldError>),
    #[error("unknown SKU(s): {}", .0.join(", "))]
    UnknownSku(Vec<String>),
    #[error("invalid Idempotency-Key: {0}")]
    InvalidIdempotencyKey(&'static str),
    #[error("this Idempotency-Key was already used with a different request body")]
    IdempotencyKeyReused,
    #[error("a request with this Idempotency-Key is still being processed; retry later")]
    IdempotencyKeyInFlight,
    #[error("invalid order id {0:?}: expected a UUID")]
    InvalidOrderId(String),
    #[error("order {0} not found")]
    OrderNotFound(uuid::Uuid),
    #[error("no such route")]
    RouteNotFound,
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    #[error("authentication required: {0}")]
    Unauthenticated(&'static str),
    #[error("the API key is not valid (unknown, malformed or revoked)")]
    InvalidKey,
    #[error("this API key may not do that: {0}")]
    Forbidden(&'static str),
    #[error("too many requests for this API key; retry after the Retry-After seconds")]
    RateLimited(std::time::Duration),
    #[error("too many open event streams ({0}); close one or retry later")]
    TooManyStreams(&'static str),
    #[error("no dead letter with message id {0:?}")]
    DeadLetterNotFound(String),
    #[error("the database is unavailable; retry later")]
    Unavailable(#[source] anyhow::Error),
    #[error("RabbitMQ is unavailable; retry later")]
    BrokerUnavailable(#[source] anyhow::Error),
    #[error("internal error")]
    Unexpected(#[from] anyhow::Error),
}

/// The body of every error answer.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable and machine-readable, e.g. `validation_failed`.
    pub code: String,
    /// For people.
    pub message: String,
    /// For `validation_failed` the invalid fields, for `unknown_sku` the
    /// SKUs; otherwise null.
    pub details: Option<Value>,
}

/// One invalid field of an order.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct FieldError {
    /// JSON path of the field, e.g. `items[0].quantity`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl ApiError {
    /// HTTP status and stable machine-readable code.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        use ApiError::*;
        match self {
            MalformedJson(_) => (StatusCode::BAD_REQUEST, "malformed_json"),
            InvalidBody(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_body"),
            UnsupportedMediaType => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
            PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            Validation(_) => (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
            UnknownSku(_) => (StatusCode::UNPROCESSABLE_ENTITY, "unknown_sku"),
            InvalidIdempotencyKey(_) => (StatusCode::BAD_REQUEST, "invalid_idempotency_key"),
            IdempotencyKeyReused => (StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused"),
            IdempotencyKeyInFlight => (StatusCode::CONFLICT, "idempotency_key_in_flight"),
            InvalidOrderId(_) => (StatusCode::BAD_REQUEST, "invalid_order_id"),
            OrderNotFound(_) => (StatusCode::NOT_FOUND, "order_not_found"),
            RouteNotFound => (StatusCode::NOT_FOUND, "not_found"),
            MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            Unauthenticated(_) => (StatusCode::UNAUTHORIZED, "unauthenticated"),
            InvalidKey => (StatusCode::UNAUTHORIZED, "invalid_api_key"),
            Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            RateLimited(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            TooManyStreams(_) => (StatusCode::TOO_MANY_REQUESTS, "too_many_streams"),
            DeadLetterNotFound(_) => (StatusCode::NOT_FOUND, "dead_letter_not_found"),
            Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "service_unavailable"),
            BrokerUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "broker_unavailable"),
            Unexpected(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
        }
    }

    fn details(&self) -> Value {
        match self {
            ApiError::Validation(fields) => json!(fields),
            ApiError::UnknownSku(skus) => json!({ "skus": skus }),
            _ => Value::Null,
        }
    }
}

impl ApiError {
    /// The same outage of the database or RabbitMQ, for another request that
    /// met it; `None` for any other error.
    pub fn outage_again(&self) -> Option<Self> {
        match self {
            ApiError::Unavailable(cause) => {
                Some(ApiError::Unavailable(anyhow::anyhow!("{cause:#}")))
            }
            ApiError::BrokerUnavailable(cause) => {
                Some(ApiError::BrokerUnavailable(anyhow::anyhow!("{cause:#}")))
            }
            _ => None,
        }
    }
}

/// A database error is the client's 503 when the database is unreachable, a
/// 500 otherwise.
impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        match &error {
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
                ApiError::Unavailable(error.into())
            }
            sqlx::Error::Database(db)
                if db
                    .code()
                    .is_some_and(|c| c.starts_with("57P") || c.starts_with("08")) =>
            {
                ApiError::Unavailable(error.into())
            }
            _ => ApiError::Unexpected(error.into()),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::JsonSyntaxError(e) => ApiError::MalformedJson(source_text(&e)),
            JsonRejection::JsonDataError(e) => ApiError::InvalidBody(source_text(&e)),
            JsonRejection::MissingJsonContentType(_) => ApiError::UnsupportedMediaType,
            other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
            other => ApiError::MalformedJson(other.body_text()),
        }
    }
}

/// The innermost cause: serde's own words, without axum's prefix.
fn source_text(error: &dyn std::error::Error) -> String {
    let mut current = error;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        match &self {
            ApiError::Unexpected(cause) => {
                tracing::error!(error.cause_chain = ?cause, error.message = %cause, "request failed");
            }
            ApiError::Unavailable(cause) => {
                tracing::warn!(error.message = %cause, "database unavailable");
            }
            ApiError::BrokerUnavailable(cause) => {
                tracing::warn!(error.message = %format!("{cause:#}"), "RabbitMQ unavailable");
            }
            _ => {}
        }
        let details = Some(self.details()).filter(|details| !details.is_null());
        let body = ErrorBody {
            error: ErrorDetail {
                code: code.to_owned(),
                message: self.to_string(),
                details,
            },
        };
        let mut response = (status, Json(body)).into_response();
        let headers = response.headers_mut();
        match &self {
            // RFC 6750: a missing key gets the bare challenge, a bad one
            // says so.
            ApiError::Unauthenticated(_) => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"orderflow\""),
                );
            }
            ApiError::InvalidKey => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"orderflow\", error=\"invalid_token\""),
                );
            }
            ApiError::RateLimited(wait) => {
                // Whole seconds, rounded up: never invite a retry too early.
                let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
            }
            ApiError::TooManyStreams(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(STREAM_RETRY_SECS));
            }
            _ => {}
        }
        response
    }
}
