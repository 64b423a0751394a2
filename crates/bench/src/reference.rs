//! The reference pipeline: orderflow's hops with none of its guarantees
//! beyond confirms and acks. HTTP POST → one INSERT and a confirmed publish
//! to a quorum work queue → a consumer: one INSERT and a confirmed publish
//! to a fanout exchange, then ack → two subscribers on quorum queues that
//! ack. No idempotency, no outbox, no validation, no retries: what the
//! broker and the database cost for these hops on this machine. Every run
//! states orderflow's end-to-end rate as a ratio to this one.
//!
//! Its statements are not compile-checked: their tables are its own,
//! created as it starts, not orderflow's migrations.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use anyhow::{Context, bail};
use axum::{
    Json, Router,
    body::Bytes,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use futures_util::StreamExt;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
        QueueDeclareOptions, QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable},
};
use sqlx::{PgPool, postgres::PgPoolOptions};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Persistent, as orderflow publishes.
const PERSISTENT: u8 = 2;

/// The broker names of one pipeline.
struct Names {
    work: String,
    events: String,
    subscribers: [String; 2],
}

impl Names {
    fn new() -> Self {
        let id = Uuid::new_v4().simple().to_string();
        Self {
            work: format!("bench-ref-work-{id}"),
            events: format!("bench-ref-events-{id}"),
            subscribers: [
                format!("bench-ref-sub1-{id}"),
                format!("bench-ref-sub2-{id}"),
            ],
        }
    }

    fn queues(&self) -> impl Iterator<Item = &String> {
        std::iter::once(&self.work).chain(&self.subscribers)
    }
}

#[derive(Clone)]
struct Api {
    pool: PgPool,
    channel: Channel,
    work: Arc<str>,
}

