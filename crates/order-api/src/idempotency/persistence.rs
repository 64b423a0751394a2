use std::time::Duration;

use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::IdempotencyKey;
use crate::{domain::OrderRequest, error::ApiError};

/// What the handler should do with a keyed request.
pub enum NextAction {
    /// First time: process, then save the response in the same transaction
    /// (the intake does, with the order).
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

/// A keyed request: whose key, the key, and the hash of its body.
pub struct Claim<'a> {
    pub client: &'a str,
    pub key: &'a IdempotencyKey,
    pub request_hash: &'a str,
}

/// Claim each request's key for this transaction (each client's keys are
/// its own: another client's equal key is another key); the claims must be
/// distinct. The transaction-scoped advisory lock is held until commit or
/// rollback, so a concurrent request with the same key learns at once that
/// the first is still in flight (409) instead of waiting, and a crashed
/// request leaves nothing stuck behind. One answer per claim, in order.
pub async fn claim_all(
    tx: &mut PgConnection,
    claims: &[Claim<'_>],
    ttl: Duration,
) -> Result<Vec<Result<NextAction, ApiError>>, ApiError> {
    if claims.is_empty() {
        return Ok(Vec::new());
    }
    let clients: Vec<&str> = claims.iter().map(|c| c.client).collect();
    let keys: Vec<&str> = claims.iter().map(|c| c.key.as_ref()).collect();
    // Locks, then the live keys (expired ones forgotten): one round trip,
    // see the migration that makes `claim_idempotency_keys`.
    let rows = sqlx::query_as!(
        ClaimRow,
        r#"SELECT locked AS "locked!", request_hash, response_status, response_body, order_id
           FROM claim_idempotency_keys($1, $2, $3)"#,
        &clients as &[&str],
        &keys as &[&str],
        ttl.as_secs_f64(),
    )
    .fetch_all(&mut *tx)
    .await?;
    Ok(claims
        .iter()
        .zip(rows)
        .map(|(claim, row)| {
            if !row.locked {
                return Err(ApiError::IdempotencyKeyInFlight);
            }
            match (
                row.request_hash,
                row.response_status,
                row.response_body,
                row.order_id,
            ) {
                (Some(hash), ..) if hash != claim.request_hash => {
                    Err(ApiError::IdempotencyKeyReused)
                }
                (Some(_), Some(status), Some(body), Some(order_id)) => {
                    Ok(NextAction::ReturnSavedResponse(SavedResponse {
                        status: u16::try_from(status).unwrap_or(200),
                        body,
                        order_id,
                    }))
                }
                _ => Ok(NextAction::StartProcessing),
            }
        })
        .collect())
}

/// One claim as `claim_idempotency_keys` answers it: whether its lock was
/// free, and the live response saved for its key, if any.
struct ClaimRow {
    locked: bool,
    request_hash: Option<String>,
    response_status: Option<i16>,
    response_body: Option<Vec<u8>>,
    order_id: Option<Uuid>,
}

/// Forget keys older than `ttl`; returns how many.
pub async fn delete_expired(pool: &PgPool, ttl: Duration) -> sqlx::Result<u64> {
    let deleted = sqlx::query!(
        "DELETE FROM idempotency_keys WHERE created_at <= now() - make_interval(secs => $1)",
        ttl.as_secs_f64(),
    )
    .execute(pool)
    .await?;
    Ok(deleted.rows_affected())
}
