//! order-processor: one of many competing consumers of the orders work
//! queue. Each order is decided exactly once (dedupe by message id in the
//! same transaction as the stock reservation) and its outcome is announced
//! on the order-events fanout exchange through the outbox.

pub mod configuration;
pub mod consumer;
pub mod handler;
pub mod held;
pub mod payment;
pub mod startup;
pub mod state;
pub mod sweeper;
