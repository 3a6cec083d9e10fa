//! The edge's one error type: what can stop it from starting or serving.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("certificates: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("configuration: {0}")]
    Config(&'static str),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("metrics exporter: {0}")]
    Metrics(#[from] metrics_exporter_prometheus::BuildError),
    #[error("route watch: {0}")]
    Watch(String),
    #[error("route watch: {0}")]
    Rpc(#[from] tonic::Status),
}

impl Error {
    /// An I/O failure with what was being done.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
