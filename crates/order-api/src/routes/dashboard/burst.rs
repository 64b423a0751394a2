//! `POST /dashboard/burst`: many orders at once, the load the queue levels.

use std::collections::HashMap;

use axum::{
    Extension, Json,
    extract::State,
    response::{IntoResponse, Response},
};
use futures_util::{StreamExt, stream};
use messaging::contracts::{Lane, OrderLine};
use serde::Deserialize;
use serde_json::json;

use super::admin;
use crate::{
    announcer::Announcer,
    auth::Caller,
    correlation::CorrelationId,
    domain::ValidOrder,
    error::{ApiError, FieldError, Result},
    intake::{Intake, Placed, Placement},
    routes::JsonBody,
};

/// The most orders one burst may place.
const MAX_BURST: u32 = 5_000;

/// Orders of a burst stored at once (each waits for its group commit).
const BURST_CONCURRENCY: usize = 64;

/// A burst of orders, placed at once.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Burst {
    /// How many: 1 to 5,000.
    count: u32,
    /// Which lane (standard unless true).
    #[serde(default)]
    express: bool,
}

/// `POST /dashboard/burst`: place `count` one-widget orders at once (from
/// the caller's client, past its rate limit: this is the load the queue
/// levels), as concurrent POSTs would; answers once all are stored.
pub async fn burst(
    State(intake): State<Intake>,
    State(announcer): State<Announcer>,
    Extension(caller): Extension<Caller>,
    Extension(correlation): Extension<CorrelationId>,
    body: std::result::Result<JsonBody<Burst>, ApiError>,
) -> Result<Response> {
    admin(&caller)?;
    let JsonBody(Burst { count, express }) = body?;
    if !(1..=MAX_BURST).contains(&count) {
        return Err(ApiError::Validation(vec![FieldError::new(
            "count",
            format!("must be 1 to {MAX_BURST}"),
        )]));
    }
    let lane = if express {
        Lane::Express
    } else {
        Lane::Standard
    };
    let placements = (0..count).map(|i| Placement {
        client: caller.client.clone(),
        key: None,
        order: ValidOrder {
            customer_id: format!("burst-{}", i % 100),
            email: "burst@example.com".into(),
            items: vec![OrderLine {
                sku: "WIDGET".into(),
                quantity: 1,
            }],
            currency: "EUR".into(),
            lane,
            callback_url: None,
            shipping: None,
        },
        correlation_id: correlation.0.clone(),
    });
    let mut outcomes = HashMap::<&'static str, u32>::new();
    let mut placed = stream::iter(placements)
        .map(|placement| {
            let (intake, announcer) = (intake.clone(), announcer.clone());
            async move {
                match intake.place(placement).await {
                    Ok(Placed::Accepted { order, message, .. }) => {
                        announcer.announce(&order, message.as_ref()).await;
                        "accepted"
                    }
                    // Without a key there is nothing to replay.
                    Ok(Placed::Replayed(_)) => "accepted",
                    Err(error) => {
                        tracing::warn!(error = %error, "an order of a burst was not stored");
                        "failed"
                    }
                }
            }
        })
        .buffer_unordered(BURST_CONCURRENCY);
    while let Some(outcome) = placed.next().await {
        *outcomes.entry(outcome).or_default() += 1;
    }
    tracing::info!(
        count,
        lane = lane.as_str(),
        ?outcomes,
        "burst placed from the live page"
    );
    Ok(Json(json!({
        "accepted": outcomes.get("accepted").copied().unwrap_or(0),
        "failed": outcomes.get("failed").copied().unwrap_or(0),
    }))
    .into_response())
}
