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
        let mut answers = self
            .call_all(&[Call {
                operation,
                charge: *charge,
                idempotency_key,
            }])
            .await?;
        answers.pop().expect("one answer per call")
    }

    /// Make several calls at once: one round trip to the provider's books
    /// (the `provider_call_all` function), as one request to a provider's
    /// batch endpoint, in which each call stands on its own (idempotent by
    /// its key, failing on request by itself). One answer per call, in their
    /// order; `Err` when the provider's books could not be reached, for
    /// none of the calls got an answer.
    pub async fn call_all(
        &self,
        calls: &[Call<'_>],
    ) -> Result<Vec<Result<Answer, ProviderError>>, ProviderError> {
        if calls.is_empty() {
            return Ok(Vec::new());
        }
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        let injected: Vec<Option<Injected>> = calls
            .iter()
            .map(|call| {
                self.demo_failures
                    .then(|| injected(call.charge.customer_id, call.operation))
                    .flatten()
            })
            .collect();
        let fail_up_to: Vec<i32> = injected
            .iter()
            .map(|injected| match injected {
                Some(Injected::FailUpTo(n)) => i32::try_from(*n).unwrap_or(i32::MAX),
                _ => 0,
            })
            .collect();
        let answered: Vec<(i32, i32, Option<String>)> = sqlx::query_as(
            "SELECT n, calls, outcome FROM provider_call_all($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(calls.iter().map(|c| c.idempotency_key).collect::<Vec<_>>())
        .bind(
            calls
                .iter()
                .map(|c| c.operation.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(calls.iter().map(|c| c.charge.reference).collect::<Vec<_>>())
        .bind(
            calls
                .iter()
                .map(|c| c.charge.amount_cents)
                .collect::<Vec<_>>(),
        )
        .bind(calls.iter().map(|c| c.charge.currency).collect::<Vec<_>>())
        .bind(self.decline_over_cents)
        .bind(&fail_up_to)
        .fetch_all(&self.pool)
        .await?;
        let mut answers: Vec<Option<Result<Answer, ProviderError>>> =
            calls.iter().map(|_| None).collect();
        for (position, calls_so_far, outcome) in answered {
            let index = usize::try_from(position - 1).expect("positions count from 1");
            let operation = calls[index].operation;
            let calls_so_far = u32::try_from(calls_so_far).unwrap_or(u32::MAX);
            answers[index] = Some(match outcome {
                None => Err(ProviderError::Unavailable(operation)),
                Some(_) if matches!(injected[index], Some(Injected::TimeOutUpTo(n)) if calls_so_far <= n) => {
                    Err(ProviderError::TimedOut(operation))
                }
                Some(outcome) => Ok(Answer::from_outcome(&outcome)),
            });
        }
        Ok(answers
            .into_iter()
            .map(|answer| answer.expect("the provider answers every call"))
            .collect())
    }
}

/// One call to the provider.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    pub operation: Operation,
    pub charge: Charge<'a>,
    pub idempotency_key: &'a str,
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
