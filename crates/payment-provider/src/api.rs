//! The provider's HTTP API, in the style of card providers' APIs:
//!
//! | request | what it does |
//! |---|---|
//! | `POST /v1/authorisations` | hold `amount_cents` for `reference` (manual capture) |
//! | `POST /v1/authorisations/{reference}/capture` | take the held amount |
//! | `POST /v1/authorisations/{reference}/void` | release the hold |
//! | `GET /v1/authorisations/{reference}` | where the authorisation stands |
//! | `PUT /faults/latency` | change the latency (only with `DEMO_FAILURES`) |
//!
//! Every POST needs an `Idempotency-Key` header, with the semantics
//! orderflow's own API gives its clients: the first answer is stored with
//! the work and given again (`Idempotent-Replayed: true`) to the same
//! request with the same key; the key with another request is refused
//! (422); a key whose first request is still at work gets 409. A POST's
//! answer is `200` with the outcome (`authorised`, `declined`, `captured`,
//! `voided`), `400 unexpected_state` for what the authorisation's state does
//! not allow (capturing a voided one), and `503` for an injected failure.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{
    Json, Router,
    extract::{FromRequest, Path, Request, State, rejection::JsonRejection},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post, put},
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::{
    books::{Books, Operation, Recorded, Request as Asked},
    faults,
};

/// Everything a request needs.
#[derive(Clone)]
pub struct Provider {
    pub books: Books,
    /// The latency of every request, in ms; changed by `PUT /faults/latency`.
    pub latency_ms: Arc<AtomicU64>,
    pub demo_failures: bool,
    /// How long an injected timeout holds its answer.
    pub slow_answer: Duration,
    /// SHA-256 of the API key callers must send, if one is set.
    pub api_key_digest: Option<[u8; 32]>,
}

/// The API's routes (health aside).
pub fn router(provider: Provider) -> Router {
    let mut router = Router::new()
        .route("/v1/authorisations", post(authorise))
        .route("/v1/authorisations/{reference}", get(read))
        .route("/v1/authorisations/{reference}/capture", post(capture))
        .route("/v1/authorisations/{reference}/void", post(void));
    if provider.demo_failures {
        router = router.route("/faults/latency", put(set_latency));
    }
    router
        .route_layer(middleware::from_fn_with_state(
            provider.clone(),
            authenticate,
        ))
        .with_state(provider)
}

/// `POST /v1/authorisations`'s body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Authorise {
    /// The merchant's reference: one authorisation per reference.
    reference: Uuid,
    amount_cents: i64,
    currency: String,
    /// The merchant's customer id (demo failures are asked for by it).
    #[serde(default)]
    customer_id: String,
}

/// A capture's or void's body: all optional.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Settle {
    #[serde(default)]
    customer_id: String,
}

/// A POST's answer.
#[derive(Serialize)]
struct Answer {
    reference: Uuid,
    operation: &'static str,
    outcome: String,
    amount_cents: i64,
}

async fn authorise(
    State(provider): State<Provider>,
    headers: HeaderMap,
    body: Result<Json<Authorise>, JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(body) => body,
        Err(rejection) => {
            return rejected(&rejection);
        }
    };
    if body.amount_cents < 0 {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "amount_cents must not be negative",
        );
    }
    if body.currency.len() != 3 || !body.currency.bytes().all(|b| b.is_ascii_uppercase()) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "currency must be three capital letters (ISO 4217)",
        );
    }
    let asked = Asked {
        operation: Operation::Authorise,
        reference: body.reference,
        amount_cents: body.amount_cents,
        currency: body.currency,
    };
    provider.make(&headers, asked, &body.customer_id).await
}

async fn capture(
    State(provider): State<Provider>,
    Path(reference): Path<Uuid>,
    headers: HeaderMap,
    request: Request,
) -> Response {
    settle(provider, Operation::Capture, reference, headers, request).await
}

async fn void(
    State(provider): State<Provider>,
    Path(reference): Path<Uuid>,
    headers: HeaderMap,
    request: Request,
) -> Response {
    settle(provider, Operation::Void, reference, headers, request).await
}

/// A capture or a void: the body may be empty.
async fn settle(
    provider: Provider,
    operation: Operation,
    reference: Uuid,
    headers: HeaderMap,
    request: Request,
) -> Response {
    let empty = headers
        .get(header::CONTENT_LENGTH)
        .is_some_and(|length| length == "0")
        || !headers.contains_key(header::CONTENT_TYPE);
    let body = if empty {
        Settle::default()
    } else {
        match Json::<Settle>::from_request(request, &()).await {
            Ok(Json(body)) => body,
            Err(rejection) => {
                return rejected(&rejection);
            }
        }
    };
    let asked = Asked {
        operation,
        reference,
        amount_cents: 0,
        currency: String::new(),
    };
    provider.make(&headers, asked, &body.customer_id).await
}

