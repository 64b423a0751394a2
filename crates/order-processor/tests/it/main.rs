//! order-processor against the real Postgres and RabbitMQ.

mod batch;
mod consumer;
mod handler;
mod helpers;
mod money;
mod waiting;
