use std::time::Duration;

use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::IdempotencyKey;
use crate::{domain::OrderRequest, error::ApiError};

/// What the handler should do with a keyed request.
pub enum NextAction {
    /// First time: process, then [`save_all`] in the same transaction.
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
    // A key is visible ASCII and a client name has no newline: the pair is
    // unambiguous. The locks are taken before the keys are read, in a
    // statement of their own, so the read sees what their last holder
    // committed.
    let locked: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_try_advisory_xact_lock(hashtextextended(client || E'\\n' || key, 0))
         FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS c(client, key, n)
         ORDER BY n",
    )
    .bind(&clients)
    .bind(&keys)
    .fetch_all(&mut *tx)
    .await?;
    let held: Vec<usize> = (0..claims.len()).filter(|&i| locked[i]).collect();
    // Read the live keys and forget the expired ones (they may still be
    // there until the next clean-up) in one round trip.
    let saved: Vec<(String, String, String, i16, Vec<u8>, Uuid)> = sqlx::query_as(
        "WITH claims AS (SELECT * FROM unnest($1::text[], $2::text[]) AS c(client, key)),
         expired AS (
             DELETE FROM idempotency_keys k USING claims c
             WHERE k.client = c.client AND k.idempotency_key = c.key
               AND k.created_at <= now() - make_interval(secs => $3))
         SELECT k.client, k.idempotency_key, k.request_hash, k.response_status, k.response_body, k.order_id
         FROM idempotency_keys k JOIN claims c ON k.client = c.client AND k.idempotency_key = c.key
         WHERE k.created_at > now() - make_interval(secs => $3)",
    )
    .bind(held.iter().map(|&i| clients[i]).collect::<Vec<_>>())
    .bind(held.iter().map(|&i| keys[i]).collect::<Vec<_>>())
    .bind(ttl.as_secs_f64())
    .fetch_all(&mut *tx)
    .await?;
    Ok(claims
        .iter()
        .zip(locked)
        .map(|(claim, locked)| {
            if !locked {
                return Err(ApiError::IdempotencyKeyInFlight);
            }
            let found = saved.iter().find(|(client, key, ..)| {
                client == claim.client && key.as_str() == claim.key.as_ref()
            });
            match found {
                Some((_, _, hash, ..)) if hash != claim.request_hash => {
                    Err(ApiError::IdempotencyKeyReused)
                }
                Some((_, _, _, status, body, order_id)) => {
                    Ok(NextAction::ReturnSavedResponse(SavedResponse {
                        status: u16::try_from(*status).unwrap_or(200),
                        body: body.clone(),
                        order_id: *order_id,
                    }))
                }
                None => Ok(NextAction::StartProcessing),
            }
        })
        .collect())
}

/// Store the responses for claimed keys, in the transaction that made the
/// orders, in one statement.
pub async fn save_all(
    tx: &mut PgConnection,
    saves: &[(Claim<'_>, &SavedResponse)],
) -> Result<(), ApiError> {
    if saves.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO idempotency_keys (client, idempotency_key, request_hash, response_status, response_body, order_id)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int2[], $5::bytea[], $6::uuid[])",
    )
    .bind(saves.iter().map(|(c, _)| c.client).collect::<Vec<_>>())
    .bind(saves.iter().map(|(c, _)| c.key.as_ref()).collect::<Vec<_>>())
    .bind(saves.iter().map(|(c, _)| c.request_hash).collect::<Vec<_>>())
    .bind(saves.iter().map(|(_, r)| r.status as i16).collect::<Vec<_>>())
    .bind(saves.iter().map(|(_, r)| r.body.as_slice()).collect::<Vec<_>>())
    .bind(saves.iter().map(|(_, r)| r.order_id).collect::<Vec<_>>())
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
