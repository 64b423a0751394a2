//! Group commit: the orders of concurrent POSTs share one transaction.
//!
//! A request hands its validated order to the intake and waits for the
//! answer. A writer takes every order waiting since it last looked (never
//! waiting to fill a batch: at low load a batch is one order) and stores
//! them all in one transaction with set-based statements: their idempotency
//! keys claimed, their prices read, the orders with their first history
//! lines, their outbox messages (or, with `WORK_QUEUE=postgres`, their jobs,
//! with one `NOTIFY`) and their keys' responses inserted. Each
//! request hears its answer only after that commit. [`WRITERS`] batches may
//! be committing at once; batches grow while they all are.
//!
//! Stripe's idempotency semantics hold inside a batch too: the key's
//! advisory lock is taken for the first request with it, so a second
//! request with the same key gets 409 exactly as if it had come from
//! another instance. If a batch fails as a whole, each of its orders is
//! stored again in a transaction of its own, so one order's failure is only
//! its own.
//!
//! [`placement`] holds what goes in and comes out; [`store`] is one batch's
//! transaction; [`statements`] its statements.

mod placement;
mod statements;
mod store;

use std::{sync::Arc, time::Duration};

use platform::jobs::WorkQueue;
use sqlx::PgPool;

pub use placement::{Answer, Placed, Placement, StoredOrder};
use store::Store;

use crate::{batch::Batcher, error::ApiError};

/// Batches committing at once, at most: two, so that one commit stalled (a
/// checkpoint's fsync) does not hold every request up. More only make the
/// batches smaller: a writer starts a batch as soon as it is free, so more
/// writers spend more CPU per order (more, smaller transactions) for no
/// more orders a second.
pub const WRITERS: usize = 2;

/// Orders in one transaction, at most.
pub const MAX_BATCH: usize = 128;

/// Where requests hand their orders to the writers.
#[derive(Clone)]
pub struct Intake {
    writers: Batcher<Placement, Result<Placed, ApiError>>,
}

impl Intake {
    /// Start the writers, answering each stored order with `answer`; they
    /// stop once every handle is dropped.
    pub fn start(
        pool: PgPool,
        orders_exchange: String,
        work_queue: WorkQueue,
        idempotency_ttl: Duration,
        answer: Answer,
    ) -> Self {
        let store = Arc::new(Store {
            pool,
            orders_exchange,
            work_queue,
            idempotency_ttl,
            answer,
        });
        let writers = Batcher::start(WRITERS, MAX_BATCH, move |batch| {
            let store = Arc::clone(&store);
            async move { store.commit(batch).await }
        });
        Self { writers }
    }

    /// Store `placement` with whatever else is waiting; answers after the
    /// commit.
    pub async fn place(&self, placement: Placement) -> Result<Placed, ApiError> {
        let _pending = Pending::count();
        let started = std::time::Instant::now();
        let placed = self.writers.call(placement).await;
        metrics::histogram!("order_intake_seconds").record(started.elapsed().as_secs_f64());
        placed.ok_or_else(|| anyhow::anyhow!("the order intake dropped the order"))?
    }
}

/// Counts a request in `order_intake_pending` until it has its answer (or
/// its client went away).
struct Pending;

impl Pending {
    fn count() -> Self {
        metrics::gauge!("order_intake_pending").increment(1.0);
        Self
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        metrics::gauge!("order_intake_pending").decrement(1.0);
    }
}
