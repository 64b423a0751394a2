//! The HTTP surface: routes, the JSON body extractor, correlation ids, and
//! JSON answers for unknown routes and methods.

pub mod dashboard;
pub mod orders;

use axum::{
    Extension, Router,
    extract::{DefaultBodyLimit, FromRequest, MatchedPath, Request},
    http::{HeaderName, HeaderValue},
    middleware::{self, Next},
    response::Response,
    routing::{get, post},
};
use tower_http::trace::TraceLayer;
use uuid::Uuid;

use crate::{
    auth::{self, Caller},
    error::ApiError,
    startup::AppState,
};

/// `GET /metrics`: Prometheus text, for admin keys (a scraper sends one as
/// its bearer token).
async fn metrics(Extension(caller): Extension<Caller>) -> Result<Response, ApiError> {
    if !caller.is_admin() {
        return Err(ApiError::Forbidden("metrics are for admin keys"));
    }
    Ok(platform::metrics::render())
}

/// Header carrying the correlation id in and out.
pub const CORRELATION_ID: HeaderName = HeaderName::from_static("x-correlation-id");

/// The correlation id of the current request.
#[derive(Debug, Clone)]
pub struct CorrelationId(pub String);

/// `axum::Json`, but rejections become our JSON errors.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct JsonBody<T>(pub T);

/// Every route. Orders, their events, `/metrics` and the live page's data
/// need an API key; `/healthz`, `/readyz`, the API's documentation and the
/// live page itself (`/`, which asks for a key) are public.
pub fn router(state: AppState, health: Router, max_body_bytes: usize) -> Router {
    // Install the recorder now: what is counted before the first scrape counts.
    platform::metrics::handle();
    let max_quantity = state.max_quantity;
    let keyed = Router::new()
        .route("/orders", post(orders::create_order))
        .route("/orders/{id}", get(orders::get_order))
        .route("/orders/{id}/events", get(orders::events::order_events))
        .route("/events", get(orders::events::all_events))
        .route("/metrics", get(metrics))
        .route("/dashboard/queues", get(dashboard::queues))
        .route("/dashboard/orders", get(dashboard::orders))
        .route("/dashboard/dead-letters", get(dashboard::dead_letters))
        .route("/dashboard/dead-letters/replay", post(dashboard::replay))
        .route("/dashboard/burst", post(dashboard::burst))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ))
        .with_state(state);
    Router::new()
        .merge(keyed)
        .route("/", get(dashboard::page))
        .route("/live.js", get(dashboard::script))
        .route("/live.css", get(dashboard::style))
        // Browsers ask for /favicon.ico unless the page names its icon.
        .route("/favicon.svg", get(dashboard::icon))
        .route("/favicon.ico", get(dashboard::icon))
        .merge(crate::openapi::router(max_quantity))
        .merge(health)
        .fallback(|| async { ApiError::RouteNotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(
            TraceLayer::new_for_http().make_span_with(|request: &Request| {
                let path = request
                    .extensions()
                    .get::<MatchedPath>()
                    .map_or(request.uri().path(), MatchedPath::as_str);
                let correlation_id = request
                    .extensions()
                    .get::<CorrelationId>()
                    .map_or("-", |c| c.0.as_str());
                tracing::info_span!("http", method = %request.method(), path, correlation_id)
            }),
        )
        .layer(middleware::from_fn(correlate))
}

/// Take the client's `X-Correlation-Id` (if sane) or make one, and echo it.
async fn correlate(mut request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get(&CORRELATION_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| Uuid::new_v4().to_string(), str::to_owned);
    request.extensions_mut().insert(CorrelationId(id.clone()));
    let mut response = next.run(request).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(CORRELATION_ID, value);
    }
    response
}
