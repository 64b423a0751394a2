//! The API described as OpenAPI 3.1, generated from the handlers and types
//! (served at `GET /openapi.json` and `GET /docs` by [`crate::router`]).

use serde_json::{Value, json};
use utoipa::{
    Modify, OpenApi,
    openapi::{
        RefOr, Schema,
        header::Header,
        response::Response,
        security::{Http, HttpAuthScheme, SecurityScheme},
    },
};

use crate::{
    domain::{
        ItemRequest, OrderRequest, PricedLine, Shipping, VISIBLE_TEXT_FIELDS, VISIBLE_TEXT_PATTERN,
    },
    error::{ErrorBody, ErrorDetail, FieldError},
    live::{LiveEvent, SseEvent},
    routes::orders::{self, HistoryEntry, OrderView, PaymentStep, PaymentView},
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
    modifiers(&BearerKeys, &KeyedAnswers, &VisibleText),
    paths(
        orders::post::create_order,
        orders::get::get_order,
        orders::events::order_events,
        orders::events::all_events
    ),
    components(schemas(
        OrderRequest, ItemRequest, Shipping, OrderView, PricedLine, HistoryEntry, PaymentView, PaymentStep,
        ErrorBody, ErrorDetail, FieldError, LiveEvent, SseEvent
    )),
    tags((name = "orders", description = "Placing and reading orders"))
)]
pub struct ApiDoc;

/// The pattern of visible text on each field that holds it (see
/// [`VISIBLE_TEXT_PATTERN`]).
struct VisibleText;

impl Modify for VisibleText {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let schemas = &mut openapi
            .components
            .as_mut()
            .expect("the document has components")
            .schemas;
        for (schema, field) in VISIBLE_TEXT_FIELDS {
            let Some(RefOr::T(Schema::Object(object))) = schemas.get_mut(schema) else {
                panic!("{schema} is not an object schema of the document");
            };
            let Some(RefOr::T(Schema::Object(property))) = object.properties.get_mut(field) else {
                panic!("{schema} has no text field {field}");
            };
            property.pattern = Some(VISIBLE_TEXT_PATTERN.to_owned());
        }
    }
}

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

/// What every keyed operation may answer besides what its handler does:
/// the key check (401, with its `WWW-Authenticate` challenge), the rate
/// limit (429, `Retry-After`), the request deadline (408) and the database
/// behind the key check (500, 503). A handler's own description of one of
/// these is kept; only the headers are added to it. Every answer carries
/// `X-Correlation-Id`.
struct KeyedAnswers;

impl KeyedAnswers {
    fn error(description: &str) -> RefOr<Response> {
        serde_json::from_value(json!({
            "description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
        }))
        .expect("a valid response object")
    }

    fn header(description: &str, schema: Value) -> Header {
        serde_json::from_value(json!({"description": description, "schema": schema}))
            .expect("a valid header object")
    }
}

impl Modify for KeyedAnswers {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let common = [
            (
                "401",
                "No API key, or not a live one (`unauthenticated`, `invalid_api_key`)",
            ),
            (
                "408",
                "No answer within HTTP_REQUEST_TIMEOUT_MS, 30 s by default (`request_timeout`)",
            ),
            ("429", "Over the API key's request rate (`rate_limited`)"),
            ("500", "Unexpected (`internal_error`)"),
            (
                "503",
                "The database is unavailable; retry (`service_unavailable`)",
            ),
        ];
        for item in openapi.paths.paths.values_mut() {
            let operations = [&mut item.get, &mut item.post].into_iter().flatten();
            for operation in operations.filter(|o| o.security.is_some()) {
                let responses = &mut operation.responses.responses;
                for (status, description) in common {
                    responses
                        .entry(status.into())
                        .or_insert_with(|| Self::error(description));
                }
                for response in responses.values_mut() {
                    if let RefOr::T(response) = response {
                        response.headers.insert(
                            "X-Correlation-Id".into(),
                            Self::header(
                                "The request's correlation id: the client's, or the one made for it",
                                json!({"type": "string"}),
                            ),
                        );
                    }
                }
                if let Some(RefOr::T(unauthorized)) = responses.get_mut("401") {
                    unauthorized.headers.insert(
                        "WWW-Authenticate".into(),
                        Self::header(
                            "`Bearer realm=\"orderflow\"`, with `error=\"invalid_token\"` for a bad key",
                            json!({"type": "string"}),
                        ),
                    );
                }
                if let Some(RefOr::T(limited)) = responses.get_mut("429") {
                    limited.headers.insert(
                        "Retry-After".into(),
                        Self::header("Seconds to wait", json!({"type": "integer", "minimum": 1})),
                    );
                }
            }
        }
    }
}

/// The document as this server enforces it. Patched as JSON, for what
/// utoipa's types cannot hold or know: the quantity limit is a setting
/// (MAX_QUANTITY), so the served document states the configured one; an
/// event's `data` holds a LiveEvent (`contentSchema`, which utoipa drops).
pub fn document(max_quantity: i32) -> Value {
    let mut spec = serde_json::to_value(ApiDoc::openapi()).expect("the document serializes");
    let schemas = &mut spec["components"]["schemas"];
    schemas["ItemRequest"]["properties"]["quantity"]["maximum"] = json!(max_quantity);
    schemas["SseEvent"]["oneOf"][0]["properties"]["data"]["contentSchema"] =
        json!({"$ref": "#/components/schemas/LiveEvent"});
    spec
}
