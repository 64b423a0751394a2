//! Every route, with the API's document and the layers around them. Orders,
//! their events, `/metrics` and the live page's data need an API key;
//! `/healthz`, `/readyz`, the API's documentation and the live page itself
//! (`/`, which asks for a key) are public.

use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, MatchedPath, Request},
    middleware,
    response::Html,
    routing::{get, post},
};
use tower_http::trace::TraceLayer;
use utoipa_scalar::Scalar;

use crate::{
    auth,
    correlation::{self, CorrelationId},
    error::ApiError,
    openapi,
    routes::{dashboard, metrics::metrics, orders},
    state::AppState,
};

/// The app's router: every route of `state`, `health`'s, the document of
/// the API, and the body limit, tracing and correlation ids around them.
pub fn router(state: AppState, health: Router, max_body_bytes: usize) -> Router {
    // Install the recorder now: what is counted before the first scrape counts.
    platform::metrics::handle();
    let document = documentation(state.max_quantity.0);
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
            state.auth.clone(),
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
        .merge(document)
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
        .layer(middleware::from_fn(correlation::correlate))
}

/// `/openapi.json` and `/docs`: the API's document as this server enforces
/// it (with its `max_quantity`), and an interactive page of it.
fn documentation(max_quantity: i32) -> Router {
    let spec = openapi::document(max_quantity);
    let page = Scalar::new(spec.clone()).to_html();
    Router::new()
        .route("/openapi.json", get(move || async move { Json(spec) }))
        .route("/docs", get(move || async move { Html(page) }))
}
