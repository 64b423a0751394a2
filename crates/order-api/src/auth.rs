//! API keys. A client sends `Authorization: Bearer <key>`. Keys carry 244
//! random bits from the OS, shown once when made and stored only as their
//! SHA-256 (a fast hash is enough for keys this long: there is nothing to
//! guess). Each key belongs to a client, by name, and has a scope: a
//! `client` sees only its own orders and idempotency keys, an `admin` sees
//! everything. A revoked key fails on its next request: every request
//! looks its key up (the requests that arrive together in one statement).

use std::{collections::HashMap, fmt, str::FromStr, sync::Arc, time::Duration};

use axum::{
    extract::{Request, State},
    http::header,
    middleware::Next,
    response::Response,
};
use governor::{DefaultKeyedRateLimiter, Quota, clock::Clock};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use crate::{batch::Batcher, error::ApiError};

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Its own orders only.
    Client,
    /// Every order, the `/events` firehose and `/metrics`.
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Client => "client",
            Scope::Admin => "admin",
        }
    }
}

impl FromStr for Scope {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "client" => Ok(Scope::Client),
            "admin" => Ok(Scope::Admin),
            other => Err(format!("unknown scope {other:?}: expected client or admin")),
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who is calling: put in the request's extensions by [`authenticate`].
#[derive(Debug, Clone)]
pub struct Caller {
    pub key_id: Uuid,
    pub client: String,
    pub scope: Scope,
}

impl Caller {
    /// The client whose data this caller may see; `None` for an admin, who
    /// sees everyone's.
    pub fn owner(&self) -> Option<&str> {
        (self.scope == Scope::Client).then_some(self.client.as_str())
    }

    pub fn is_admin(&self) -> bool {
        self.scope == Scope::Admin
    }
}

/// A key just made: the only time its text exists outside the client.
pub struct NewKey {
    pub id: Uuid,
    pub client: String,
    pub scope: Scope,
    pub key: String,
}

/// A key as `api-keys list` shows it (never the key itself).
#[derive(Debug, sqlx::FromRow)]
pub struct KeyInfo {
    pub id: Uuid,
    pub client: String,
    pub scope: String,
    pub key_prefix: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub revoked_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Every key starts with this, so a leaked one is easy to find in a scan.
const KEY_PREFIX: &str = "ofk_";
/// Characters of a key kept in clear to tell keys apart: at most a quarter
/// of it (a chosen key may be short), at most the prefix and 8 more.
fn shown(key: &str) -> &str {
    &key[..(key.len() / 4).min(KEY_PREFIX.len() + 8)]
}
/// The shortest key accepted from a person (`api-keys create --key`).
pub const MIN_KEY_LEN: usize = 16;
/// Longer than any key: refused before hashing.
const MAX_KEY_LEN: usize = 256;

/// A client name: 1–64 of `a-z 0-9 . _ -`, starting with a letter or digit.
pub fn check_client_name(name: &str) -> Result<(), String> {
    let valid = (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "invalid client name {name:?}: 1-64 of a-z, 0-9, '.', '_', '-', starting with a letter or digit"
        ))
    }
}

fn hash(key: &str) -> Vec<u8> {
    Sha256::digest(key.as_bytes()).to_vec()
}

/// Two v4 UUIDs (122 random bits each from the OS's generator, through
/// `getrandom`) as 64 hex characters.
fn random_key() -> String {
    format!(
        "{KEY_PREFIX}{}{}",
        Uuid::new_v4().simple(),
        Uuid::new_v4().simple()
    )
}

/// Make a key for `client` with `scope`. With `chosen`, that text is the key
/// (for a demo key a README can show); if a live key with that text exists
/// already it is returned as it is.
pub async fn create_key(
    pool: &PgPool,
    client: &str,
    scope: Scope,
    chosen: Option<&str>,
) -> anyhow::Result<NewKey> {
    check_client_name(client).map_err(anyhow::Error::msg)?;
    let key = match chosen {
        Some(text) => {
            anyhow::ensure!(
                (MIN_KEY_LEN..=MAX_KEY_LEN).contains(&text.len())
                    && text.bytes().all(|b| b.is_ascii_graphic()),
                "a chosen key must be {MIN_KEY_LEN}-{MAX_KEY_LEN} visible ASCII characters"
            );
            text.to_owned()
        }
        None => random_key(),
    };
    let id = Uuid::new_v4();
    let inserted: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO api_keys (id, client, scope, key_hash, key_prefix) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (key_hash) DO NOTHING
         RETURNING id",
    )
    .bind(id)
    .bind(client)
    .bind(scope.as_str())
    .bind(hash(&key))
    .bind(shown(&key))
    .fetch_optional(pool)
    .await?;
    let made = match inserted {
        Some(key_id) => Caller {
            key_id,
            client: client.to_owned(),
            scope,
        },
        // A chosen key made before: it is kept as it is, if it is live.
        None => caller_of(pool, &key)
            .await?
            .ok_or_else(|| anyhow::anyhow!("that key was revoked; choose another"))?,
    };
    Ok(NewKey {
        id: made.key_id,
        client: made.client,
        scope: made.scope,
        key,
    })
}

