//! HTTP idempotency keys with Stripe's semantics: the first response is
//! stored in the same transaction as the order and replayed for the same key
//! and body; a different body is refused; a key whose first request is still
//! running gets 409.

mod key;
mod persistence;

pub use key::IdempotencyKey;
pub use persistence::{Claim, NextAction, SavedResponse, claim_all, delete_expired, request_hash};
