//! Faults injected for real into the whole system, one file per kind; one
//! test binary, so that their waits overlap.
//!
//! - `database`: PostgreSQL restarted under a burst, and gone for 30 s.
//! - `network`: an agent's path silenced or made lossy and slow, the edge
//!   cut off from the scheduler.
//! - `disk`: a node's state disk filled to the last byte.
//! - `clock`: agents minutes ahead of and behind the scheduler.

mod clock;
mod database;
mod disk;
mod network;
