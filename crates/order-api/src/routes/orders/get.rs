use axum::{
    Json,
    extract::{Path, State},
};
use uuid::Uuid;

use super::{OrderView, load_order};
use crate::{
    error::{ApiError, ErrorBody, Result},
    startup::AppState,
};

/// `GET /orders/{id}`: the order and its status history.
#[utoipa::path(
    get,
    path = "/orders/{id}",
    tag = "orders",
    summary = "An order and its history",
    params(("id" = String, Path, description = "The order id (a UUID)")),
    responses(
        (status = 200, description = "The order", body = OrderView),
        (status = 400, description = "Not a UUID (`invalid_order_id`)", body = ErrorBody),
        (status = 404, description = "No such order (`order_not_found`)", body = ErrorBody),
        (status = 500, description = "Unexpected (`internal_error`)", body = ErrorBody),
        (status = 503, description = "The database is unavailable; retry (`service_unavailable`)", body = ErrorBody),
    )
)]
#[tracing::instrument(name = "get_order", skip_all, fields(order_id = %raw_id))]
pub async fn get_order(
    State(state): State<AppState>,
    Path(raw_id): Path<String>,
) -> Result<Json<OrderView>> {
    let id = Uuid::parse_str(&raw_id).map_err(|_| ApiError::InvalidOrderId(raw_id.clone()))?;
    let mut conn = state.pool.acquire().await?;
    load_order(&mut conn, id)
        .await?
        .map(Json)
        .ok_or(ApiError::OrderNotFound(id))
}
