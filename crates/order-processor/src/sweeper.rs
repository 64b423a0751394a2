//! Payments left half done, finished without a person. A delivery takes
//! its order's payment all the way; when the message is gone (dead-lettered
//! after its retries, or its processor crashed and the broker forgot it),
//! the sweeper does it instead:
//!
//! - a payment decided but not settled (`capturing`, `voiding`) for a while
//!   is captured or voided, exactly as a delivery would;
//! - a payment never decided (`authorising`, `authorised`) for much longer
//!   than any retry waits is abandoned: its authorisation is voided (a late
//!   authorisation is then refused by the provider) and the order rejected
//!   with `payment_abandoned`.
//!
//! Every processor runs one. Each claims what it works on by moving the
//! payment's `updated_at` (`FOR UPDATE SKIP LOCKED`), so two sweepers do not
//! take the same payment in one round; and if a delivery and a sweeper meet
//! on one payment, the provider's idempotency keys and the guarded state
//! changes let one of them through.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::{
    handler::{Handled, Processor, move_payment},
    state::PaymentState,
};

/// Payments looked at per round, at most.
const BATCH: i64 = 50;

/// Finishes payments left half done.
#[derive(Clone)]
pub struct Sweeper {
    processor: Processor,
    settle_after: Duration,
    abandon_after: Duration,
}

impl Sweeper {
    /// Settle decided payments untouched for `settle_after`; abandon
    /// undecided ones untouched for `abandon_after`.
    pub fn new(processor: Processor, settle_after: Duration, abandon_after: Duration) -> Self {
        Self {
            processor,
            settle_after,
            abandon_after,
        }
    }

    /// Sweep every `every` until `shutdown`.
    pub async fn run(self, every: Duration, shutdown: CancellationToken) {
        platform::periodic::every(every, shutdown, "sweep half-done payments", || self.sweep())
            .await;
    }

    /// One round; returns how many orders it brought to a final status.
    pub async fn sweep(&self) -> anyhow::Result<usize> {
        let due = sqlx::query!(
            r#"UPDATE payments SET updated_at = now()
               WHERE order_id IN (
                   SELECT order_id FROM payments
                   WHERE (state IN ('capturing', 'voiding')
                          AND updated_at < now() - make_interval(secs => $1))
                      OR (state IN ('authorising', 'authorised')
                          AND updated_at < now() - make_interval(secs => $2))
                   ORDER BY updated_at LIMIT $3
                   FOR UPDATE SKIP LOCKED)
               RETURNING order_id, state AS "state: PaymentState""#,
            self.settle_after.as_secs_f64(),
            self.abandon_after.as_secs_f64(),
            BATCH,
        )
        .fetch_all(&self.processor.pool)
        .await?;
        let mut settled = 0;
        for payment in due {
            let span = tracing::info_span!("order", order_id = %payment.order_id, sweeper = true);
            let swept = self.sweep_one(payment.order_id, payment.state);
            if swept.instrument(span).await? {
                settled += 1;
            }
        }
        Ok(settled)
    }

    /// Take one payment found in `state` to its end; `true` if it got there
    /// now.
    async fn sweep_one(&self, order_id: Uuid, state: PaymentState) -> sqlx::Result<bool> {
        if matches!(state, PaymentState::Authorising | PaymentState::Authorised) {
            self.abandon(order_id).await?;
        }
        match self.processor.settle(order_id).await {
            Ok(Handled::Decided { .. }) => {
                metrics::counter!("payments_swept_total").increment(1);
                Ok(true)
            }
            Ok(Handled::Duplicate) => Ok(false),
            Err(error) => {
                tracing::warn!(
                    error.message = %format!("{error:#}"),
                    "payment still not settled; the sweeper will try again"
                );
                Ok(false)
            }
        }
    }

    /// Decide to void a payment that was never decided.
    async fn abandon(&self, order_id: Uuid) -> sqlx::Result<()> {
        let reason = format!(
            "payment_abandoned: not decided within {} s",
            self.abandon_after.as_secs()
        );
        let moved = move_payment(
            &self.processor.pool,
            order_id,
            &[PaymentState::Authorising, PaymentState::Authorised],
            PaymentState::Voiding,
            Some("payment_abandoned"),
            &reason,
            "order-processor (sweeper)",
        )
        .await?;
        if moved {
            tracing::warn!("{reason}; voiding its authorisation");
        }
        Ok(())
    }
}
