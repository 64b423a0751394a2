//! `POST /orders`: place an order.

use axum::{
    Extension,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};

use super::OrderView;
use crate::{
    announcer::Announcer,
    auth::Caller,
    correlation::CorrelationId,
    domain::OrderRequest,
    error::{ApiError, ErrorBody, Result},
    idempotency::{self, IdempotencyKey, SavedResponse},
    intake::{Intake, Placed, Placement},
    routes::JsonBody,
};

/// The largest quantity one line may ask for (`MAX_QUANTITY`).
#[derive(Debug, Clone, Copy)]
pub struct MaxQuantity(pub i32);

/// `POST /orders`: validate, store the order, its idempotency key and its
/// outbox message in one transaction (shared with the orders of concurrent
/// requests, see [`crate::intake`]), publish with confirms, answer 202.
#[utoipa::path(
    post,
    path = "/orders",
    tag = "orders",
    summary = "Place an order",
    description = "Stores the order durably and queues it for processing; `202` means it will \
                   be processed even if the broker is down right now. With an `Idempotency-Key`, \
                   a retry with the same body gets the first answer again (`Idempotent-Replayed: true`).",
    request_body(content = OrderRequest, content_type = "application/json"),
    security(("api_key" = [])),
    params(
        ("Idempotency-Key" = Option<String>, Header, nullable = false, min_length = 1, max_length = 255, pattern = r"^[\x21-\x7E]{1,255}$",
         description = "1–255 visible ASCII characters (no spaces); makes retries safe. Each client's keys are its own; \
                        reused with another body: `422 idempotency_key_reused`."),
        ("X-Correlation-Id" = Option<String>, Header, nullable = false,
         description = "Carried through every service's logs and echoed in the answer. Never refused: \
                        anything but 1–128 visible ASCII characters is replaced by a new id, as is an absent one."),
    ),
    responses(
        (status = 202, description = "Accepted; `Location` names the order", body = OrderView,
         headers(("Location" = String, description = "/orders/{id}"),
                 ("Idempotent-Replayed" = String, description = "`true` on the replayed answer to a repeated Idempotency-Key"))),
        (status = 200, description = "Never sent: a replay repeats the first answer's status (202) with `Idempotent-Replayed: true`"),
        (status = 400, description = "Malformed JSON or a bad Idempotency-Key (`malformed_json`, `invalid_idempotency_key`)", body = ErrorBody),
        (status = 401, description = "No API key, or not a live one (`unauthenticated`, `invalid_api_key`)", body = ErrorBody),
        (status = 409, description = "A request with this Idempotency-Key is still in flight (`idempotency_key_in_flight`)", body = ErrorBody),
        (status = 413, description = "Body over MAX_BODY_BYTES, 64 KiB by default (`payload_too_large`)", body = ErrorBody),
        (status = 415, description = "Content-Type is not application/json (`unsupported_media_type`)", body = ErrorBody),
        (status = 422, description = "Wrong types, missing or unknown fields, invalid values, unknown SKUs, or a reused Idempotency-Key with another body (`invalid_body`, `validation_failed`, `unknown_sku`, `idempotency_key_reused`)", body = ErrorBody),
        (status = 429, description = "Over the API key's request rate (`rate_limited`)", body = ErrorBody,
         headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 500, description = "Unexpected (`internal_error`)", body = ErrorBody),
        (status = 503, description = "The database is unavailable; retry (`service_unavailable`)", body = ErrorBody),
    )
)]
#[tracing::instrument(
    name = "create_order",
    skip_all,
    fields(order_id = tracing::field::Empty)
)]
pub async fn create_order(
    State(intake): State<Intake>,
    State(announcer): State<Announcer>,
    State(MaxQuantity(max_quantity)): State<MaxQuantity>,
    Extension(caller): Extension<Caller>,
    Extension(correlation): Extension<CorrelationId>,
    headers: HeaderMap,
    body: std::result::Result<JsonBody<OrderRequest>, ApiError>,
) -> Result<Response> {
    let key = idempotency_key(&headers)?;
    let JsonBody(request) = body?;
    let hash = idempotency::request_hash(&request);
    let order = request
        .validate(max_quantity)
        .map_err(ApiError::Validation)?;

    let placement = Placement {
        client: caller.client.clone(),
        key: key.map(|key| (key, hash)),
        order,
        correlation_id: correlation.0.clone(),
    };
    let (saved, order, placed) = match intake.place(placement).await? {
        Placed::Replayed(saved) => {
            tracing::Span::current().record("order_id", tracing::field::display(saved.order_id));
            metrics::counter!("idempotent_replays_total").increment(1);
            tracing::info!("replaying the stored response for a repeated idempotency key");
            return Ok(respond(saved, true));
        }
        Placed::Accepted {
            saved,
            order,
            message,
        } => (saved, order, message),
    };
    tracing::Span::current().record("order_id", tracing::field::display(order.id));
    announcer.announce(&order, placed.as_ref()).await;
    Ok(respond(saved, false))
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<IdempotencyKey>> {
    headers
        .get("idempotency-key")
        .map(|value| {
            let text = value
                .to_str()
                .map_err(|_| ApiError::InvalidIdempotencyKey("must be visible ASCII"))?;
            IdempotencyKey::parse(text).map_err(ApiError::InvalidIdempotencyKey)
        })
        .transpose()
}

fn respond(saved: SavedResponse, replayed: bool) -> Response {
    let status = StatusCode::from_u16(saved.status).unwrap_or(StatusCode::ACCEPTED);
    let mut response = (status, saved.body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(location) = HeaderValue::from_str(&format!("/orders/{}", saved.order_id)) {
        headers.insert(header::LOCATION, location);
    }
    if replayed {
        headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}
