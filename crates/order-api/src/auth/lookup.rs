//! Finding the live key a request names: by its hash, the keys of the
//! requests that arrive together in one statement.

use std::collections::HashMap;

use sha2::{Digest, Sha256};
use sqlx::PgPool;

use super::Caller;
use crate::{batch::Batcher, error::ApiError};

/// Longer than any key: refused before hashing.
pub(super) const MAX_KEY_LEN: usize = 256;

/// Key lookups running at once, at most: two, so that one stuck on a dead
/// connection does not hold up every request's authentication.
const LOOKUPS: usize = 2;
/// Keys looked up in one statement, at most: as many requests as the server
/// holds at once by default (`HTTP_MAX_CONNECTIONS`). While Postgres is down
/// each lookup waits out the pool's acquire timeout, and everything that
/// arrived meanwhile must fit in the next one: a smaller cap would leave a
/// growing queue, each request waiting ever longer for its 503.
const MAX_LOOKUP: usize = 1024;

/// How a key is stored: its SHA-256.
pub(super) fn hash(key: &str) -> Vec<u8> {
    Sha256::digest(key.as_bytes()).to_vec()
}

/// The live key `key`, if there is one.
pub async fn caller_of(pool: &PgPool, key: &str) -> Result<Option<Caller>, ApiError> {
    if key.len() > MAX_KEY_LEN {
        return Ok(None);
    }
    let hash = hash(key);
    Ok(callers_of(pool, std::slice::from_ref(&hash))
        .await?
        .remove(&hash))
}

/// The live keys among `hashes`, by hash, in one statement (a function
/// whose plan is kept: see its migration).
async fn callers_of(pool: &PgPool, hashes: &[Vec<u8>]) -> sqlx::Result<HashMap<Vec<u8>, Caller>> {
    let rows = sqlx::query!(
        r#"SELECT key_hash AS "key_hash!", id AS "id!", client AS "client!", scope AS "scope!"
           FROM api_callers($1)"#,
        hashes,
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|row| {
            let caller = Caller {
                key_id: row.id,
                client: row.client,
                scope: row.scope.parse().ok()?,
            };
            Some((row.key_hash, caller))
        })
        .collect())
}

/// Looks up the keys of the requests that arrive together in one statement
/// (each after its request arrived, so a revoked key still fails on its
/// next request).
#[derive(Clone)]
pub struct KeyLookup {
    lookups: Batcher<Vec<u8>, Result<Option<Caller>, ApiError>>,
}

impl KeyLookup {
    pub fn start(pool: PgPool) -> Self {
        let lookups = Batcher::start(LOOKUPS, MAX_LOOKUP, move |hashes: Vec<Vec<u8>>| {
            let pool = pool.clone();
            async move {
                match callers_of(&pool, &hashes).await {
                    Ok(callers) => hashes
                        .iter()
                        .map(|hash| Ok(callers.get(hash).cloned()))
                        .collect(),
                    Err(error) => {
                        let error = ApiError::from(error);
                        hashes
                            .iter()
                            .map(|_| {
                                Err(error.outage_again().unwrap_or_else(|| {
                                    ApiError::Unexpected(anyhow::anyhow!("{error:#}"))
                                }))
                            })
                            .collect()
                    }
                }
            }
        });
        Self { lookups }
    }

    /// The live key `key`, if there is one.
    pub async fn caller(&self, key: &str) -> Result<Option<Caller>, ApiError> {
        if key.len() > MAX_KEY_LEN {
            return Ok(None);
        }
        let started = std::time::Instant::now();
        let caller = self.lookups.call(hash(key)).await;
        metrics::histogram!("api_key_lookup_seconds").record(started.elapsed().as_secs_f64());
        caller.ok_or_else(|| anyhow::anyhow!("the API key lookup has stopped"))?
    }
}
