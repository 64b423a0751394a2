//! Whose each order is, for the live feed: a client key's `GET /events`
//! sends only its own orders' events, and an event that comes from the
//! broker does not say whose order it is about.
//!
//! The orders this process accepts while a client key watches are
//! remembered as they are announced; any other is read from Postgres once,
//! then remembered. A client's orders never change hands, so what is
//! remembered stays true. An order whose client cannot be learned (none, or
//! Postgres away) is nobody's: only admin keys see its events.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use sqlx::PgPool;
use uuid::Uuid;

/// Orders remembered at most; the oldest is forgotten first.
const REMEMBERED: usize = 65_536;

/// How long the feed waits for Postgres to say whose an order is.
const LOOKUP_WAIT: Duration = Duration::from_secs(1);

/// The client of each order the live feed has heard of lately.
pub struct Owners {
    pool: PgPool,
    known: Mutex<Known>,
}

#[derive(Default)]
struct Known {
    by_order: HashMap<Uuid, Arc<str>>,
    /// The remembered orders, oldest first.
    arrived: VecDeque<Uuid>,
}

impl Owners {
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            known: Mutex::default(),
        }
    }

    /// `order` is `client`'s.
    pub fn remember(&self, order: Uuid, client: Arc<str>) {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        if known.by_order.insert(order, client).is_some() {
            return;
        }
        known.arrived.push_back(order);
        if known.arrived.len() > REMEMBERED
            && let Some(oldest) = known.arrived.pop_front()
        {
            known.by_order.remove(&oldest);
        }
    }

    /// Whose `order` is; `None` when it is no client's or cannot be learned
    /// now.
    pub async fn of(&self, order: Uuid) -> Option<Arc<str>> {
        let remembered = {
            let known = self.known.lock().unwrap_or_else(|p| p.into_inner());
            known.by_order.get(&order).cloned()
        };
        if remembered.is_some() {
            return remembered;
        }
        let lookup = sqlx::query_scalar!("SELECT client FROM orders WHERE id = $1", order)
            .fetch_optional(&self.pool);
        let client: Arc<str> = match tokio::time::timeout(LOOKUP_WAIT, lookup).await {
            Ok(Ok(Some(Some(client)))) => client.into(),
            // No such order, or one placed before keys existed.
            Ok(Ok(_)) => return None,
            Ok(Err(error)) => {
                tracing::warn!(error = %error, %order, "whose order this is could not be read; only admin keys see its event");
                return None;
            }
            Err(_) => {
                tracing::warn!(%order, "whose order this is was not read in time; only admin keys see its event");
                return None;
            }
        };
        self.remember(order, client.clone());
        Some(client)
    }
}
