//! `GET /metrics`: Prometheus text, for admin keys (a scraper sends one as
//! its bearer token).

use axum::{Extension, response::Response};

use crate::{auth::Caller, error::ApiError};

/// `GET /metrics`.
pub async fn metrics(Extension(caller): Extension<Caller>) -> Result<Response, ApiError> {
    if !caller.is_admin() {
        return Err(ApiError::Forbidden("metrics are for admin keys"));
    }
    Ok(platform::metrics::render())
}
