//! A stand-in for a card payment provider: another company's service that
//! orderflow reaches over HTTP. It keeps its books in its own database,
//! answers each request once (idempotent by the caller's key), declines
//! deterministically, refuses what a provider refuses, and fails or
//! answers slowly on request, so orderflow's handling of a remote provider
//! can be watched and tested.

pub mod api;
pub mod books;
pub mod configuration;
pub mod faults;
pub mod startup;
