use std::time::Duration;

use axum::{
    Extension,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use messaging::{
    amqp::Envelope,
    contracts::{OrderLine, OrderPlaced, SCHEMA_VERSION},
};
use platform::outbox::Outboxed;
use sqlx::PgConnection;
use uuid::Uuid;

use super::{HistoryEntry, OrderView, PricedLine};
use crate::{
    auth::Caller,
    domain::{OrderRequest, ValidOrder},
    error::{ApiError, ErrorBody, Result},
    idempotency::{self, IdempotencyKey, NextAction, SavedResponse},
    live::LiveEvent,
    routes::{CorrelationId, JsonBody},
    startup::AppState,
};

/// How long the request waits for the broker's confirm before answering
/// anyway: the order is already durable in the outbox.
const PUBLISH_WAIT: Duration = Duration::from_secs(2);

/// `POST /orders`: validate, store the order, its idempotency key and its
/// outbox message in one transaction, publish with confirms, answer 202.
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
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(correlation): Extension<CorrelationId>,
    headers: HeaderMap,
    body: std::result::Result<JsonBody<OrderRequest>, ApiError>,
) -> Result<Response> {
    let key = idempotency_key(&headers)?;
    let JsonBody(request) = body?;
    let hash = idempotency::request_hash(&request);
    let order = request
        .validate(state.max_quantity)
        .map_err(ApiError::Validation)?;

    let mut tx = state.pool.begin().await?;
    if let Some(key) = &key
        && let NextAction::ReturnSavedResponse(saved) =
            idempotency::try_start(&mut tx, &caller.client, key, &hash, state.idempotency_ttl)
                .await?
    {
        tracing::Span::current().record("order_id", tracing::field::display(saved.order_id));
        metrics::counter!("idempotent_replays_total").increment(1);
        tracing::info!("replaying the stored response for a repeated idempotency key");
        return Ok(respond(saved, true));
    }
    let lines = price(&mut tx, &order.items).await?;
    let order_id = Uuid::new_v4();
    tracing::Span::current().record("order_id", tracing::field::display(order_id));
    let view = insert_order(
        &mut tx,
        order_id,
        &caller.client,
        &order,
        lines,
        &correlation.0,
    )
    .await?;
    let placed = enqueue_placed(&mut tx, &state, &order, &view).await?;
    let saved = SavedResponse {
        status: StatusCode::ACCEPTED.as_u16(),
        body: serde_json::to_vec(&view).map_err(anyhow::Error::from)?,
        order_id,
    };
    if let Some(key) = &key {
        idempotency::save_response(&mut tx, &caller.client, key, &hash, &saved).await?;
    }
    tx.commit().await?;
    metrics::counter!("orders_accepted_total", "lane" => order.lane.as_str()).increment(1);
    state.feed.publish(LiveEvent {
        order_id,
        customer_id: view.customer_id.clone(),
        status: view.status.clone(),
        reason: None,
        lane: view.lane.clone(),
        at: view.created_at,
    });
    tracing::info!(
        lane = %view.lane, total_cents = view.total_cents, currency = %view.currency,
        items = view.items.len(), "order accepted"
    );

    match tokio::time::timeout(PUBLISH_WAIT, state.relay.publish_now(&placed)).await {
        Ok(Ok(())) => tracing::info!("order published to the work queue"),
        Ok(Err(error)) => tracing::warn!(
            error.message = %format!("{error:#}"),
            "publish failed; the outbox relay will retry"
        ),
        Err(_) => tracing::warn!("publish not confirmed in time; the outbox relay will retry"),
    }
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

/// Look up every SKU's price; unknown SKUs are the client's error.
async fn price(conn: &mut PgConnection, items: &[OrderLine]) -> Result<Vec<PricedLine>> {
    let skus: Vec<&str> = items.iter().map(|l| l.sku.as_str()).collect();
    let prices: Vec<(String, i64)> =
        sqlx::query_as("SELECT sku, price_cents FROM inventory WHERE sku = ANY($1)")
            .bind(&skus)
            .fetch_all(&mut *conn)
            .await?;
    let unknown: Vec<String> = items
        .iter()
        .filter(|l| !prices.iter().any(|(sku, _)| *sku == l.sku))
        .map(|l| l.sku.clone())
        .collect();
    if !unknown.is_empty() {
        return Err(ApiError::UnknownSku(unknown));
    }
    Ok(items
        .iter()
        .map(|line| PricedLine {
            sku: line.sku.clone(),
            quantity: line.quantity,
            unit_price_cents: prices
                .iter()
                .find(|(sku, _)| *sku == line.sku)
                .map_or(0, |(_, p)| *p),
        })
        .collect())
}

async fn insert_order(
    conn: &mut PgConnection,
    id: Uuid,
    client: &str,
    order: &ValidOrder,
    items: Vec<PricedLine>,
    correlation_id: &str,
) -> Result<OrderView> {
    let total_cents: i64 = items
        .iter()
        .map(|l| i64::from(l.quantity) * l.unit_price_cents)
        .sum();
    // The order and its first history line in one round trip.
    let history: HistoryEntry = sqlx::query_as(
        "WITH placed AS (
             INSERT INTO orders (id, customer_id, email, items, total_cents, currency, lane,
                                 shipping, callback_url, status, correlation_id, client)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'accepted', $10, $12)
             RETURNING id, created_at)
         INSERT INTO order_status_history (order_id, status, detail, service, at)
         SELECT id, 'accepted', $11, 'order-api', created_at FROM placed
         RETURNING status, detail, service, at",
    )
    .bind(id)
    .bind(&order.customer_id)
    .bind(&order.email)
    .bind(sqlx::types::Json(&items))
    .bind(total_cents)
    .bind(&order.currency)
    .bind(order.lane.as_str())
    .bind(order.shipping.as_ref().map(sqlx::types::Json))
    .bind(&order.callback_url)
    .bind(correlation_id)
    .bind(format!("queued on the {} lane", order.lane.as_str()))
    .bind(client)
    .fetch_one(&mut *conn)
    .await?;
    let created_at = history.at;
    Ok(OrderView {
        id,
        status: "accepted".into(),
        reason: None,
        customer_id: order.customer_id.clone(),
        email: order.email.clone(),
        items,
        total_cents,
        currency: order.currency.clone(),
        lane: order.lane.as_str().into(),
        callback_url: order.callback_url.clone(),
        shipping: order.shipping.clone(),
        correlation_id: correlation_id.into(),
        created_at,
        history: vec![history],
        payment: None,
    })
}

async fn enqueue_placed(
    conn: &mut PgConnection,
    state: &AppState,
    order: &ValidOrder,
    view: &OrderView,
) -> Result<Outboxed> {
    let envelope = Envelope {
        message_id: Uuid::new_v4(),
        correlation_id: view.correlation_id.clone(),
        order_id: view.id,
    };
    let message = OrderPlaced {
        schema_version: SCHEMA_VERSION,
        message_id: envelope.message_id,
        occurred_at: view.created_at,
        order_id: view.id,
        customer_id: order.customer_id.clone(),
        email: order.email.clone(),
        items: order.items.clone(),
        total_cents: view.total_cents,
        currency: order.currency.clone(),
        lane: order.lane,
        callback_url: order.callback_url.clone(),
    };
    let payload = serde_json::to_value(&message).map_err(anyhow::Error::from)?;
    Ok(platform::outbox::enqueue(
        conn,
        &state.topology.orders_exchange(),
        order.lane.as_str(),
        &envelope,
        &payload,
    )
    .await?)
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
