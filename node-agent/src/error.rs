//! The agent's one error type. Its gRPC peer is the scheduler, which learns
//! about failures through container phases and messages, so there is no
//! mapping to `tonic::Status` here.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("docker {op}: {message}")]
    Docker { op: &'static str, message: String },
    /// The engine did not answer (down, restarting, timed out): says
    /// nothing about the container itself.
    #[error("docker unavailable ({op}): {message}")]
    DockerUnavailable { op: &'static str, message: String },
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("probe: {0}")]
    Probe(String),
    #[error("tls: {0}")]
    Tls(String),
    #[error("rpc: {0}")]
    Rpc(#[from] tonic::Status),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("firewall: {0}")]
    Firewall(String),
    #[error("ledger: {0}")]
    Ledger(String),
}

impl Error {
    pub fn docker_unavailable(&self) -> bool {
        matches!(self, Error::DockerUnavailable { .. })
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
