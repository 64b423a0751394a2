//! Webhooks: an order's event POSTed to its `callback_url`, signed, retried
//! with exponential backoff and jitter for a bounded number of attempts,
//! every attempt recorded, and the delivery marked dead after the last.
//!
//! Deliveries are rows (written in the same statement as the notification,
//! so each event gets exactly one). A dispatcher claims due rows with a
//! lease and sends them concurrently, each with its own timeout, so a slow
//! or failing receiver never holds up the others.
//!
//! A URL that reaches inside, or resolves there (see [`crate::egress`]), is
//! refused: recorded with its reason as the terminal state `refused` after
//! that one attempt, never retried, no packet sent.

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use hmac::{Hmac, Mac};
use reqwest::dns::Resolve;
use sha2::Sha256;
use sqlx::PgPool;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::egress::{self, AllowList, GuardedResolver, SystemResolver};

/// The signature header: `t=<unix seconds>,v1=<hex HMAC-SHA256>`.
pub const SIGNATURE_HEADER: &str = "Orderflow-Signature";

/// The shared secret webhooks are signed with: never printed.
#[derive(Clone)]
pub struct Secret(pub String);

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        Ok(Self(value.to_owned()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// How webhooks are sent.
#[derive(Clone, Debug)]
pub struct WebhookPolicy {
    /// Debug-printed as `Secret(***)`.
    pub secret: Secret,
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub timeout: Duration,
    pub concurrency: usize,
    /// Hosts let through the inward-address check (empty: none).
    pub allowed_hosts: AllowList,
}

/// `t=...,v1=...` for `body` sent at `timestamp`: HMAC-SHA256 keyed with
/// the shared secret over `"{timestamp}.{body}"`, as the receiver recomputes it.
pub fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let signature = mac(secret, timestamp, body).finalize().into_bytes();
    format!("t={timestamp},v1={}", hex::encode(signature))
}

/// The MAC of `"{timestamp}.{body}"` keyed with `secret`.
fn mac(secret: &str, timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes a key of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// Whether `header` is a valid signature of `body` under `secret` (what a
/// receiver does; the tests use it).
pub fn verify(secret: &str, header: &str, body: &[u8]) -> bool {
    let mut timestamp = None;
    let mut signature = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", value)) => timestamp = value.parse::<i64>().ok(),
            Some(("v1", value)) => signature = hex::decode(value).ok(),
            _ => {}
        }
    }
    let (Some(timestamp), Some(signature)) = (timestamp, signature) else {
        return false;
    };
    mac(secret, timestamp, body)
        .verify_slice(&signature)
        .is_ok()
}

/// The wait before attempt `attempt + 1` (after `attempt` failures):
/// exponential, capped, with full jitter in its upper half.
pub fn backoff(policy: &WebhookPolicy, attempt: u32) -> Duration {
    let base = policy
        .initial_backoff
        .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1)))
        .min(policy.max_backoff);
    base / 2 + base.mul_f64(fastrand::f64() / 2.0)
}

struct Due {
    id: i64,
    event_id: Uuid,
    url: String,
    body: Vec<u8>,
    attempts: i32,
}

/// Sends due webhooks until `shutdown`.
pub struct Dispatcher {
    pool: PgPool,
    client: reqwest::Client,
    policy: WebhookPolicy,
}

impl Dispatcher {
    pub fn new(pool: PgPool, policy: WebhookPolicy) -> anyhow::Result<Self> {
        Self::with_resolver(pool, policy, Arc::new(SystemResolver))
    }

    /// A dispatcher that looks host names up with `resolver` (tests answer
    /// names themselves); every answer is checked before it is connected to.
    pub fn with_resolver(
        pool: PgPool,
        policy: WebhookPolicy,
        resolver: Arc<dyn Resolve>,
    ) -> anyhow::Result<Self> {
        let resolver = GuardedResolver::new(resolver, policy.allowed_hosts.clone());
        let client = reqwest::Client::builder()
            .timeout(policy.timeout)
            // A receiver must not bounce us to somewhere else.
            .redirect(reqwest::redirect::Policy::none())
            // A proxy would be resolved instead of the receiver, unchecked.
            .no_proxy()
            .dns_resolver(Arc::new(resolver))
            .build()
            .context("building the webhook client")?;
        Ok(Self {
            pool,
            client,
            policy,
        })
    }

