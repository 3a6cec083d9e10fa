//! An instance's life: the signup (`signup`, idempotent) and its claim of
//! a warm container (`claim`, in batches by `warm`, the container chosen
//! by `pick`), the claim's retry when a node stays silent (`retry`), the
//! signup queue, live reconfiguration, release and the destruction after
//! the grace period, and the suspension of an instance (`suspension`)
//! whose owner left the address unproven (`verification`) or deleted the
//! account (`deletion`). Domain logic only: no HTTP or gRPC types.

pub mod claim;
pub mod complete;
pub mod deletion;
pub mod idempotency;
pub mod instances;
pub mod pick;
pub mod queue;
pub mod reconfigure;
pub mod release;
pub mod retry;
pub mod signup;
pub mod suspension;
pub mod verification;
pub mod warm;
