//! The HTTP handlers, and the JSON body extractor they share. The router
//! that serves them is built with the app (`crate::router`).

pub mod dashboard;
pub mod metrics;
pub mod orders;
pub mod sse;

use axum::extract::FromRequest;

use crate::error::ApiError;

/// `axum::Json`, but rejections become our JSON errors.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct JsonBody<T>(pub T);