/// Serve the pipeline on `listener` until `shutdown`: `POST /orders`
/// answers 202 with the order's id once its row is committed and its
/// message confirmed; `GET /done` says how many orders both subscribers
/// have acked. Deletes its queues and exchange when done.
pub async fn serve(
    listener: tokio::net::TcpListener,
    database_url: &str,
    amqp_url: &str,
    pool_size: u32,
    prefetch: u16,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let pool = PgPoolOptions::new()
        .max_connections(pool_size)
        .connect(database_url)
        .await
        .context("connecting the reference pipeline to Postgres")?;
    sqlx::query("CREATE TABLE IF NOT EXISTS ref_orders (id uuid PRIMARY KEY, body jsonb NOT NULL)")
        .execute(&pool)
        .await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS ref_decisions (id uuid PRIMARY KEY, order_id uuid NOT NULL)",
    )
    .execute(&pool)
    .await?;
    let connection = Connection::connect(amqp_url, ConnectionProperties::default())
        .await
        .context("connecting the reference pipeline to RabbitMQ")?;
    let names = Names::new();
    declare(&connection, &names).await?;

    let done: Arc<[AtomicU64; 2]> = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(decide(
        confirming(&connection).await?,
        pool.clone(),
        names.work.clone(),
        names.events.clone(),
        prefetch,
    ));
    for (i, queue) in names.subscribers.iter().enumerate() {
        tasks.spawn(subscribe(
            connection.create_channel().await?,
            queue.clone(),
            prefetch,
            Arc::clone(&done),
            i,
        ));
    }
    let api = Api {
        pool: pool.clone(),
        channel: confirming(&connection).await?,
        work: names.work.as_str().into(),
    };
    let app = Router::new()
        .route("/orders", post(accept))
        .with_state(api)
        .route(
            "/done",
            get(move || async move {
                let both = done[0]
                    .load(Ordering::Relaxed)
                    .min(done[1].load(Ordering::Relaxed));
                both.to_string()
            }),
        );
    let served = tokio::select! {
        served = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()) => {
            served.context("the reference pipeline's server failed")
        }
        Some(ended) = tasks.join_next() => match ended {
            Ok(Err(error)) => Err(error),
            _ => Err(anyhow::anyhow!("a reference pipeline consumer stopped")),
        },
    };
    tasks.abort_all();
    let channel = connection.create_channel().await?;
    for queue in names.queues() {
        let _ = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = channel
        .exchange_delete(
            names.events.as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await;
    let _ = connection
        .close(200, "reference pipeline done".into())
        .await;
    pool.close().await;
    served
}

async fn declare(connection: &Connection, names: &Names) -> anyhow::Result<()> {
    let channel = connection.create_channel().await?;
    let mut quorum = FieldTable::default();
    quorum.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    for queue in names.queues() {
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions::durable(),
                quorum.clone(),
            )
            .await
            .with_context(|| format!("declaring {queue}"))?;
    }
    channel
        .exchange_declare(
            names.events.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    for queue in &names.subscribers {
        channel
            .queue_bind(
                queue.as_str().into(),
                names.events.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

async fn confirming(connection: &Connection) -> anyhow::Result<Channel> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// Publish persistently and wait for the broker's ack.
async fn publish(channel: &Channel, exchange: &str, key: &str, body: &[u8]) -> anyhow::Result<()> {
    let confirmation = channel
        .basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default().with_delivery_mode(PERSISTENT),
        )
        .await?
        .await?;
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        other => bail!("the broker did not take the message: {other:?}"),
    }
}

async fn accept(State(api): State<Api>, body: Bytes) -> Response {
    let Ok(order) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let order_id = Uuid::new_v4();
    let accepted = async {
        sqlx::query("INSERT INTO ref_orders (id, body) VALUES ($1, $2)")
            .bind(order_id)
            .bind(&order)
            .execute(&api.pool)
            .await?;
        publish(&api.channel, "", &api.work, order_id.as_bytes()).await
    };
    match accepted.await {
        Ok(()) => (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({ "order_id": order_id, "status": "accepted" })),
        )
            .into_response(),
        Err(error) => {
            tracing::error!(error.message = %format!("{error:#}"), "the reference pipeline failed an order");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// The processor's hop: per order, one INSERT and a confirmed publish on
/// the fanout, then ack.
async fn decide(
    channel: Channel,
    pool: PgPool,
    work: String,
    events: String,
    prefetch: u16,
) -> anyhow::Result<()> {
    channel
        .basic_qos(prefetch, BasicQosOptions { global: false })
        .await?;
    let consumer = channel
        .basic_consume(
            work.as_str().into(),
            "bench-ref-decide".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let (channel, pool, events) = (&channel, &pool, &events);
    consumer
        .map(|delivery| async move {
            let delivery = delivery?;
            let order_id = Uuid::from_slice(&delivery.data)?;
            sqlx::query("INSERT INTO ref_decisions (id, order_id) VALUES ($1, $2)")
                .bind(Uuid::new_v4())
                .bind(order_id)
                .execute(pool)
                .await?;
            publish(channel, events, "", order_id.as_bytes()).await?;
            delivery.ack(BasicAckOptions::default()).await?;
            anyhow::Ok(())
        })
        .buffer_unordered(usize::from(prefetch))
        .for_each(|handled| async move {
            if let Err(error) = handled {
                tracing::error!(error.message = %format!("{error:#}"), "the reference consumer failed a message");
            }
        })
        .await;
    bail!("the reference consumer's stream ended")
}

/// A subscriber's hop: ack, and count.
async fn subscribe(
    channel: Channel,
    queue: String,
    prefetch: u16,
    done: Arc<[AtomicU64; 2]>,
    which: usize,
) -> anyhow::Result<()> {
    channel
        .basic_qos(prefetch, BasicQosOptions { global: false })
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            format!("bench-ref-sub{which}").as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    while let Some(delivery) = consumer.next().await {
        delivery?.ack(BasicAckOptions::default()).await?;
        done[which].fetch_add(1, Ordering::Relaxed);
    }
    bail!("the reference subscriber's stream ended")
}