impl Provider {
    /// Make `asked` under the request's idempotency key, and answer.
    async fn make(&self, headers: &HeaderMap, asked: Asked, customer_id: &str) -> Response {
        let key = match idempotency_key(headers) {
            Ok(key) => key,
            Err(response) => return *response,
        };
        let latency = self.latency_ms.load(Ordering::Relaxed);
        if latency > 0 {
            tokio::time::sleep(Duration::from_millis(latency)).await;
        }
        let fault = self
            .demo_failures
            .then(|| faults::asked_for(customer_id, asked.operation.as_str()))
            .flatten();
        let (recorded, calls) = match self.books.make(key, &asked, fault).await {
            Ok(made) => made,
            Err(failure) => {
                tracing::error!(error = %failure, operation = %asked.operation, "the books could not be reached");
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "the provider's books could not be reached; retry with the same key",
                );
            }
        };
        match recorded {
            Recorded::KeyInUse => error(
                StatusCode::CONFLICT,
                "idempotency_key_in_use",
                "a request with this Idempotency-Key is at work; retry later",
            ),
            Recorded::KeyReused => error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "this Idempotency-Key was used for another request",
            ),
            Recorded::Failed => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "injected failure: nothing was done; retry with the same key",
            ),
            Recorded::Answered {
                outcome,
                amount_cents,
                replayed,
            } => {
                tracing::info!(operation = %asked.operation, reference = %asked.reference, outcome = %outcome, replayed, "request answered");
                if matches!(fault, Some(fault @ faults::Fault::SlowUpTo(_)) if fault.applies(calls))
                {
                    tokio::time::sleep(self.slow_answer).await;
                }
                let mut response = match outcome.strip_prefix("refused: ") {
                    Some(why) => error(StatusCode::BAD_REQUEST, "unexpected_state", why),
                    None => Json(Answer {
                        reference: asked.reference,
                        operation: asked.operation.as_str(),
                        outcome,
                        amount_cents,
                    })
                    .into_response(),
                };
                if replayed {
                    response
                        .headers_mut()
                        .insert("idempotent-replayed", HeaderValue::from_static("true"));
                }
                response
            }
        }
    }
}

/// The request's `Idempotency-Key`: 1 to 255 visible ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> Result<&str, Box<Response>> {
    let key = headers
        .get("idempotency-key")
        .and_then(|key| key.to_str().ok())
        .filter(|key| (1..=255).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic()));
    key.ok_or_else(|| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            "idempotency_key_required",
            "every POST needs an Idempotency-Key header of 1 to 255 visible ASCII characters",
        ))
    })
}

async fn read(State(provider): State<Provider>, Path(reference): Path<Uuid>) -> Response {
    match provider.books.read(reference).await {
        Ok(Some((state, amount_cents, currency))) => Json(json!({
            "reference": reference,
            "state": state,
            "amount_cents": amount_cents,
            "currency": currency,
        }))
        .into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no authorisation has this reference",
        ),
        Err(failure) => {
            tracing::error!(error = %failure, "the books could not be reached");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the provider's books could not be reached",
            )
        }
    }
}

/// The most latency `PUT /faults/latency` sets: below the server's own
/// request timeout.
const MAX_LATENCY_MS: u64 = 20_000;

/// `PUT /faults/latency`'s body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Latency {
    latency_ms: u64,
}

async fn set_latency(
    State(provider): State<Provider>,
    body: Result<Json<Latency>, JsonRejection>,
) -> Response {
    match body {
        Ok(Json(Latency { latency_ms })) if latency_ms > MAX_LATENCY_MS => error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            &format!("latency_ms may be at most {MAX_LATENCY_MS}"),
        ),
        Ok(Json(Latency { latency_ms })) => {
            provider.latency_ms.store(latency_ms, Ordering::Relaxed);
            tracing::warn!(latency_ms, "latency changed");
            Json(json!({ "latency_ms": latency_ms })).into_response()
        }
        Err(rejection) => rejected(&rejection),
    }
}

/// Refuse a request without the API key, when one is set.
async fn authenticate(State(provider): State<Provider>, request: Request, next: Next) -> Response {
    let Some(expected) = provider.api_key_digest else {
        return next.run(request).await;
    };
    let sent = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    // Digests of equal length are compared, so the time taken says nothing
    // about the key.
    match sent {
        Some(key) if digest(key) == expected => next.run(request).await,
        _ => error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send the provider's API key as `Authorization: Bearer <key>`",
        ),
    }
}

/// SHA-256 of an API key.
pub fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// A body that could not be read as JSON: too big (413), not JSON (415),
/// or not the request (400).
fn rejected(rejection: &JsonRejection) -> Response {
    let (status, code) = match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => {
            (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
        }
        _ => (StatusCode::BAD_REQUEST, "invalid_request"),
    };
    error(status, code, &rejection.body_text())
}

/// An error in the shape orderflow's APIs answer with.
fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!({ "error": { "code": code, "message": message, "details": null } })),
    )
        .into_response()
}
