//! order-api: takes orders over HTTP and hands them to the processors.
//! An accepted order is durable before the client hears `202`: the order,
//! its idempotency key and its outbox message are one Postgres transaction.
//!
//! From the top: [`startup`] builds the app, [`router`] its routes and
//! their document ([`openapi`]), over the [`state`] the handlers in
//! [`routes`] take their parts of; below them the key check ([`auth`]),
//! the order intake ([`intake`]) and what announces its orders
//! ([`announcer`]), the live feed ([`live`]) and the re-publisher.

pub mod announcer;
pub mod auth;
pub mod batch;
pub mod configuration;
pub mod correlation;
pub mod domain;
pub mod error;
pub mod idempotency;
pub mod intake;
pub mod keys_cli;
pub mod live;
pub mod openapi;
pub mod republish;
pub mod router;
pub mod routes;
pub mod startup;
pub mod state;
