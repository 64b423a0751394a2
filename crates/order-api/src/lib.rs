//! order-api: takes orders over HTTP and hands them to the processors.
//! An accepted order is durable before the client hears `202`: the order,
//! its idempotency key and its outbox message are one Postgres transaction.

pub mod auth;
pub mod batch;
pub mod configuration;
pub mod domain;
pub mod error;
pub mod idempotency;
pub mod intake;
pub mod keys_cli;
pub mod live;
pub mod openapi;
pub mod republish;
pub mod routes;
pub mod startup;
