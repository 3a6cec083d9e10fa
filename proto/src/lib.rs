//! Generated gRPC contracts shared by the scheduler, node agents and edges.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("clawdeploy.v1");
}

pub use v1::*;
