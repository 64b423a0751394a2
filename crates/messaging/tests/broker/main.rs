//! The topology against the real broker (3.10 or 4.x, whichever
//! `TEST_AMQP_URL` names): policies in force, exact retry delays, and an
//! upgrade from the queues the previous release declared.

mod batches;
mod failover;
mod policies;
mod stalled;
mod upgrade;
