//! The gate in front of the keyed routes: a live key, under its rate limit.

use axum::{
    extract::{Request, State},
    http::header,
    middleware::Next,
    response::Response,
};

use super::{KeyLookup, RateLimits};
use crate::error::ApiError;

/// What [`authenticate`] needs: the key lookup and the rate limits.
#[derive(Clone)]
pub struct AuthState {
    pub keys: KeyLookup,
    pub rate_limits: RateLimits,
}

/// Middleware: let the request through only with a live key under its rate
/// limit, and tell the handlers who the caller is.
pub async fn authenticate(
    State(auth): State<AuthState>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let key = bearer(&request)?;
    let caller = auth.keys.caller(key).await?.ok_or(ApiError::InvalidKey)?;
    if let Err(wait) = auth.rate_limits.check(caller.key_id) {
        metrics::counter!("http_rate_limited_total").increment(1);
        return Err(ApiError::RateLimited(wait));
    }
    request.extensions_mut().insert(caller);
    Ok(next.run(request).await)
}

/// The key's text from `Authorization: Bearer <key>`.
fn bearer(request: &Request) -> Result<&str, ApiError> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)
        .ok_or(ApiError::Unauthenticated(
            "send Authorization: Bearer <API key>",
        ))?;
    let text = value.to_str().map_err(|_| ApiError::InvalidKey)?.trim();
    let (scheme, key) = text.split_once(' ').ok_or(ApiError::InvalidKey)?;
    if !scheme.eq_ignore_ascii_case("bearer") || key.trim().is_empty() {
        return Err(ApiError::Unauthenticated(
            "the Authorization scheme must be Bearer",
        ));
    }
    Ok(key.trim())
}
