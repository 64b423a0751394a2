//! The page itself, its script, style and icon: public (they hold no
//! data; the page asks for an admin key), each with headers that keep it to
//! its own origin.

use axum::{
    http::{HeaderValue, header},
    response::{IntoResponse, Response},
};

/// Where on the page the journeys, queues and buttons are.
pub async fn page() -> Response {
    asset(
        "text/html; charset=utf-8",
        include_str!("../../../static/index.html"),
    )
}

pub async fn script() -> Response {
    asset(
        "text/javascript; charset=utf-8",
        include_str!("../../../static/live.js"),
    )
}

pub async fn style() -> Response {
    asset(
        "text/css; charset=utf-8",
        include_str!("../../../static/live.css"),
    )
}

pub async fn icon() -> Response {
    asset("image/svg+xml", include_str!("../../../static/favicon.svg"))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Only its own script and style, talking only to this origin; never
    // framed by another site.
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
             img-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}
