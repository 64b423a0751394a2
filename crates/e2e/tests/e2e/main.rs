//! End-to-end tests of the whole system, and of the compose file that runs it.

mod browser;
mod chaos;
mod compose;
mod docs;
mod flow;
mod jobs;
mod privacy;
mod processes;
mod servers;
