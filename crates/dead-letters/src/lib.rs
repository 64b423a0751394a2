//! The dead letters, for people: list them and why, and replay them (one
//! or all). They are kept in two places: RabbitMQ's dead-letter queue, and,
//! for orders worked from Postgres (`WORK_QUEUE=postgres`), the `jobs`
//! table's dead rows; both are listed and replayed together. A message is
//! replayed onto the queue it came from, a job made due again. A replayed message
//! keeps its message id, so if it had in fact been processed the consumer's
//! dedupe skips it: replaying is always safe. Replaying an order's message
//! moves its held order on: it is accepted again, so that order-api's
//! republisher watches it as it watches any waiting order.

use std::time::Duration;

use anyhow::{Context, bail};
use lapin::{
    BasicProperties, Channel,
    message::Delivery,
    options::{BasicAckOptions, BasicGetOptions},
    types::{AMQPValue, FieldTable},
};
use platform::jobs::{self, DeadJob};
use sqlx::PgPool;
use uuid::Uuid;

use messaging::{
    Broker, Publisher,
    consumer::{
        ATTEMPTS_HEADER, HELD_HEADER, QUEUE_HEADER, REASON_HEADER, SERVICE_HEADER,
        previous_attempts,
    },
    contracts::ORDER_ID_HEADER,
    declaration::queue_counts,
};

/// What a person wants to know about one dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub message_id: String,
    pub order_id: String,
    pub reason: String,
    pub attempts: u32,
    pub service: String,
    /// Where replay sends it.
    pub queue: Option<String>,
}

