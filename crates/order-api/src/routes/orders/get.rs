use axum::{
    Json,
    extract::{Path, State},
};
use uuid::Uuid;

use super::{OrderView, load_order};
use crate::{
    error::{ApiError, Result},
    startup::AppState,
};

/// `GET /orders/{id}`: the order and its status history.
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
