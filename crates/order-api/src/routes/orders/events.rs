//! `GET /orders/{id}/events` and `GET /events`: an order's (or every
//! order's) status changes as Server-Sent Events.

use std::{collections::HashSet, convert::Infallible, sync::Arc, time::Duration};

use axum::{
    extract::{Path, Query, State},
    response::sse::{Event, KeepAlive, Sse},
};
use futures_util::Stream;
use serde::Deserialize;
use sqlx::PgPool;
use tokio::sync::{broadcast, mpsc};
use utoipa::IntoParams;
use uuid::Uuid;

use super::load_order;
use crate::{
    error::{ApiError, ErrorBody, Result},
    live::LiveEvent,
    startup::AppState,
};

/// Comments sent on an idle stream so proxies don't close it.
const HEARTBEAT: Duration = Duration::from_secs(15);
/// How long an order's stream waits for its notification after the final
/// status.
const NOTIFIED_WAIT: Duration = Duration::from_secs(60);

type Events = std::pin::Pin<Box<dyn Stream<Item = std::result::Result<Event, Infallible>> + Send>>;
type EventStream = Sse<axum::response::sse::KeepAliveStream<Events>>;

fn sse(events: mpsc::Receiver<Event>) -> EventStream {
    let stream = futures_util::stream::unfold(events, |mut events| async move {
        events.recv().await.map(|event| (Ok(event), events))
    });
    Sse::new(Box::pin(stream) as Events)
        .keep_alive(KeepAlive::new().interval(HEARTBEAT).text("heartbeat"))
}

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
/// change as it happens; ends once the customer has been notified.
#[utoipa::path(
    get,
    path = "/orders/{id}/events",
    tag = "orders",
    summary = "Follow an order live (Server-Sent Events)",
    description = "A `text/event-stream`: one event per status change, named `accepted`, \
                   `processed`, `rejected` or `notified`, its data a LiveEvent. What already \
                   happened comes first (read from the database after subscribing, so nothing \
                   is missed); the stream ends after `notified`. Idle streams get a heartbeat \
                   comment every 15 s. A client that falls too far behind gets a `lagged` event \
                   and is disconnected.",
    params(("id" = String, Path, description = "The order id (a UUID)")),
    responses(
        (status = 200, description = "The event stream", content_type = "text/event-stream", body = LiveEvent),
        (status = 400, description = "Not a UUID (`invalid_order_id`)", body = ErrorBody),
        (status = 404, description = "No such order (`order_not_found`)", body = ErrorBody),
        (status = 500, description = "Unexpected (`internal_error`)", body = ErrorBody),
        (status = 503, description = "The database is unavailable; retry (`service_unavailable`)", body = ErrorBody),
    )
)]
pub async fn order_events(
    State(state): State<AppState>,
    Path(raw_id): Path<String>,
) -> Result<EventStream> {
    let id = Uuid::parse_str(&raw_id).map_err(|_| ApiError::InvalidOrderId(raw_id.clone()))?;
    // Subscribe before reading, so an event between the two is not lost;
    // one seen both ways is sent once.
    let live = state.feed.subscribe();
    let mut conn = state.pool.acquire().await?;
    let order = load_order(&mut conn, id)
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
            reason: (entry.status == "rejected")
                .then(|| order.reason.clone())
                .flatten(),
            lane: order.lane.clone(),
            at: entry.at,
        })
        .collect();
    let (sender, receiver) = mpsc::channel(16);
    tokio::spawn(follow_order(
        id,
        past,
        live,
        state.pool.clone(),
        Client {
            sender,
            stopped: state.feed.stopped(),
        },
    ));
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

async fn follow_order(
    id: Uuid,
    past: Vec<LiveEvent>,
    mut live: broadcast::Receiver<Arc<LiveEvent>>,
    pool: PgPool,
    client: Client,
) {
    let mut sent = HashSet::new();
    let mut last = None;
    for entry in past {
        if sent.insert(entry.status.clone()) {
            if !client.send(event(&entry)).await {
                return;
            }
            last = Some(entry);
        }
    }
    let mut final_event = last.filter(|entry| entry.is_final() || entry.is_last());
    while final_event.is_none() {
        tokio::select! {
            () = client.gone() => return,
            received = live.recv() => match received {
                Ok(entry) if entry.order_id == id => {
                    if sent.insert(entry.status.clone()) {
                        if !client.send(event(&entry)).await {
                            return;
                        }
                        if entry.is_final() {
                            final_event = Some((*entry).clone());
                        }
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
    let Some(final_event) = final_event.filter(|entry| !entry.is_last()) else {
        return;
    };
    // The notification is recorded by notification-service in the order's
    // history: wait for it there.
    let deadline = tokio::time::Instant::now() + NOTIFIED_WAIT;
    while tokio::time::Instant::now() < deadline {
        let notified: Option<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(
            "SELECT at FROM order_status_history
             WHERE order_id = $1 AND status = 'notified' ORDER BY id LIMIT 1",
        )
        .bind(id)
        .fetch_optional(&pool)
        .await
        .ok()
        .flatten();
        if let Some(at) = notified {
            let notified = LiveEvent {
                status: "notified".into(),
                reason: None,
                at,
                ..final_event
            };
            let _ = client.send(event(&notified)).await;
            return;
        }
        tokio::select! {
            () = client.gone() => return,
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
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

/// `GET /events`: every order's status changes from now on, optionally one
/// customer's only.
#[utoipa::path(
    get,
    path = "/events",
    tag = "orders",
    summary = "Follow every order live (Server-Sent Events)",
    description = "A `text/event-stream` of `accepted`, `processed` and `rejected` events from \
                   now on, each a LiveEvent; with `customer_id`, only that customer's. Idle \
                   streams get a heartbeat comment every 15 s; a client that falls too far \
                   behind gets a `lagged` event and is disconnected.",
    params(EventFilter),
    responses(
        (status = 200, description = "The event stream", content_type = "text/event-stream", body = LiveEvent),
    )
)]
pub async fn all_events(
    State(state): State<AppState>,
    Query(filter): Query<EventFilter>,
) -> EventStream {
    let mut live = state.feed.subscribe();
    let (sender, receiver) = mpsc::channel(16);
    let client = Client {
        sender,
        stopped: state.feed.stopped(),
    };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = client.gone() => return,
                received = live.recv() => match received {
                    Ok(entry) => {
                        let wanted = filter
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
    });
    sse(receiver)
}
