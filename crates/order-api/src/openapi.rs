//! The API described as OpenAPI 3.1, generated from the handlers and types:
//! `GET /openapi.json`, and an interactive page at `GET /docs`.

use axum::{Json, Router, response::Html, routing::get};
use utoipa::{
    Modify, OpenApi,
    openapi::security::{Http, HttpAuthScheme, SecurityScheme},
};
use utoipa_scalar::Scalar;

use crate::{
    domain::{ItemRequest, OrderRequest, Shipping},
    error::{ErrorBody, ErrorDetail, FieldError},
    live::LiveEvent,
    routes::orders::{self, HistoryEntry, OrderView, PaymentStep, PaymentView, PricedLine},
};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "orderflow order-api",
        description = "Place orders and follow them. Every request but the health checks and \
                       this document needs `Authorization: Bearer <API key>` (made with \
                       `api-keys create`). A client key sees only its own orders; an admin key \
                       sees all. Every error is `{\"error\": {\"code\", \"message\", \"details\"}}`; \
                       `code` is stable."
    ),
    modifiers(&BearerKeys),
    paths(
        orders::post::create_order,
        orders::get::get_order,
        orders::events::order_events,
        orders::events::all_events
    ),
    components(schemas(
        OrderRequest, ItemRequest, Shipping, OrderView, PricedLine, HistoryEntry, PaymentView, PaymentStep,
        ErrorBody, ErrorDetail, FieldError, LiveEvent
    )),
    tags((name = "orders", description = "Placing and reading orders"))
)]
pub struct ApiDoc;

/// The `api_key` security scheme the paths name.
struct BearerKeys;

impl Modify for BearerKeys {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let mut scheme = Http::new(HttpAuthScheme::Bearer);
        scheme.description = Some(
            "An order-api key (`api-keys create --client NAME`); wrong, missing or revoked: 401"
                .into(),
        );
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme("api_key", SecurityScheme::Http(scheme));
    }
}

/// `/openapi.json` and `/docs`.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    let spec = ApiDoc::openapi();
    let page = Scalar::new(spec.clone()).to_html();
    Router::new()
        .route("/openapi.json", get(move || async move { Json(spec) }))
        .route("/docs", get(move || async move { Html(page) }))
}
