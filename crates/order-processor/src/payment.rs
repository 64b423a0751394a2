//! A stand-in payment provider that behaves like a real one where it
//! matters. It offers the three calls real providers offer (authorise an
//! amount, capture it, void it), keeps books of its own (the `provider_*`
//! tables, which nothing else writes), and makes every call idempotent by
//! the key the caller gives: a call sent again with the same key does
//! nothing and gets the first answer. It declines deterministically (amounts
//! over a limit), refuses what a provider refuses (capturing a voided
//! authorisation, a second capture under another key), and, with demo
//! failures on, fails on request so tests can break the flow anywhere:
//!
//! | customer id | what the provider does |
//! |---|---|
//! | `flaky-N` / `flaky-<step>-N` | the first N calls of `authorise` / `<step>` fail, doing nothing |
//! | `doomed` / `doomed-<step>` | every call of `authorise` / `<step>` fails, doing nothing |
//! | `timeout-<step>-N` | the first N calls of `<step>` do the work, then time out |
//!
//! where `<step>` is `authorise`, `capture` or `void`, and calls are
//! counted per idempotency key by the provider.

use std::{fmt, time::Duration};

use sqlx::PgPool;
use uuid::Uuid;

/// One of the provider's calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Authorise,
    Capture,
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

    /// The idempotency key orderflow gives the provider for this step of
    /// the payment of `order_id`: the same for every try of the step.
    pub fn key(self, order_id: Uuid) -> String {
        format!("{order_id}:{}", self.as_str())
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a call asks about: the merchant's reference (the order id), whose
/// money, how much.
#[derive(Debug, Clone, Copy)]
pub struct Charge<'a> {
    pub reference: Uuid,
    pub customer_id: &'a str,
    pub amount_cents: i64,
    pub currency: &'a str,
}

/// The provider's answer to a call that reached it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Authorised,
    Declined,
    Captured,
    Voided,
    /// The call can never succeed (capture of a voided authorisation, say).
    Refused(String),
}

impl Answer {
    fn outcome(&self) -> String {
        match self {
            Answer::Authorised => "authorised".into(),
            Answer::Declined => "declined".into(),
            Answer::Captured => "captured".into(),
            Answer::Voided => "voided".into(),
            Answer::Refused(why) => format!("refused: {why}"),
        }
    }

    fn from_outcome(outcome: &str) -> Self {
        match outcome {
            "authorised" => Answer::Authorised,
            "declined" => Answer::Declined,
            "captured" => Answer::Captured,
            "voided" => Answer::Voided,
            other => Answer::Refused(other.strip_prefix("refused: ").unwrap_or(other).into()),
        }
    }
}

/// A call that got no answer: worth trying again with the same key.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// Nothing was done.
    #[error("payment provider unavailable for {0} (injected failure)")]
    Unavailable(Operation),
    /// The provider did the work, but the answer never came back.
    #[error("payment provider timed out on {0} (injected, after doing it)")]
    TimedOut(Operation),
    /// The provider's own books could not be reached.
    #[error("payment provider unreachable: {0}")]
    Down(#[from] sqlx::Error),
}

/// A failure the demo customers ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Injected {
    /// Calls up to this count fail without doing anything.
    FailUpTo(u32),
    /// Calls up to this count do the work, then time out.
    TimeOutUpTo(u32),
}

/// The simulated provider.
#[derive(Debug, Clone)]
pub struct PaymentProvider {
    pool: PgPool,
    latency: Duration,
    decline_over_cents: i64,
    demo_failures: bool,
}

impl PaymentProvider {
    /// A provider keeping its books in `pool`'s database; each call takes
    /// `latency`; authorisations above `decline_over_cents` are declined.
    pub fn new(pool: PgPool, latency: Duration, decline_over_cents: i64) -> Self {
        Self {
            pool,
            latency,
            decline_over_cents,
            demo_failures: false,
        }
    }

    /// Honour the failure-injecting customer ids (see the module's table).
    pub fn with_demo_failures(mut self, on: bool) -> Self {
        self.demo_failures = on;
        self
    }

    /// Make `operation` for `charge` under `idempotency_key`.
    pub async fn call(
        &self,
        operation: Operation,
        charge: &Charge<'_>,
        idempotency_key: &str,
    ) -> Result<Answer, ProviderError> {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        let injected = self
            .demo_failures
            .then(|| injected(charge.customer_id, operation))
            .flatten();
        let mut tx = self.pool.begin().await?;
        // Counting the call locks the key's row: calls with one key are
        // answered one at a time.
        let (calls, stored): (i32, Option<String>) = sqlx::query_as(
            "WITH counted AS (
                 INSERT INTO provider_calls (idempotency_key, calls) VALUES ($1, 1)
                 ON CONFLICT (idempotency_key) DO UPDATE SET calls = provider_calls.calls + 1
                 RETURNING calls)
             SELECT calls, (SELECT CASE WHEN operation = $2 AND reference = $3 THEN outcome
                                        ELSE 'refused: idempotency key reused for another request' END
                            FROM provider_ledger WHERE idempotency_key = $1)
             FROM counted",
        )
        .bind(idempotency_key)
        .bind(operation.as_str())
        .bind(charge.reference)
        .fetch_one(&mut *tx)
        .await?;
        let calls = u32::try_from(calls).unwrap_or(u32::MAX);
        if matches!(injected, Some(Injected::FailUpTo(n)) if calls <= n) {
            tx.commit().await?;
            return Err(ProviderError::Unavailable(operation));
        }
        let answer = match stored {
            Some(outcome) => Answer::from_outcome(&outcome),
            None => {
                let (answer, amount) = self.apply(&mut tx, operation, charge).await?;
                sqlx::query(
                    "INSERT INTO provider_ledger (idempotency_key, operation, reference, amount_cents, outcome)
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(idempotency_key)
                .bind(operation.as_str())
                .bind(charge.reference)
                .bind(amount)
                .bind(answer.outcome())
                .execute(&mut *tx)
                .await?;
                answer
            }
        };
        tx.commit().await?;
        if matches!(injected, Some(Injected::TimeOutUpTo(n)) if calls <= n) {
            return Err(ProviderError::TimedOut(operation));
        }
        Ok(answer)
    }

