//! `GET /dashboard/orders`: where recent orders stand, as far as every
//! service has taken them.

use axum::{
    Extension, Json,
    extract::{Query, State},
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use super::admin;
use crate::{
    auth::Caller,
    error::{ApiError, FieldError, Result},
};

/// The most orders `GET /dashboard/orders` looks up at once.
const MAX_LOOKUP: usize = 100;

/// Which orders `GET /dashboard/orders` looks up.
#[derive(Debug, Deserialize)]
pub struct Lookup {
    /// Comma-separated order ids, at most 100.
    ids: Option<String>,
}

/// Where one order stands, as far as every service has taken it.
#[derive(Debug, Serialize)]
pub struct Standing {
    id: Uuid,
    customer_id: String,
    lane: String,
    status: String,
    reason: Option<String>,
    processed_by: Option<String>,
    created_at: DateTime<Utc>,
    /// The notification-service sent its email.
    notified: bool,
    /// The logging-service wrote its audit record.
    audited: bool,
}

/// `GET /dashboard/orders?ids=…`: where each of these orders stands.
pub async fn orders(
    State(pool): State<PgPool>,
    Extension(caller): Extension<Caller>,
    Query(lookup): Query<Lookup>,
) -> Result<Json<Vec<Standing>>> {
    admin(&caller)?;
    let Some(ids) = lookup.ids else {
        return Err(ApiError::Validation(vec![FieldError::new(
            "ids",
            "comma-separated order ids are required",
        )]));
    };
    let ids = ids
        .split(',')
        .filter(|id| !id.is_empty())
        .take(MAX_LOOKUP + 1)
        .map(|id| Uuid::parse_str(id).map_err(|_| ApiError::InvalidOrderId(id.to_owned())))
        .collect::<Result<Vec<_>>>()?;
    if ids.len() > MAX_LOOKUP {
        return Err(ApiError::Validation(vec![FieldError::new(
            "ids",
            format!("at most {MAX_LOOKUP} order ids"),
        )]));
    }
    let standings = sqlx::query_as!(
        Standing,
        r#"SELECT o.id, o.customer_id, o.lane, o.status, o.reason, o.processed_by, o.created_at,
                  EXISTS (SELECT 1 FROM notifications n WHERE n.order_id = o.id) AS "notified!",
                  EXISTS (SELECT 1 FROM audit_log a WHERE a.order_id = o.id) AS "audited!"
           FROM orders o WHERE o.id = ANY($1)"#,
        &ids,
    )
    .fetch_all(&pool)
    .await?;
    Ok(Json(standings))
}
