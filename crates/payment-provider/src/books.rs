//! The provider's books, and how one request changes them: in one
//! transaction, idempotent by the request's key.
//!
//! A request is answered once. Its key is locked for the transaction (a
//! second request with the key while the first is at work is told so, not
//! queued), then looked up in the ledger (and the authorisation it is about
//! locked in turn, so requests on one authorisation take turns): a key seen before gets the first
//! answer again, or a refusal if it now comes with another request. A new
//! key does the work on the authorisation and records the answer in the
//! ledger in the same commit, so no answer is ever given for work that was
//! not kept.

use std::fmt;

use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::faults::Fault;

/// The provider's migrations, in its own database.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Hold an amount on the card, to be captured or voided later.
    Authorise,
    /// Take the held amount.
    Capture,
    /// Release the hold.
    Void,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Authorise => "authorise",
            Operation::Capture => "capture",
            Operation::Void => "void",
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One request: an operation on the authorisation of `reference` (and, to
/// authorise, the amount).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub operation: Operation,
    pub reference: Uuid,
    pub amount_cents: i64,
    pub currency: String,
}

impl Request {
    /// What the ledger keeps of the request, to tell a retry (the same
    /// request) from the key reused for another one.
    fn fingerprint(&self) -> String {
        format!(
            "{} {} {} {}",
            self.operation, self.reference, self.amount_cents, self.currency
        )
    }
}

/// What became of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// Answered: `authorised`, `declined`, `captured`, `voided`, or
    /// `refused: <why>`; `replayed` when the key had been answered before.
    Answered {
        outcome: String,
        amount_cents: i64,
        replayed: bool,
    },
    /// Another request with this key is at work now.
    KeyInUse,
    /// The key was used before for another request.
    KeyReused,
    /// A failure the customer asked for: nothing was done.
    Failed,
}

/// The books in Postgres.
#[derive(Clone)]
pub struct Books {
    pub pool: PgPool,
    /// Authorisations above this are declined.
    pub decline_over_cents: i64,
}

impl Books {
    /// Make `request` under `key`. A `fault` the customer asked for is
    /// counted against the key; `Ok((recorded, calls))` where `calls` is
    /// how often the key was sent (counted only with a fault).
    pub async fn make(
        &self,
        key: &str,
        request: &Request,
        fault: Option<Fault>,
    ) -> sqlx::Result<(Recorded, u32)> {
        let mut tx = self.pool.begin().await?;
        let free = sqlx::query_scalar!(
            r#"SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0)) AS "free!""#,
            key
        )
        .fetch_one(&mut *tx)
        .await?;
        if !free {
            return Ok((Recorded::KeyInUse, 0));
        }
        let calls = match fault {
            Some(_) => count_call(&mut tx, key).await?,
            None => 0,
        };
        if matches!(fault, Some(fault @ Fault::FailUpTo(_)) if fault.applies(calls)) {
            tx.commit().await?;
            return Ok((Recorded::Failed, calls));
        }
        let seen = sqlx::query!(
            "SELECT request, amount_cents, outcome FROM provider_ledger WHERE idempotency_key = $1",
            key
        )
        .fetch_optional(&mut *tx)
        .await?;
        let recorded = match seen {
            Some(seen) if seen.request != request.fingerprint() => Recorded::KeyReused,
            Some(seen) => Recorded::Answered {
                outcome: seen.outcome,
                amount_cents: seen.amount_cents,
                replayed: true,
            },
            None => {
                let (outcome, amount_cents) = self.work(&mut tx, request).await?;
                sqlx::query!(
                    "INSERT INTO provider_ledger
                         (idempotency_key, operation, reference, request, amount_cents, outcome)
                     VALUES ($1, $2, $3, $4, $5, $6)",
                    key,
                    request.operation.as_str(),
                    request.reference,
                    request.fingerprint(),
                    amount_cents,
                    &outcome,
                )
                .execute(&mut *tx)
                .await?;
                Recorded::Answered {
                    outcome,
                    amount_cents,
                    replayed: false,
                }
            }
        };
        tx.commit().await?;
        Ok((recorded, calls))
    }

