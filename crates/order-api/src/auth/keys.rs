//! Keys made, listed and revoked by a person (the `api-keys` command).

use sqlx::PgPool;
use uuid::Uuid;

use super::{
    Caller, Scope,
    lookup::{MAX_KEY_LEN, caller_of, hash},
};

/// A key just made: the only time its text exists outside the client.
pub struct NewKey {
    pub id: Uuid,
    pub client: String,
    pub scope: Scope,
    pub key: String,
}

/// A key as `api-keys list` shows it (never the key itself).
#[derive(Debug)]
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
    let inserted = sqlx::query_scalar!(
        "INSERT INTO api_keys (id, client, scope, key_hash, key_prefix) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (key_hash) DO NOTHING
         RETURNING id",
        id,
        client,
        scope.as_str(),
        hash(&key),
        shown(&key),
    )
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
    let revoked = sqlx::query!(
        "UPDATE api_keys SET revoked_at = now()
         WHERE revoked_at IS NULL AND (id = $1 OR ($1 IS NULL AND client = $2))",
        id,
        id_or_client,
    )
    .execute(pool)
    .await?;
    Ok(revoked.rows_affected())
}

/// Every key, newest first.
pub async fn list(pool: &PgPool) -> sqlx::Result<Vec<KeyInfo>> {
    sqlx::query_as!(
        KeyInfo,
        "SELECT id, client, scope, key_prefix, created_at, revoked_at
         FROM api_keys ORDER BY created_at DESC",
    )
    .fetch_all(pool)
    .await
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
