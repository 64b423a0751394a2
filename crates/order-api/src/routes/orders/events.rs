//! `GET /orders/{id}/events` and `GET /events`: an order's (or every
//! order's, or for a client key its own orders') status changes as
//! Server-Sent Events.

use std::{collections::HashSet, sync::Arc};

use axum::{
    Extension,
    extract::{Path, Query, State},
    response::sse::Event,
};
use serde::Deserialize;
use sqlx::PgPool;
use tokio::sync::{broadcast, mpsc};
use utoipa::IntoParams;
use uuid::Uuid;

use super::load_order;
use crate::{
    auth::Caller,
    error::{ApiError, ErrorBody, Result},
    live::{LiveEvent, SseEvent},
    routes::sse::{EventStream, Streaming, sse},
};

/// What a client too slow to keep up gets before it is dropped.
fn lagged() -> Event {
    Event::default().event("lagged").data("too slow; reconnect")
}

fn event(live: &LiveEvent) -> Event {
    Event::default()
        .event(live.status.clone())
        .json_data(live)
        .unwrap_or_else(|_| Event::default().event("error"))
}

/// `GET /orders/{id}/events`: the order's history so far, then each status
/// change as it happens; ends at the order's final status.
#[utoipa::path(
    get,
    path = "/orders/{id}/events",
    tag = "orders",
    summary = "Follow an order live (Server-Sent Events)",
    description = "A `text/event-stream`: one event per status change, named `accepted`, \
                   `held` (its message dead-lettered; the reason says why), `processed`, \
                   `rejected` or `notified`, its data a LiveEvent. What already \
                   happened comes first (read from the database after subscribing, so nothing \
                   is missed); the stream ends after the final status (`processed` or \
                   `rejected`), or after SSE_MAX_LIFETIME_SECS. Idle streams get a heartbeat \
                   comment every 15 s. A client that falls too far behind gets a `lagged` event \
                   and is disconnected. Each API key may hold SSE_MAX_STREAMS_PER_KEY streams \
                   open at once.",
    params(("id" = Uuid, Path, description = "The order id")),
    security(("api_key" = [])),
    responses(
        (status = 200, description = "The event stream", content_type = "text/event-stream", body = SseEvent),
        (status = 400, description = "Not a UUID (`invalid_order_id`)", body = ErrorBody),
        (status = 401, description = "No API key, or not a live one (`unauthenticated`, `invalid_api_key`)", body = ErrorBody),
        (status = 404, description = "No such order among the caller's (`order_not_found`)", body = ErrorBody),
        (status = 429, description = "Over the request rate or the open-stream cap (`rate_limited`, `too_many_streams`)", body = ErrorBody,
         headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 500, description = "Unexpected (`internal_error`)", body = ErrorBody),
        (status = 503, description = "The database is unavailable; retry (`service_unavailable`)", body = ErrorBody),
    )
)]
pub async fn order_events(
    State(pool): State<PgPool>,
    State(streaming): State<Streaming>,
    Extension(caller): Extension<Caller>,
    Path(raw_id): Path<String>,
) -> Result<EventStream> {
    let id = Uuid::parse_str(&raw_id).map_err(|_| ApiError::InvalidOrderId(raw_id.clone()))?;
    let slot = streaming
        .streams
        .open(caller.key_id)
        .map_err(ApiError::TooManyStreams)?;
    // Subscribe before reading, so an event between the two is not lost;
    // one seen both ways is sent once.
    let live = streaming.feed.subscribe().await;
    let mut conn = pool.acquire().await?;
    let order = load_order(&mut conn, id, caller.owner())
        .await?
        .ok_or(ApiError::OrderNotFound(id))?;
    drop(conn);
    let past: Vec<LiveEvent> = order
        .history
        .iter()
        .map(|entry| LiveEvent {
            order_id: order.id,
            customer_id: order.customer_id.clone(),
            status: entry.status.clone(),
            reason: match entry.status.as_str() {
                "rejected" => order.reason.clone(),
                "held" => entry.detail.clone(),
                _ => None,
            },
            lane: order.lane.clone(),
            processed_by: None,
            at: entry.at,
            // Sent to this caller only, whose order it was loaded as.
            client: None,
        })
        .collect();
    let (sender, receiver) = mpsc::channel(16);
    let client = Client {
        sender,
        stopped: streaming.feed.stopped(),
    };
    tokio::spawn(async move {
        // Ends when the stream does: the stream's slot with it.
        let _slot = slot;
        let _ = tokio::time::timeout(streaming.max_lifetime, follow_order(id, past, live, client))
            .await;
    });
    Ok(sse(receiver))
}

/// One connected client: where its events go, and when to hang up.
struct Client {
    sender: mpsc::Sender<Event>,
    stopped: tokio_util::sync::CancellationToken,
}

