use std::time::Duration;

use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::IdempotencyKey;
use crate::{domain::OrderRequest, error::ApiError};

/// What the handler should do with a keyed request.
pub enum NextAction {
    /// First time: process, then [`save_response`] in the same transaction.
    StartProcessing,
    /// Seen before with the same body: answer this again.
    ReturnSavedResponse(SavedResponse),
}

/// The first response given for a key.
pub struct SavedResponse {
    pub status: u16,
    pub body: Vec<u8>,
    pub order_id: Uuid,
}

/// SHA-256 of the request after defaults are applied, so `{"currency":"EUR"}`
/// and an omitted currency count as the same body.
pub fn request_hash(request: &OrderRequest) -> String {
    let canonical = serde_json::to_vec(request).expect("an order request serialises");
    hex::encode(Sha256::digest(canonical))
}

/// Claim `client`'s `key` for this transaction (each client's keys are its
/// own: another client's equal key is another key). The transaction-scoped advisory lock is
/// held until commit or rollback, so a concurrent request with the same key
/// learns at once that the first is still in flight (409) instead of
/// waiting, and a crashed request leaves nothing stuck behind.
pub async fn try_start(
    tx: &mut PgConnection,
    client: &str,
    key: &IdempotencyKey,
    request_hash: &str,
    ttl: Duration,
) -> Result<NextAction, ApiError> {
    let locked: bool =
        // A key is visible ASCII and a client name has no newline: the pair
        // is unambiguous.
        sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(hashtextextended($1 || E'\\n' || $2, 0))")
            .bind(client)
            .bind(key.as_ref())
            .fetch_one(&mut *tx)
            .await?;
    if !locked {
        return Err(ApiError::IdempotencyKeyInFlight);
    }
    let saved: Option<(String, i16, Vec<u8>, Uuid)> = sqlx::query_as(
        "SELECT request_hash, response_status, response_body, order_id FROM idempotency_keys
         WHERE client = $1 AND idempotency_key = $2
           AND created_at > now() - make_interval(secs => $3)",
    )
    .bind(client)
    .bind(key.as_ref())
    .bind(ttl.as_secs_f64())
    .fetch_optional(&mut *tx)
    .await?;
    match saved {
        Some((hash, _, _, _)) if hash != request_hash => Err(ApiError::IdempotencyKeyReused),
        Some((_, status, body, order_id)) => Ok(NextAction::ReturnSavedResponse(SavedResponse {
            status: u16::try_from(status).unwrap_or(200),
            body,
            order_id,
        })),
        None => {
            // An expired key may still be there until the next clean-up.
            sqlx::query("DELETE FROM idempotency_keys WHERE client = $1 AND idempotency_key = $2")
                .bind(client)
                .bind(key.as_ref())
                .execute(&mut *tx)
                .await?;
            Ok(NextAction::StartProcessing)
        }
    }
}

/// Store the response for `key`, in the transaction that made the order.
pub async fn save_response(
    tx: &mut PgConnection,
    client: &str,
    key: &IdempotencyKey,
    request_hash: &str,
    response: &SavedResponse,
) -> Result<(), ApiError> {
    sqlx::query(
        "INSERT INTO idempotency_keys (client, idempotency_key, request_hash, response_status, response_body, order_id)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(client)
    .bind(key.as_ref())
    .bind(request_hash)
    .bind(response.status as i16)
    .bind(&response.body)
    .bind(response.order_id)
    .execute(tx)
    .await?;
    Ok(())
}

/// Forget keys older than `ttl`; returns how many.
pub async fn delete_expired(pool: &PgPool, ttl: Duration) -> sqlx::Result<u64> {
    let deleted = sqlx::query(
        "DELETE FROM idempotency_keys WHERE created_at <= now() - make_interval(secs => $1)",
    )
    .bind(ttl.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(deleted.rows_affected())
}
