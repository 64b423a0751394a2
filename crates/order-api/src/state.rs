//! What the handlers can reach, and the part each one takes: every field
//! is a sub-state a handler or layer extracts by its type (`State<PgPool>`,
//! `State<AuthState>`, ...), so none of them names the app.

use axum::extract::FromRef;
use messaging::Broker;
use platform::{event_log::EventBus, jobs::WorkQueue};
use sqlx::PgPool;

use crate::{
    announcer::Announcer,
    auth::AuthState,
    intake::Intake,
    routes::{dashboard::DeadLetterLock, orders::post::MaxQuantity, sse::Streaming},
};

/// Everything a request handler can reach.
#[derive(Clone, FromRef)]
pub struct AppState {
    pub pool: PgPool,
    /// The key lookup and the rate limits, for the key check.
    pub auth: AuthState,
    /// Where POSTs hand their orders to be stored, in batches.
    pub intake: Intake,
    /// What tells the live feed, the log and the work queue of an order.
    pub announcer: Announcer,
    /// For the live page: queue depths, dead letters and their replay.
    pub broker: Broker,
    pub dead_letters: DeadLetterLock,
    /// Live events for Server-Sent Events clients, and the caps on them.
    pub streaming: Streaming,
    pub max_quantity: MaxQuantity,
    /// Which way the orders and their events travel, for the live page.
    pub transports: Transports,
}

/// Which way the orders and their events travel (`WORK_QUEUE`,
/// `EVENT_BUS`).
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Transports {
    #[serde(serialize_with = "name_of")]
    pub work_queue: WorkQueue,
    #[serde(serialize_with = "name_of")]
    pub event_bus: EventBus,
}

impl Transports {
    /// Whether anything travels through RabbitMQ.
    pub fn use_rabbitmq(&self) -> bool {
        platform::settings::uses_rabbitmq(self.work_queue, self.event_bus)
    }
}

/// A transport by its name, as the variables spell it.
fn name_of<T: clap::ValueEnum, S: serde::Serializer>(value: &T, to: S) -> Result<S::Ok, S::Error> {
    let name = value.to_possible_value().map(|v| v.get_name().to_owned());
    to.serialize_str(name.as_deref().unwrap_or("unknown"))
}