fn text(headers: &FieldTable, name: &str) -> Option<String> {
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// The first `x-death` entry the broker wrote (delivery limit, rejection).
fn broker_death(headers: &FieldTable) -> Option<&FieldTable> {
    match headers.inner().get("x-death")? {
        AMQPValue::FieldArray(deaths) => match deaths.as_slice().first()? {
            AMQPValue::FieldTable(death) => Some(death),
            _ => None,
        },
        _ => None,
    }
}

/// Describe a dead-lettered delivery, whichever way it got there: our
/// consumers' headers, or the broker's `x-death`.
pub fn describe(properties: &BasicProperties) -> DeadLetter {
    let empty = FieldTable::default();
    let headers = properties.headers().as_ref().unwrap_or(&empty);
    let death = broker_death(headers);
    DeadLetter {
        message_id: properties
            .message_id()
            .as_ref()
            .map_or_else(|| "-".to_owned(), |m| m.to_string()),
        order_id: text(headers, ORDER_ID_HEADER).unwrap_or_else(|| "-".to_owned()),
        reason: text(headers, REASON_HEADER)
            .or_else(|| {
                death
                    .and_then(|d| text(d, "reason"))
                    .map(|r| format!("broker: {r}"))
            })
            .unwrap_or_else(|| "unknown".to_owned()),
        attempts: previous_attempts(properties),
        service: text(headers, SERVICE_HEADER).unwrap_or_else(|| "-".to_owned()),
        queue: text(headers, QUEUE_HEADER).or_else(|| death.and_then(|d| text(d, "queue"))),
    }
}

/// Take every message off the dead-letter queue without acking; closing the
/// channel puts them all back, in order.
async fn take_all(channel: &Channel, queue: &str) -> anyhow::Result<Vec<Delivery>> {
    let mut taken = Vec::new();
    while let Some(message) = channel
        .basic_get(queue.into(), BasicGetOptions::default())
        .await
        .context("reading the dead-letter queue")?
    {
        taken.push(message.delivery);
    }
    Ok(taken)
}

/// Give back the messages taken on `channel` by closing it, and wait until
/// the queue holds them again: the broker puts them back asynchronously, and
/// the next listing or replay must not miss them.
async fn give_back(
    connection: &lapin::Connection,
    channel: Channel,
    queue: &str,
    kept: usize,
) -> anyhow::Result<()> {
    channel.close(200, "given back".into()).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (ready, _) = queue_counts(connection, queue)
            .await
            .context("counting the dead letters")?
            .context("the dead-letter queue is gone")?;
        if usize::try_from(ready).unwrap_or(usize::MAX) >= kept {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the broker has not put the dead letters back after 30 s ({ready} of {kept})");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Where a dead job is listed as being from.
pub const JOBS: &str = "jobs";

impl From<DeadJob> for DeadLetter {
    fn from(job: DeadJob) -> Self {
        Self {
            message_id: job.message_id.to_string(),
            order_id: job.order_id.to_string(),
            reason: job.reason,
            attempts: u32::try_from(job.attempts).unwrap_or(0),
            service: "order-processor".to_owned(),
            queue: Some(JOBS.to_owned()),
        }
    }
}

/// Every dead letter: the dead-letter queue's, oldest first (the queue is
/// left as it was; none without a `broker`, when nothing travels through
/// RabbitMQ), then the dead jobs, oldest first.
pub async fn list<'a>(
    broker: impl Into<Option<&'a Broker>>,
    pool: &PgPool,
) -> anyhow::Result<Vec<DeadLetter>> {
    let mut letters = match broker.into() {
        Some(broker) => list_queue(broker).await?,
        None => Vec::new(),
    };
    let jobs = jobs::dead(pool).await.context("reading the dead jobs")?;
    letters.extend(jobs.into_iter().map(DeadLetter::from));
    Ok(letters)
}

/// Replay the selected dead letters: from the queue (see [`replay_queue`];
/// none without a `broker`) and from the `jobs` table (see
/// `platform::jobs::replay`); what was replayed.
pub async fn replay<'a>(
    broker: impl Into<Option<&'a Broker>>,
    pool: &PgPool,
    selection: &Selection,
) -> anyhow::Result<Vec<DeadLetter>> {
    let message_id = match selection {
        Selection::All => Some(None),
        Selection::MessageId(id) => id.parse::<Uuid>().ok().map(Some),
    };
    let mut replayed = Vec::new();
    if let Some(message_id) = message_id {
        let jobs = jobs::replay(pool, message_id).await?;
        replayed.extend(jobs.into_iter().map(DeadLetter::from));
    }
    if let Some(broker) = broker.into()
        && (matches!(selection, Selection::All) || replayed.is_empty())
    {
        replayed.extend(replay_queue(broker, pool, selection).await?);
    }
    Ok(replayed)
}

/// Every dead letter in the queue, oldest first; the queue is left as it was.
pub async fn list_queue(broker: &Broker) -> anyhow::Result<Vec<DeadLetter>> {
    let connection = broker.connect_once().await?;
    let channel = connection.create_channel().await?;
    let queue = broker.topology().dead_letters();
    let taken = take_all(&channel, &queue).await?;
    give_back(&connection, channel, &queue, taken.len()).await?;
    Ok(taken.iter().map(|d| describe(&d.properties)).collect())
}

/// Which dead letters to replay.
#[derive(Debug, Clone)]
pub enum Selection {
    All,
    MessageId(String),
}

/// Publish the selected dead letters back onto their queue (with confirms,
/// attempts reset), then remove them from the dead-letter queue; returns
/// what was replayed. Messages whose queue is unknown stay. The held order
/// of each is accepted again first (see [`release`]).
async fn replay_queue(
    broker: &Broker,
    pool: &PgPool,
    selection: &Selection,
) -> anyhow::Result<Vec<DeadLetter>> {
    let connection = broker.connect_once().await?;
    let channel = connection.create_channel().await?;
    let publisher = Publisher::new(broker.clone());
    let queue = broker.topology().dead_letters();
    let taken = take_all(&channel, &queue).await?;
    let kept = taken.len();
    let mut replayed = Vec::new();
    for delivery in taken {
        let letter = describe(&delivery.properties);
        let chosen = match selection {
            Selection::All => true,
            Selection::MessageId(id) => letter.message_id == *id,
        };
        let Some(queue) = letter.queue.clone().filter(|_| chosen) else {
            continue;
        };
        // A replay starts afresh: without the previous attempts and deaths.
        let dropped = [
            ATTEMPTS_HEADER,
            REASON_HEADER,
            SERVICE_HEADER,
            QUEUE_HEADER,
            HELD_HEADER,
            "x-death",
        ];
        let mut headers = FieldTable::default();
        for (name, value) in delivery.properties.headers().iter().flat_map(|h| h.inner()) {
            if !dropped.contains(&name.as_str()) {
                headers.insert(name.clone(), value.clone());
            }
        }
        let properties = delivery.properties.clone().with_headers(headers);
        if broker.topology().order_queues().contains(&queue) {
            release(pool, &letter, &broker.topology().orders_exchange()).await?;
        }
        publisher
            .publish("", &queue, &delivery.data, properties)
            .await
            .with_context(|| format!("replaying {} onto {queue}", letter.message_id))?;
        delivery.ack(BasicAckOptions::default()).await?;
        replayed.push(letter);
    }
    give_back(&connection, channel, &queue, kept - replayed.len()).await?;
    Ok(replayed)
}

/// Before its message goes back: the held order of `letter` is accepted
/// again (with a line of history), and its message counts as published
/// now, so that order-api's republisher sends it again should the replayed
/// message be lost on the way. Recorded first: if the publish then fails,
/// the order is accepted with its message still in the dead letters, and
/// the republisher sends it after its waiting period.
async fn release(pool: &PgPool, letter: &DeadLetter, orders_exchange: &str) -> anyhow::Result<()> {
    let Ok(order_id) = Uuid::parse_str(&letter.order_id) else {
        return Ok(());
    };
    sqlx::query!(
        "WITH released AS (
             UPDATE orders SET status = 'accepted', reason = NULL, updated_at = now()
             WHERE id = $1 AND status = 'held' RETURNING id),
         history AS (
             INSERT INTO order_status_history (order_id, status, detail, service)
             SELECT id, 'accepted', 'replayed from the dead letters', 'dead-letters' FROM released)
         UPDATE outbox SET published_at = now()
         WHERE order_id IN (SELECT id FROM released) AND exchange = $2",
        order_id,
        orders_exchange,
    )
    .execute(pool)
    .await
    .with_context(|| format!("accepting the held order {order_id} again"))?;
    Ok(())
}
