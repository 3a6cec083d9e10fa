//! Work no request waits for: the pool manager (one leader across
//! schedulers), housekeeping, and the other schedulers' events.

pub mod backups;
pub mod domains;
pub mod janitor;
pub mod migrations;
pub mod peer_events;
pub mod pool_manager;
pub mod signup_queue;
