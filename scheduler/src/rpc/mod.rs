//! The scheduler's gRPC face over mTLS: the agent session, node enrollment
//! and the edges' route watch. Callers are identified by their client
//! certificate only (`identity`); errors map to `tonic::Status` once
//! (`status`).

pub mod agent;
pub mod enroll;
pub mod identity;
pub mod routes;
pub mod session;
mod status;
