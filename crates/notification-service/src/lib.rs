//! notification-service: owns a durable queue on the order-events fanout
//! exchange and sends one confirmation email per event, however often the
//! event is delivered.

pub mod configuration;
pub mod egress;
pub mod handler;
pub mod startup;
pub mod webhooks;
