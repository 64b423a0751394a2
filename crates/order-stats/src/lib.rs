//! order-stats: reads the order-events stream (a log that keeps every
//! event, unlike a queue) from its own stored offset, and keeps a read
//! model of orders, units and revenue per minute, served over HTTP. The
//! offset moves in the same transaction as the counts, so a crash never
//! counts an event twice or skips one; started with an empty read model (or
//! `--from first`) it rebuilds the same numbers from the beginning of the
//! log.

pub mod api;
pub mod configuration;
pub mod log;
pub mod model;
pub mod startup;
