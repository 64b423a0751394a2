//! `GET /dashboard/queues`: every queue's depth, once a second: RabbitMQ's
//! queues, and with `WORK_QUEUE=postgres` the jobs table's, by lane and
//! state; each sample says which way orders and events travel.

use std::time::Duration;

use axum::{Extension, extract::State, response::sse::Event};
use chrono::Utc;
use futures_util::FutureExt;
use messaging::{Broker, declaration::queue_counts};
use platform::jobs::{self, WorkQueue};
use serde::Serialize;
use serde_json::json;
use sqlx::PgPool;
use tokio::sync::mpsc;

use super::admin;
use crate::{
    auth::Caller,
    error::{ApiError, Result},
    routes::sse::{EventStream, Streaming, sse},
    state::Transports,
};

/// How often the page is sent the queue depths.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// How often the page's list of queues is made again.
const RELIST_EVERY: Duration = Duration::from_secs(10);

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

/// The jobs table's depths, as queues named `jobs.<lane>` (waiting),
/// `jobs.running` and `jobs.dead`; consumers are the processors holding
/// running jobs.
async fn job_depths(pool: &PgPool) -> sqlx::Result<Vec<Depth>> {
    let mut shown: Vec<Depth> = Vec::new();
    for depth in jobs::depths(pool).await? {
        let name = match depth.state.as_str() {
            "available" => format!("jobs.{}", depth.lane),
            state => format!("jobs.{state}"),
        };
        let (jobs, claimants) = (
            u32::try_from(depth.jobs).unwrap_or(u32::MAX),
            u32::try_from(depth.claimants).unwrap_or(u32::MAX),
        );
        match shown.iter_mut().find(|d| d.name == name) {
            Some(row) => {
                row.messages = row.messages.saturating_add(jobs);
                row.consumers = row.consumers.saturating_add(claimants);
            }
            None => shown.push(Depth {
                name,
                messages: jobs,
                consumers: claimants,
            }),
        }
    }
    Ok(shown)
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
/// `queues` events; `broker_unavailable` events while RabbitMQ is away
/// (with the jobs' depths, when the work queue is in Postgres).
pub async fn queues(
    State(streaming): State<Streaming>,
    State(broker): State<Broker>,
    State(pool): State<PgPool>,
    State(transports): State<Transports>,
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
            let (mut queues, name) = if transports.use_rabbitmq() {
                if names.is_empty() || every_so_often.tick().now_or_never().is_some() {
                    names = shown_queues(&broker, &mut retry_queues).await;
                }
                match depths(&broker, &names).await {
                    Ok(queues) => (queues, "queues"),
                    Err(error) => {
                        tracing::debug!(error = %format!("{error:#}"), "queue depths unavailable");
                        (Vec::new(), "broker_unavailable")
                    }
                }
            } else {
                (Vec::new(), "queues")
            };
            if transports.work_queue == WorkQueue::Postgres {
                match job_depths(&pool).await {
                    Ok(jobs) => queues.extend(jobs),
                    Err(error) => tracing::debug!(error = %error, "job depths unavailable"),
                }
            }
            let event = Event::default()
                .event(name)
                .json_data(json!({"at": Utc::now(), "queues": queues, "transports": transports}));
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