/// Revoke the key with id `id`, or every key of client `id`; returns how
/// many were live.
pub async fn revoke(pool: &PgPool, id_or_client: &str) -> sqlx::Result<u64> {
    let id = Uuid::parse_str(id_or_client).ok();
    let revoked = sqlx::query(
        "UPDATE api_keys SET revoked_at = now()
         WHERE revoked_at IS NULL AND (id = $1 OR ($1 IS NULL AND client = $2))",
    )
    .bind(id)
    .bind(id_or_client)
    .execute(pool)
    .await?;
    Ok(revoked.rows_affected())
}

/// Every key, newest first.
pub async fn list(pool: &PgPool) -> sqlx::Result<Vec<KeyInfo>> {
    sqlx::query_as(
        "SELECT id, client, scope, key_prefix, created_at, revoked_at
         FROM api_keys ORDER BY created_at DESC",
    )
    .fetch_all(pool)
    .await
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
    let rows: Vec<(Vec<u8>, Uuid, String, String)> =
        sqlx::query_as("SELECT * FROM api_callers($1)")
            .bind(hashes)
            .fetch_all(pool)
            .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(hash, key_id, client, scope)| {
            let caller = Caller {
                key_id,
                client,
                scope: scope.parse().ok()?,
            };
            Some((hash, caller))
        })
        .collect())
}

/// Key lookups running at once, at most: two, so that one stuck on a dead
/// connection does not hold up every request's authentication.
const LOOKUPS: usize = 2;
/// Keys looked up in one statement, at most: as many requests as the server
/// holds at once by default (`HTTP_MAX_CONNECTIONS`). While Postgres is down
/// each lookup waits out the pool's acquire timeout, and everything that
/// arrived meanwhile must fit in the next one: a smaller cap would leave a
/// growing queue, each request waiting ever longer for its 503.
const MAX_LOOKUP: usize = 1024;

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

/// Requests each key may make: a steady rate with a burst on top.
#[derive(Clone)]
pub struct RateLimits {
    limiter: Arc<DefaultKeyedRateLimiter<Uuid>>,
}

impl RateLimits {
    pub fn new(per_second: std::num::NonZeroU32, burst: std::num::NonZeroU32) -> Self {
        let quota = Quota::per_second(per_second).allow_burst(burst);
        Self {
            limiter: Arc::new(DefaultKeyedRateLimiter::keyed(quota)),
        }
    }

    /// `Err(wait)` when `key` is over its limit.
    fn check(&self, key: Uuid) -> Result<(), Duration> {
        self.limiter.check_key(&key).map_err(|not_until| {
            not_until.wait_time_from(governor::clock::DefaultClock::default().now())
        })
    }

    /// Forget keys that are back to a full burst (run now and then, so the
    /// table does not grow with every key ever seen).
    pub fn forget_idle(&self) {
        self.limiter.retain_recent();
    }
}

/// The key's text from `Authorization: Bearer <key>`.
fn bearer(request: &Request) -> Result<&str, ApiError> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)
        .ok_or(ApiError::Unauthenticated(
            "send Authorization: Bearer <API key>",
        ))?;
    let text = value.to_str().map_err(|_| ApiError::InvalidKey)?.trim();
    let (scheme, key) = text.split_once(' ').ok_or(ApiError::InvalidKey)?;
    if !scheme.eq_ignore_ascii_case("bearer") || key.trim().is_empty() {
        return Err(ApiError::Unauthenticated(
            "the Authorization scheme must be Bearer",
        ));
    }
    Ok(key.trim())
}

/// Middleware: let the request through only with a live key under its rate
/// limit, and tell the handlers who the caller is.
pub async fn authenticate(
    State(state): State<crate::startup::AppState>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let key = bearer(&request)?;
    let caller = state.keys.caller(key).await?.ok_or(ApiError::InvalidKey)?;
    if let Err(wait) = state.rate_limits.check(caller.key_id) {
        metrics::counter!("http_rate_limited_total").increment(1);
        return Err(ApiError::RateLimited(wait));
    }
    request.extensions_mut().insert(caller);
    Ok(next.run(request).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_long_random_and_distinct() {
        let (a, b) = (random_key(), random_key());
        assert_ne!(a, b);
        assert_eq!(a.len(), KEY_PREFIX.len() + 64);
        assert!(a.starts_with(KEY_PREFIX));
        assert!(a[KEY_PREFIX.len()..].bytes().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn client_names_are_plain() {
        for good in ["demo", "shop-1", "a", "acme.eu_2"] {
            assert!(check_client_name(good).is_ok(), "{good}");
        }
        for bad in ["", "Demo", "-x", "a b", "x/y", &"a".repeat(65)] {
            assert!(check_client_name(bad).is_err(), "{bad}");
        }
    }
}
