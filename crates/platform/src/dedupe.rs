//! Consumer-side idempotency: a message id is recorded in the same
//! transaction as the effect it caused, so a redelivery finds it and skips.

use sqlx::PgConnection;
use uuid::Uuid;

/// Record that `consumer` handled `message_id`. Returns `false` when it
/// already had: the caller must then skip the effect (and ack). A concurrent
/// transaction holding the same id makes this wait until it commits or rolls
/// back, so two deliveries of one message never both see `true`.
pub async fn first_delivery(
    conn: &mut PgConnection,
    consumer: &str,
    message_id: Uuid,
) -> sqlx::Result<bool> {
    let inserted = sqlx::query(
        "INSERT INTO processed_messages (consumer, message_id) VALUES ($1, $2)
         ON CONFLICT DO NOTHING",
    )
    .bind(consumer)
    .bind(message_id)
    .execute(conn)
    .await?;
    Ok(inserted.rows_affected() == 1)
}

/// The same record as [`first_delivery`], as a common table expression for
/// a consumer whose whole effect fits in one statement: `first` yields one
/// row only on the first delivery of (`$1` consumer, `$2` message id), and
/// the statement's inserts select `FROM first`. Record and effect then
/// commit together in one round trip instead of a transaction of four.
pub const FIRST_DELIVERY_CTE: &str = "first AS (
    INSERT INTO processed_messages (consumer, message_id) VALUES ($1, $2)
    ON CONFLICT DO NOTHING RETURNING message_id)";
