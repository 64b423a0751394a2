//! The live page: `/` and its script and style (public: they hold no data;
//! the page asks for an admin key), and the admin-only endpoints it reads
//! besides `GET /events`: queue depths each second, where recent orders
//! stand, the dead letters and their replay, and a burst of orders.

use std::{collections::HashMap, sync::Arc, time::Duration};

use axum::{
    Extension, Json,
    extract::{Query, State},
    http::{HeaderValue, header},
    response::{IntoResponse, Response, sse::Event},
};
use chrono::{DateTime, Utc};
use futures_util::{FutureExt, StreamExt, stream};
use messaging::{
    Broker,
    contracts::{Lane, OrderLine},
    declaration::queue_counts,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::PgPool;
use tokio::sync::{Mutex, mpsc};
use uuid::Uuid;

use super::{
    JsonBody,
    sse::{EventStream, Streaming, sse},
};
use crate::{
    announcer::Announcer,
    auth::Caller,
    correlation::CorrelationId,
    domain::ValidOrder,
    error::{ApiError, FieldError, Result},
    intake::{Intake, Placed, Placement},
};

/// How often the page is sent the queue depths.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// How often the page's list of queues is made again.
const RELIST_EVERY: Duration = Duration::from_secs(10);

/// The most orders one burst may place.
const MAX_BURST: u32 = 5_000;

/// The most orders `GET /dashboard/orders` looks up at once.
const MAX_LOOKUP: usize = 100;

/// Orders of a burst stored at once (each waits for its group commit).
const BURST_CONCURRENCY: usize = 64;

/// Held while the dead-letter queue is read or replayed from: listing takes
/// every dead letter off the queue for a moment, so a replay at the same
/// time would find nothing.
#[derive(Clone, Default)]
pub struct DeadLetterLock(Arc<Mutex<()>>);

/// Where on the page the journeys, queues and buttons are.
pub async fn page() -> Response {
    asset(
        "text/html; charset=utf-8",
        include_str!("../../static/index.html"),
    )
}

pub async fn script() -> Response {
    asset(
        "text/javascript; charset=utf-8",
        include_str!("../../static/live.js"),
    )
}

pub async fn style() -> Response {
    asset(
        "text/css; charset=utf-8",
        include_str!("../../static/live.css"),
    )
}

pub async fn icon() -> Response {
    asset("image/svg+xml", include_str!("../../static/favicon.svg"))
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

fn admin(caller: &Caller) -> Result<()> {
    if caller.is_admin() {
        Ok(())
    } else {
        Err(ApiError::Forbidden(
            "the live page's data is for admin keys",
        ))
    }
}

/// One queue's depth.
#[derive(Debug, Serialize)]
struct Depth {
    name: String,
    /// Ready messages (not those delivered and not yet acked).
    messages: u32,
    consumers: u32,
}

/// The depth of each of `names`, by passive declares over AMQP: it needs
/// no management API. A queue that does not exist is left out.
async fn depths(broker: &Broker, names: &[String]) -> anyhow::Result<Vec<Depth>> {
    let connection = broker.connect_once().await?;
    let mut depths = Vec::new();
    for name in names {
        if let Some((messages, consumers)) = queue_counts(&connection, name).await? {
            depths.push(Depth {
                name: name.clone(),
                messages,
                consumers,
            });
        }
    }
    Ok(depths)
}

/// The queues to show: the topology's, but the event log (a stream keeps
/// what is read, so its depth says nothing of a backlog), and the retry
/// queues, one per delay of the consumers' retry policies, which only the
/// consumers know: they are found through the management API where it is
/// there, and kept when it is not.
async fn shown_queues(broker: &Broker, retry_queues: &mut Vec<String>) -> Vec<String> {
    let prefix = format!("{}.", broker.topology().retry_exchange());
    match broker.management().queue_names(&prefix).await {
        Ok(mut found) => {
            found.sort_by_key(|name| {
                let delay = name[prefix.len()..].trim_end_matches("ms");
                (delay.parse::<u64>().unwrap_or(u64::MAX), name.clone())
            });
            *retry_queues = found;
        }
        Err(error) => {
            tracing::debug!(error = %format!("{error:#}"), "retry queues not listed (no management API?)");
        }
    }
    let log = broker.topology().event_log();
    let mut names: Vec<String> = broker
        .topology()
        .all_queues()
        .into_iter()
        .filter(|name| *name != log && !name.starts_with(&prefix))
        .collect();
    names.extend(retry_queues.iter().cloned());
    names
}

/// `GET /dashboard/queues`: every queue's depth, once a second, as
/// `queues` events; `broker_unavailable` events while RabbitMQ is away.
pub async fn queues(
    State(streaming): State<Streaming>,
    State(broker): State<Broker>,
    Extension(caller): Extension<Caller>,
) -> Result<EventStream> {
    admin(&caller)?;
    let slot = streaming
        .streams
        .open(caller.key_id)
        .map_err(ApiError::TooManyStreams)?;
    let (sender, receiver) = mpsc::channel(4);
    let stopped = streaming.feed.stopped();
    tokio::spawn(async move {
        let _slot = slot;
        let mut every = tokio::time::interval(SAMPLE_EVERY);
        let (mut names, mut retry_queues) = (Vec::new(), Vec::new());
        let mut every_so_often = tokio::time::interval(RELIST_EVERY);
        let lifetime = tokio::time::sleep(streaming.max_lifetime);
        tokio::pin!(lifetime);
        loop {
            tokio::select! {
                () = stopped.cancelled() => return,
                () = sender.closed() => return,
                () = &mut lifetime => return,
                _ = every.tick() => {}
            }
            if names.is_empty() || every_so_often.tick().now_or_never().is_some() {
                names = shown_queues(&broker, &mut retry_queues).await;
            }
            let event = match depths(&broker, &names).await {
                Ok(queues) => Event::default()
                    .event("queues")
                    .json_data(json!({"at": Utc::now(), "queues": queues})),
                Err(error) => {
                    tracing::debug!(error = %format!("{error:#}"), "queue depths unavailable");
                    Event::default()
                        .event("broker_unavailable")
                        .json_data(json!({"at": Utc::now()}))
                }
            };
            let Ok(event) = event else { return };
            // A client that has not read the last samples misses this one
            // (the next is a second away); waiting on it would hold this
            // task past its lifetime and past shutdown.
            if let Err(mpsc::error::TrySendError::Closed(_)) = sender.try_send(event) {
                return;
            }
        }
    });
    Ok(sse(receiver))
}

/// Which orders `GET /dashboard/orders` looks up.
#[derive(Debug, Deserialize)]
pub struct Lookup {
    /// Comma-separated order ids, at most 100.
    ids: Option<String>,
}

/// Where one order stands, as far as every service has taken it.
#[derive(Debug, Serialize)]
pub struct Standing {
    id: Uuid,
    customer_id: String,
    lane: String,
    status: String,
    reason: Option<String>,
    processed_by: Option<String>,
    created_at: DateTime<Utc>,
    /// The notification-service sent its email.
    notified: bool,
    /// The logging-service wrote its audit record.
    audited: bool,
}

/// `GET /dashboard/orders?ids=…`: where each of these orders stands.
pub async fn orders(
    State(pool): State<PgPool>,
    Extension(caller): Extension<Caller>,
    Query(lookup): Query<Lookup>,
) -> Result<Json<Vec<Standing>>> {
    admin(&caller)?;
    let Some(ids) = lookup.ids else {
        return Err(ApiError::Validation(vec![FieldError::new(
            "ids",
            "comma-separated order ids are required",
        )]));
    };
    let ids = ids
        .split(',')
        .filter(|id| !id.is_empty())
        .take(MAX_LOOKUP + 1)
        .map(|id| Uuid::parse_str(id).map_err(|_| ApiError::InvalidOrderId(id.to_owned())))
        .collect::<Result<Vec<_>>>()?;
    if ids.len() > MAX_LOOKUP {
        return Err(ApiError::Validation(vec![FieldError::new(
            "ids",
            format!("at most {MAX_LOOKUP} order ids"),
        )]));
    }
    let standings = sqlx::query_as!(
        Standing,
        r#"SELECT o.id, o.customer_id, o.lane, o.status, o.reason, o.processed_by, o.created_at,
                  EXISTS (SELECT 1 FROM notifications n WHERE n.order_id = o.id) AS "notified!",
                  EXISTS (SELECT 1 FROM audit_log a WHERE a.order_id = o.id) AS "audited!"
           FROM orders o WHERE o.id = ANY($1)"#,
        &ids,
    )
    .fetch_all(&pool)
    .await?;
    Ok(Json(standings))
}

/// A dead letter, as the page lists it.
#[derive(Debug, Serialize)]
pub struct DeadLetterView {
    message_id: String,
    order_id: String,
    reason: String,
    attempts: u32,
    service: String,
    queue: Option<String>,
}

impl From<dead_letters::DeadLetter> for DeadLetterView {
    fn from(letter: dead_letters::DeadLetter) -> Self {
        Self {
            message_id: letter.message_id,
            order_id: letter.order_id,
            reason: letter.reason,
            attempts: letter.attempts,
            service: letter.service,
            queue: letter.queue,
        }
    }
}

fn broker_error(error: anyhow::Error) -> ApiError {
    ApiError::BrokerUnavailable(error)
}

/// `GET /dashboard/dead-letters`: what is in the dead-letter queue, and why.
pub async fn dead_letters(
    State(broker): State<Broker>,
    State(DeadLetterLock(lock)): State<DeadLetterLock>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<DeadLetterView>>> {
    admin(&caller)?;
    let _only_reader = lock.lock().await;
    let letters = dead_letters::list(&broker).await.map_err(broker_error)?;
    Ok(Json(letters.into_iter().map(Into::into).collect()))
}

/// Which dead letter to replay.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Replay {
    message_id: String,
}

/// `POST /dashboard/dead-letters/replay`: put one dead letter back on its
/// queue (it keeps its message id, so the consumer's dedupe makes a replay
/// of something already done harmless).
pub async fn replay(
    State(broker): State<Broker>,
    State(pool): State<PgPool>,
    State(DeadLetterLock(lock)): State<DeadLetterLock>,
    Extension(caller): Extension<Caller>,
    body: std::result::Result<JsonBody<Replay>, ApiError>,
) -> Result<Response> {
    admin(&caller)?;
    let JsonBody(Replay { message_id }) = body?;
    // "-" is how a letter without a message id is listed: it would pick
    // every such letter, not one.
    if message_id.is_empty() || message_id == "-" {
        return Err(ApiError::Validation(vec![FieldError::new(
            "message_id",
            "a dead letter's message id (one without an id is replayed with the dead-letters CLI's --all)",
        )]));
    }
    let selection = dead_letters::Selection::MessageId(message_id.clone());
    let _only_reader = lock.lock().await;
    let replayed = dead_letters::replay(&broker, &pool, &selection)
        .await
        .map_err(|error| match error.downcast::<sqlx::Error>() {
            Ok(database) => ApiError::from(database),
            Err(broker) => broker_error(broker),
        })?;
    tracing::info!(client = %caller.client, replayed = replayed.len(), "dead letter replay asked from the live page");
    let replayed: Vec<DeadLetterView> = replayed.into_iter().map(Into::into).collect();
    if replayed.is_empty() {
        return Err(ApiError::DeadLetterNotFound(message_id));
    }
    Ok(Json(json!({"replayed": replayed})).into_response())
}

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
                        announcer.announce(&order, &message).await;
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
