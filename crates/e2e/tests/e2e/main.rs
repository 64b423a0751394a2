//! End-to-end tests of the whole system, and of the compose file that runs it.

mod compose;
mod flow;
mod processes;
