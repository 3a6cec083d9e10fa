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
    /// A container's HTTP/1.1 answer the edge could not take as one.
    #[error("the container's answer: {0}")]
    Upstream(&'static str),
    /// A kept-alive connection the container had closed before answering
    /// (the request may go again on another).
    #[error("the container had closed the connection")]
    UpstreamClosed,
}

impl Error {
    /// An I/O failure with what was being done.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