impl Client {
    /// Send `event`; false when the client is gone or order-api stops.
    async fn send(&self, event: Event) -> bool {
        tokio::select! {
            () = self.stopped.cancelled() => false,
            sent = self.sender.send(event) => sent.is_ok(),
        }
    }

    /// Resolves when the client hung up or order-api is stopping.
    async fn gone(&self) {
        tokio::select! {
            () = self.stopped.cancelled() => {}
            () = self.sender.closed() => {}
        }
    }
}

/// Send what happened, then what happens, until the final status: nothing
/// is read from the database while the stream is open.
async fn follow_order(
    id: Uuid,
    past: Vec<LiveEvent>,
    mut live: broadcast::Receiver<Arc<LiveEvent>>,
    client: Client,
) {
    let mut sent = HashSet::new();
    let mut done = false;
    for entry in past {
        if sent.insert(entry.status.clone()) {
            if !client.send(event(&entry)).await {
                return;
            }
            done |= entry.is_final() || entry.is_last();
        }
    }
    while !done {
        tokio::select! {
            () = client.gone() => return,
            received = live.recv() => match received {
                Ok(entry) if entry.order_id == id => {
                    // Each retry is news; any other status is sent once.
                    if entry.status == "retrying" || sent.insert(entry.status.clone()) {
                        if !client.send(event(&entry)).await {
                            return;
                        }
                        done = entry.is_final();
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let _ = client.send(lagged()).await;
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

/// Which events `GET /events` sends.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventFilter {
    /// Only this customer's orders.
    pub customer_id: Option<String>,
}

/// `GET /events`: the status changes from now on of every order (an admin
/// key) or of the caller's own orders (a client key), optionally one
/// customer's only.
#[utoipa::path(
    get,
    path = "/events",
    tag = "orders",
    summary = "Follow orders live (Server-Sent Events)",
    description = "A `text/event-stream` of `accepted`, `held`, `processed` \
                   and `rejected` events from now on, with each `retrying` and \
                   `dead_lettered` (a dead letter that held no order), each a LiveEvent. \
                   An admin key is sent every order's events; a client key only those of \
                   the orders its client placed (with any of its keys), never another \
                   client's. With `customer_id`, only that customer's. Idle \
                   streams get a heartbeat comment every 15 s; a client that falls too far \
                   behind gets a `lagged` event and is disconnected. Each API key may hold \
                   SSE_MAX_STREAMS_PER_KEY streams open at once; a stream ends after \
                   SSE_MAX_LIFETIME_SECS.",
    params(EventFilter),
    security(("api_key" = [])),
    responses(
        (status = 200, description = "The event stream", content_type = "text/event-stream", body = SseEvent),
        (status = 401, description = "No API key, or not a live one (`unauthenticated`, `invalid_api_key`)", body = ErrorBody),
        (status = 429, description = "Over the request rate or the open-stream cap (`rate_limited`, `too_many_streams`)", body = ErrorBody,
         headers(("Retry-After" = u64, description = "Seconds to wait"))),
    )
)]
pub async fn all_events(
    State(streaming): State<Streaming>,
    Extension(caller): Extension<Caller>,
    Query(filter): Query<EventFilter>,
) -> Result<EventStream> {
    let slot = streaming
        .streams
        .open(caller.key_id)
        .map_err(ApiError::TooManyStreams)?;
    // A client key is sent its own orders' events only: the feed learns
    // whose each order is while such a stream is open.
    let owner = caller.owner().map(str::to_owned);
    let watch = owner.is_some().then(|| streaming.feed.client_watching());
    let live = streaming.feed.subscribe().await;
    let (sender, receiver) = mpsc::channel(16);
    let client = Client {
        sender,
        stopped: streaming.feed.stopped(),
    };
    tokio::spawn(async move {
        // Both end when the stream does.
        let (_slot, _watch) = (slot, watch);
        let _ = tokio::time::timeout(
            streaming.max_lifetime,
            follow_all(owner, filter, live, client),
        )
        .await;
    });
    Ok(sse(receiver))
}

/// Send each event `owner` may see (`None`: an admin, every event) that
/// `filter` wants, until the client hangs up or falls behind.
async fn follow_all(
    owner: Option<String>,
    filter: EventFilter,
    mut live: broadcast::Receiver<Arc<LiveEvent>>,
    client: Client,
) {
    loop {
        tokio::select! {
            () = client.gone() => return,
            received = live.recv() => match received {
                Ok(entry) => {
                    let wanted = entry.is_for(owner.as_deref())
                        && filter
                            .customer_id
                            .as_ref()
                            .is_none_or(|customer| *customer == entry.customer_id);
                    if wanted && !client.send(event(&entry)).await {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let _ = client.send(lagged()).await;
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}