    /// Do what the call asks on the provider's books; returns the answer
    /// and the amount it moved.
    async fn apply(
        &self,
        tx: &mut sqlx::PgConnection,
        operation: Operation,
        charge: &Charge<'_>,
    ) -> sqlx::Result<(Answer, i64)> {
        let moved: Option<(String, i64)> = match operation {
            // One authorisation per reference: a second one, under another
            // key, is refused below.
            Operation::Authorise => sqlx::query_as(
                "INSERT INTO provider_authorisations (reference, amount_cents, currency, state)
                 VALUES ($1, $2, $3, CASE WHEN $2 > $4 THEN 'declined' ELSE 'authorised' END)
                 ON CONFLICT (reference) DO NOTHING
                 RETURNING state, amount_cents",
            )
            .bind(charge.reference)
            .bind(charge.amount_cents)
            .bind(charge.currency)
            .bind(self.decline_over_cents)
            .fetch_optional(&mut *tx)
            .await?
            .map(|(state, amount): (String, i64)| {
                let amount = if state == "authorised" { amount } else { 0 };
                (state, amount)
            }),
            Operation::Capture => {
                sqlx::query_as(
                    "UPDATE provider_authorisations SET state = 'captured', updated_at = now()
                 WHERE reference = $1 AND state = 'authorised'
                 RETURNING state, amount_cents",
                )
                .bind(charge.reference)
                .fetch_optional(&mut *tx)
                .await?
            }
            // Voiding what was never authorised leaves a voided record, so
            // that an authorisation arriving late is refused, not left open.
            Operation::Void => {
                sqlx::query_as(
                    "WITH voided AS (
                     UPDATE provider_authorisations SET state = 'voided', updated_at = now()
                     WHERE reference = $1 AND state = 'authorised'
                     RETURNING amount_cents),
                 tombstone AS (
                     INSERT INTO provider_authorisations (reference, amount_cents, currency, state)
                     SELECT $1, 0, $2, 'voided'
                     WHERE NOT EXISTS (SELECT 1 FROM provider_authorisations WHERE reference = $1)
                     ON CONFLICT (reference) DO NOTHING
                     RETURNING amount_cents)
                 SELECT 'voided'::text, amount_cents FROM voided
                 UNION ALL SELECT 'voided'::text, amount_cents FROM tombstone",
                )
                .bind(charge.reference)
                .bind(charge.currency)
                .fetch_optional(&mut *tx)
                .await?
            }
        };
        if let Some((state, amount)) = moved {
            return Ok((Answer::from_outcome(&state), amount));
        }
        let state: String =
            sqlx::query_scalar("SELECT state FROM provider_authorisations WHERE reference = $1")
                .bind(charge.reference)
                .fetch_optional(&mut *tx)
                .await?
                .unwrap_or_else(|| "missing".into());
        Ok((Answer::Refused(format!("the authorisation is {state}")), 0))
    }
}

/// The failure a demo customer id asks for on `operation`, if any.
fn injected(customer_id: &str, operation: Operation) -> Option<Injected> {
    let step = operation.as_str();
    let calls = |rest: &str| rest.parse::<u32>().ok();
    match customer_id.split_once('-') {
        None if customer_id == "doomed" => {
            (operation == Operation::Authorise).then_some(Injected::FailUpTo(u32::MAX))
        }
        Some(("doomed", rest)) if rest == step => Some(Injected::FailUpTo(u32::MAX)),
        Some(("flaky", rest)) => match rest.split_once('-') {
            Some((named, n)) if named == step => calls(n).map(Injected::FailUpTo),
            Some(_) => None,
            None => (operation == Operation::Authorise)
                .then(|| calls(rest).map(Injected::FailUpTo))
                .flatten(),
        },
        Some(("timeout", rest)) => match rest.split_once('-') {
            Some((named, n)) if named == step => calls(n).map(Injected::TimeOutUpTo),
            Some(_) => None,
            None => (rest == step).then_some(Injected::TimeOutUpTo(1)),
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_customer_ids_name_the_step_and_the_calls_that_fail() {
        use Injected::*;
        use Operation::*;
        assert_eq!(injected("doomed", Authorise), Some(FailUpTo(u32::MAX)));
        assert_eq!(injected("doomed", Capture), None);
        assert_eq!(injected("flaky-2", Authorise), Some(FailUpTo(2)));
        assert_eq!(injected("flaky-2", Void), None);
        assert_eq!(
            injected("doomed-capture", Capture),
            Some(FailUpTo(u32::MAX))
        );
        assert_eq!(injected("doomed-capture", Authorise), None);
        assert_eq!(injected("flaky-void-3", Void), Some(FailUpTo(3)));
        assert_eq!(injected("timeout-capture-2", Capture), Some(TimeOutUpTo(2)));
        assert_eq!(
            injected("timeout-authorise", Authorise),
            Some(TimeOutUpTo(1))
        );
        assert_eq!(injected("timeout-authorise", Capture), None);
        assert_eq!(injected("c-7", Authorise), None);
        assert_eq!(injected("flaky-x", Authorise), None);
    }
}
