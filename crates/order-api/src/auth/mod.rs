//! API keys. A client sends `Authorization: Bearer <key>`. Keys carry 244
//! random bits from the OS, shown once when made and stored only as their
//! SHA-256 (a fast hash is enough for keys this long: there is nothing to
//! guess). Each key belongs to a client, by name, and has a scope: a
//! `client` sees only its own orders and idempotency keys, an `admin` sees
//! everything. A revoked key fails on its next request: every request
//! looks its key up (the requests that arrive together in one statement).
//!
//! [`caller`] is who a key stands for; [`keys`] makes, lists and revokes
//! keys (for the `api-keys` command); [`lookup`] finds a request's key;
//! [`rate_limit`] counts each key's requests; [`middleware`] puts them
//! together in front of the keyed routes.

mod caller;
mod keys;
mod lookup;
mod middleware;
mod rate_limit;

pub use caller::{Caller, Scope};
pub use keys::{KeyInfo, MIN_KEY_LEN, NewKey, check_client_name, create_key, list, revoke};
pub use lookup::{KeyLookup, caller_of};
pub use middleware::{AuthState, authenticate};
pub use rate_limit::RateLimits;
