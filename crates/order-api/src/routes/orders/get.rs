//! `GET /orders/{id}`: one order and its history.

use axum::{
    Extension, Json,
    extract::{Path, State},
};
use sqlx::PgPool;
use uuid::Uuid;

use super::{OrderView, load_order};
use crate::{
    auth::Caller,
    error::{ApiError, ErrorBody, Result},
};

/// `GET /orders/{id}`: the order and its status history.
#[utoipa::path(
    get,
    path = "/orders/{id}",
    tag = "orders",
    summary = "An order and its history",
    description = "A client key sees only the orders placed with its client's keys; any other \
                   order is `404`, as if it did not exist. An admin key sees every order.",
    params(("id" = Uuid, Path, description = "The order id")),
    security(("api_key" = [])),
    responses(
        (status = 200, description = "The order", body = OrderView),
        (status = 400, description = "Not a UUID (`invalid_order_id`)", body = ErrorBody),
        (status = 401, description = "No API key, or not a live one (`unauthenticated`, `invalid_api_key`)", body = ErrorBody),
        (status = 404, description = "No such order among the caller's (`order_not_found`)", body = ErrorBody),
        (status = 429, description = "Over the request rate (`rate_limited`)", body = ErrorBody,
         headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 500, description = "Unexpected (`internal_error`)", body = ErrorBody),
        (status = 503, description = "The database is unavailable; retry (`service_unavailable`)", body = ErrorBody),
    )
)]
#[tracing::instrument(name = "get_order", skip_all, fields(order_id = %raw_id))]
pub async fn get_order(
    State(pool): State<PgPool>,
    Extension(caller): Extension<Caller>,
    Path(raw_id): Path<String>,
) -> Result<Json<OrderView>> {
    let id = Uuid::parse_str(&raw_id).map_err(|_| ApiError::InvalidOrderId(raw_id.clone()))?;
    let mut conn = pool.acquire().await?;
    load_order(&mut conn, id, caller.owner())
        .await?
        .map(Json)
        .ok_or(ApiError::OrderNotFound(id))
}
