//! An order whose message is dead-lettered is held: its status says so,
//! with the reason, from that moment until a replay accepts it again (see
//! the `dead-letters` crate) or the payment sweeper ends its payment: one
//! already decided is captured or voided, one never decided is abandoned and
//! the order rejected. Its client sees why it waits, and order-api's
//! republisher, which looks for accepted orders the broker forgot, leaves it
//! alone: its message is in the dead letters, waiting for a person. A held
//! order whose message comes back all the same is taken up as an accepted
//! one.

use uuid::Uuid;

use crate::handler::Processor;

impl Processor {
    /// Hold `order_id` for `reason` if it is still accepted; `true` if it is
    /// held now (by this call or an earlier one).
    pub async fn hold(&self, order_id: Uuid, reason: &str) -> sqlx::Result<bool> {
        let held = sqlx::query_scalar!(
            r#"WITH held AS (
                 UPDATE orders SET status = 'held', reason = $2, updated_at = now()
                 WHERE id = $1 AND status = 'accepted' RETURNING id),
             history AS (
                 INSERT INTO order_status_history (order_id, status, detail, service)
                 SELECT id, 'held', $2, 'order-processor' FROM held)
             SELECT EXISTS (SELECT 1 FROM held) OR status = 'held' AS "held!" FROM orders WHERE id = $1"#,
            order_id,
            reason,
        )
        .fetch_optional(&self.pool)
        .await?;
        Ok(held.unwrap_or(false))
    }
}
