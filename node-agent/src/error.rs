//! The agent's one error type. Its gRPC peer is the scheduler, which learns
//! about failures through container phases and messages, so there is no
//! mapping to `tonic::Status` here.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The engine answered with an error (`status` is its HTTP status:
    /// 404 no such container, 304 already stopped, 409 conflict).
    #[error("docker {op}: {message}")]
    Docker {
        op: &'static str,
        status: Option<u16>,
        message: String,
    },
    /// The engine did not answer (down, restarting, timed out): says
    /// nothing about the container itself.
    #[error("docker unavailable ({op}): {message}")]
    DockerUnavailable { op: &'static str, message: String },
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// Exporting or importing a state volume (tar, chown) failed.
    #[error("state archive ({op}): {message}")]
    Archive { op: &'static str, message: String },
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

    /// The engine's HTTP status, when it answered with an error.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Docker { status, .. } => *status,
            _ => None,
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
