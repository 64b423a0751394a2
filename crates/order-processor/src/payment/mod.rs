//! How orderflow takes payment: through a [`PaymentProvider`], another
//! company's service, with the three calls card providers offer (authorise
//! an amount for a manual capture, capture it, void it). Every call carries
//! an idempotency key, one per order and step ([`Operation::key`]), so a call
//! repeated after a timeout, a crash or a redelivery is done once by the
//! provider and gets its first answer.
//!
//! [`http::HttpProvider`] reaches a provider's HTTP API; orderflow's
//! stand-in provider (the `payment-provider` service) speaks it. A real
//! provider is one more implementation of the trait.

pub mod http;

use std::fmt;

use futures_util::future::BoxFuture;
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

/// One call to the provider.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    pub operation: Operation,
    pub charge: Charge<'a>,
    pub idempotency_key: &'a str,
}

/// The provider's answer to a call it did (or had done before, under the
/// same key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Authorised,
    Declined,
    Captured,
    Voided,
    /// The call can never succeed (capture of a voided authorisation, the
    /// key reused for another call): the provider's reason.
    Refused(String),
}

/// A call that got no answer: the provider may or may not have done it, so
/// it is worth making again with the same key.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// No answer within the time orderflow waits; the call may have been
    /// done.
    #[error("payment provider did not answer {0} in time")]
    TimedOut(Operation),
    /// The provider could not be reached, or the connection broke before
    /// an answer came (the call may have been done).
    #[error("payment provider unreachable for {0}: {1}")]
    Unreachable(Operation, String),
    /// The provider answered, but not with an answer to the call: it is
    /// unavailable, still at work on the key, or refuses orderflow itself
    /// (a wrong API key, which no retry of the order fixes, but a
    /// corrected configuration does).
    #[error("payment provider answered {status} to {operation}: {message}")]
    NoAnswer {
        operation: Operation,
        status: u16,
        message: String,
    },
}

/// A payment provider: one call at a time, each by its idempotency key.
pub trait PaymentProvider: Send + Sync {
    /// Make `call`. `Ok` is the provider's answer; `Err` says no answer came
    /// and the call may be made again with the same key.
    fn call<'a>(&'a self, call: Call<'a>) -> BoxFuture<'a, Result<Answer, ProviderError>>;
}

/// Make `calls` concurrently (the provider bounds how many are in flight);
/// one result per call, in their order.
pub async fn call_all(
    provider: &dyn PaymentProvider,
    calls: &[Call<'_>],
) -> Vec<Result<Answer, ProviderError>> {
    futures_util::future::join_all(calls.iter().map(|call| provider.call(*call))).await
}