    pub async fn run(self, shutdown: CancellationToken) {
        let this = Arc::new(self);
        let slots = Arc::new(Semaphore::new(this.policy.concurrency.max(1)));
        loop {
            let free = slots.available_permits();
            let claimed = if free > 0 {
                this.claim(free).await
            } else {
                Ok(Vec::new())
            };
            match claimed {
                Ok(due) => {
                    for delivery in due {
                        let Ok(permit) = slots.clone().acquire_owned().await else {
                            return;
                        };
                        let this = this.clone();
                        tokio::spawn(async move {
                            this.attempt(delivery).await;
                            drop(permit);
                        });
                    }
                }
                Err(error) => {
                    tracing::warn!(error.message = %format!("{error:#}"), "could not read due webhooks")
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
        // Let attempts in flight finish and record themselves.
        let _ = slots
            .acquire_many(u32::try_from(this.policy.concurrency.max(1)).unwrap_or(1))
            .await;
    }

    /// Take up to `limit` due deliveries, leasing them for longer than one
    /// attempt can take so no other dispatcher sends them meanwhile.
    async fn claim(&self, limit: usize) -> anyhow::Result<Vec<Due>> {
        let lease = self.policy.timeout + Duration::from_secs(30);
        let due = sqlx::query_as!(
            Due,
            "UPDATE webhook_deliveries SET next_attempt_at = now() + make_interval(secs => $2)
             WHERE id IN (SELECT id FROM webhook_deliveries
                          WHERE state = 'pending' AND next_attempt_at <= now()
                          ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED)
             RETURNING id, event_id, url, body, attempts",
            i64::try_from(limit).unwrap_or(i64::MAX),
            lease.as_secs_f64(),
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(due)
    }

    async fn send(&self, url: url::Url, delivery: &Due) -> reqwest::Result<reqwest::Response> {
        let timestamp = chrono::Utc::now().timestamp();
        self.client
            .post(url)
            .header("content-type", "application/json")
            .header(
                SIGNATURE_HEADER,
                sign(&self.policy.secret.0, timestamp, &delivery.body),
            )
            .header("Orderflow-Event-Id", delivery.event_id.to_string())
            .body(delivery.body.clone())
            .send()
            .await
    }

    async fn attempt(&self, delivery: Due) {
        let attempt = u32::try_from(delivery.attempts).unwrap_or(0) + 1;
        let started = std::time::Instant::now();
        // IP literals are checked here (reqwest connects to them without
        // asking the resolver); host names by the resolver, at connect time.
        let (status, error, refused) =
            match egress::check_url(&delivery.url, &self.policy.allowed_hosts) {
                Err(refusal) => (None, Some(refusal.to_string()), true),
                Ok(url) => match self.send(url, &delivery).await {
                    Ok(response) if response.status().is_success() => {
                        (Some(response.status().as_u16()), None, false)
                    }
                    Ok(response) => (
                        Some(response.status().as_u16()),
                        Some(format!("answered {}", response.status())),
                        false,
                    ),
                    Err(error) => match egress::refusal_in(&error) {
                        Some(refusal) => (None, Some(refusal.to_string()), true),
                        None if error.is_timeout() => (
                            None,
                            Some(format!("no answer within {:?}", self.policy.timeout)),
                            false,
                        ),
                        None => (None, Some(describe(error)), false),
                    },
                },
            };
        let latency_ms = i32::try_from(started.elapsed().as_millis()).unwrap_or(i32::MAX);
        let outcome = match (&error, refused, attempt >= self.policy.max_attempts) {
            (None, _, _) => Outcome::Delivered,
            (Some(_), true, _) => Outcome::Refused,
            (Some(_), false, true) => Outcome::Dead,
            (Some(_), false, false) => Outcome::Retry(backoff(&self.policy, attempt)),
        };
        if let Err(error) = self
            .record(
                &delivery,
                attempt,
                status,
                latency_ms,
                error.as_deref(),
                &outcome,
            )
            .await
        {
            // The lease runs out and the delivery is tried again.
            tracing::warn!(error.message = %format!("{error:#}"), "could not record a webhook attempt");
            return;
        }
        let url = messaging::privacy::url(&delivery.url);
        match outcome {
            Outcome::Delivered => tracing::info!(
                event_id = %delivery.event_id, %url, attempt, latency_ms,
                "webhook delivered"
            ),
            Outcome::Retry(wait) => tracing::warn!(
                event_id = %delivery.event_id, %url, attempt, latency_ms,
                error = error.as_deref().unwrap_or_default(),
                "webhook failed; retrying in {wait:?}"
            ),
            Outcome::Dead => tracing::error!(
                event_id = %delivery.event_id, %url, attempt,
                error = error.as_deref().unwrap_or_default(),
                "webhook failed on its last attempt; delivery dead-lettered"
            ),
            Outcome::Refused => tracing::warn!(
                event_id = %delivery.event_id, %url, attempt,
                reason = error.as_deref().unwrap_or_default(),
                "webhook refused; not sent and not retried"
            ),
        }
    }

    async fn record(
        &self,
        delivery: &Due,
        attempt: u32,
        status: Option<u16>,
        latency_ms: i32,
        error: Option<&str>,
        outcome: &Outcome,
    ) -> anyhow::Result<()> {
        let (state, wait) = match outcome {
            Outcome::Delivered => ("delivered", Duration::ZERO),
            Outcome::Retry(wait) => ("pending", *wait),
            Outcome::Dead => ("dead", Duration::ZERO),
            Outcome::Refused => ("refused", Duration::ZERO),
        };
        sqlx::query!(
            "WITH attempt AS (
                 INSERT INTO webhook_attempts (delivery_id, attempt, status_code, latency_ms, error)
                 VALUES ($1, $2, $3, $4, $5))
             UPDATE webhook_deliveries
             SET attempts = $2, state = $6, last_error = $5,
                 next_attempt_at = now() + make_interval(secs => $7),
                 finished_at = CASE WHEN $6 = 'pending' THEN NULL ELSE now() END
             WHERE id = $1",
            delivery.id,
            i32::try_from(attempt).unwrap_or(i32::MAX),
            status.map(i32::from),
            latency_ms,
            error,
            state,
            wait.as_secs_f64(),
        )
        .execute(&self.pool)
        .await
        .context("recording the webhook attempt")?;
        Ok(())
    }
}

enum Outcome {
    Delivered,
    Retry(Duration),
    Dead,
    /// Not sent: the URL reaches inside. Terminal.
    Refused,
}

/// A send error with its causes, without its URL (whose path or query may
/// carry the receiver's token).
fn describe(error: reqwest::Error) -> String {
    let error = error.without_url();
    let mut text = error.to_string();
    let mut cause = std::error::Error::source(&error);
    while let Some(error) = cause {
        text.push_str(": ");
        text.push_str(&error.to_string());
        cause = error.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_with_its_secret_only() {
        let header = sign("s3cret", 1_700_000_000, b"{\"a\":1}");
        assert!(verify("s3cret", &header, b"{\"a\":1}"));
        assert!(!verify("wrong", &header, b"{\"a\":1}"));
        assert!(!verify("s3cret", &header, b"{\"a\":2}"));
        assert!(!verify("s3cret", "t=1,v1=zz", b"{}"));
    }

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let policy = WebhookPolicy {
            secret: Secret(String::new()),
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            concurrency: 1,
            allowed_hosts: AllowList::default(),
        };
        for _ in 0..100 {
            let first = backoff(&policy, 1);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
            let late = backoff(&policy, 9);
            assert!(late >= Duration::from_millis(500) && late <= Duration::from_secs(1));
        }
    }
}
