//! An instance's life: the claim of a warm container at signup (with its
//! retry when a node stays silent), live reconfiguration, release and the
//! destruction after the grace period, and idempotent signups. Domain logic
//! only: no HTTP or gRPC types.

pub mod claim;
pub mod complete;
pub mod idempotency;
pub mod instances;
pub mod queue;
pub mod reconfigure;
pub mod release;
pub mod warm;
