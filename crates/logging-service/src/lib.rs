//! logging-service: owns a durable queue on the order-events fanout
//! exchange and keeps the audit trail: one record per event, however often
//! the event is delivered.

pub mod configuration;
pub mod handler;
pub mod startup;
