//! What every orderflow service stands on, beside the message contracts:
//! the settings they share, the Postgres pool and migrations, the
//! transactional outbox and its relay, consumer-side dedupe (`first_handled`,
//! a function its migrations define), the health endpoints, the start-up
//! and consume loop of the three worker services, and the subscribers' check
//! for events their queues lost.

pub mod db;
pub mod event_log;
pub mod health;
pub mod http;
pub mod jobs;
pub mod metrics;
pub mod outbox;
pub mod periodic;
pub mod resend;
pub mod settings;
pub mod subscriber;
pub mod wakeup;
pub mod worker;