    /// Do what `request` asks to the authorisation; its outcome and the
    /// amount it moved.
    async fn work(&self, tx: &mut PgConnection, request: &Request) -> sqlx::Result<(String, i64)> {
        // Requests on one authorisation (under different keys: an
        // authorise racing a void) take turns, so each statement below
        // sees what the one before it committed. Without it a void could
        // miss an authorisation not yet committed, find it authorised a
        // statement later, and record a refusal for good: a hold never
        // released. The key's lock is only ever tried, so waiting here
        // cannot deadlock.
        sqlx::query!(
            "SELECT pg_advisory_xact_lock(hashtextextended($1::uuid::text, 1))",
            request.reference
        )
        .fetch_one(&mut *tx)
        .await?;
        let done: Option<(String, i64)> = match request.operation {
            // One authorisation per reference: another one, under another
            // key, is refused below.
            Operation::Authorise => {
                sqlx::query!(
                    r#"INSERT INTO provider_authorisations (reference, amount_cents, currency, state)
                       VALUES ($1, $2::int8, $3, CASE WHEN $2::int8 > $4 THEN 'declined' ELSE 'authorised' END)
                       ON CONFLICT (reference) DO NOTHING
                       RETURNING state,
                                 CASE WHEN state = 'authorised' THEN amount_cents ELSE 0 END AS "moved!""#,
                    request.reference,
                    request.amount_cents,
                    &request.currency,
                    self.decline_over_cents,
                )
                .fetch_optional(&mut *tx)
                .await?
                .map(|done| (done.state, done.moved))
            }
            Operation::Capture | Operation::Void => {
                let to = match request.operation {
                    Operation::Capture => "captured",
                    _ => "voided",
                };
                // Voiding what was never authorised leaves a voided record,
                // so an authorisation arriving late is refused, not left open.
                sqlx::query!(
                    r#"WITH moved AS (
                         UPDATE provider_authorisations SET state = $2, updated_at = now()
                         WHERE reference = $1 AND state = 'authorised'
                         RETURNING state, amount_cents),
                     placeholder AS (
                         INSERT INTO provider_authorisations (reference, amount_cents, currency, state)
                         SELECT $1, 0, 'XXX', 'voided' WHERE $2 = 'voided' AND NOT EXISTS (SELECT 1 FROM moved)
                         ON CONFLICT (reference) DO NOTHING
                         RETURNING state, amount_cents)
                     SELECT state AS "state!", amount_cents AS "moved!" FROM moved
                     UNION ALL SELECT state, amount_cents FROM placeholder"#,
                    request.reference,
                    to,
                )
                .fetch_optional(&mut *tx)
                .await?
                .map(|done| (done.state, done.moved))
            }
        };
        if let Some(done) = done {
            return Ok(done);
        }
        let state = sqlx::query_scalar!(
            "SELECT state FROM provider_authorisations WHERE reference = $1",
            request.reference
        )
        .fetch_optional(&mut *tx)
        .await?;
        Ok((
            format!(
                "refused: the authorisation is {}",
                state.as_deref().unwrap_or("missing")
            ),
            0,
        ))
    }

    /// The authorisation of `reference`: its state, amount and currency.
    pub async fn read(&self, reference: Uuid) -> sqlx::Result<Option<(String, i64, String)>> {
        let authorisation = sqlx::query!(
            "SELECT state, amount_cents, currency FROM provider_authorisations WHERE reference = $1",
            reference
        )
        .fetch_optional(&self.pool)
        .await?;
        Ok(authorisation.map(|a| (a.state, a.amount_cents, a.currency)))
    }
}

/// Count one more request with `key`; how many there were.
async fn count_call(tx: &mut PgConnection, key: &str) -> sqlx::Result<u32> {
    let calls = sqlx::query_scalar!(
        "INSERT INTO provider_calls AS c (idempotency_key, calls) VALUES ($1, 1)
         ON CONFLICT (idempotency_key) DO UPDATE SET calls = c.calls + 1
         RETURNING c.calls",
        key
    )
    .fetch_one(tx)
    .await?;
    Ok(u32::try_from(calls).unwrap_or(0))
}
