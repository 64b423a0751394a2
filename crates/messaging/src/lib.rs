//! The one crate every orderflow service shares: the message contracts that
//! travel over RabbitMQ, the topology (every exchange and queue name), the
//! AMQP connection and confirmed publisher, the generic consumer loop, and
//! the telemetry and shutdown plumbing. No business rules and no database.

pub mod amqp;
pub mod consumer;
pub mod contracts;
pub mod declaration;
pub mod management;
pub mod privacy;
pub mod shutdown;
pub mod telemetry;
pub mod topology;

pub use amqp::{AmqpSettings, Broker, Publisher};
pub use management::Management;
pub use topology::Topology;
