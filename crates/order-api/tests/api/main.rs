//! order-api against the real Postgres and RabbitMQ: one binary, one fresh
//! database and one topology prefix per test.

mod dashboard;
mod errors;
mod helpers;
mod idempotency;
mod live;
mod openapi;
mod orders;
mod republish;
mod security;
mod shutdown;
