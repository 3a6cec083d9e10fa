//! What the three binaries (scheduler, agent, edge) each need once: tracing
//! set-up, the shutdown signal, the Prometheus exporter with every metric
//! described, one backoff, private atomic file writes, the flags that
//! name the scheduler to its clients, flag value parsers, and the secret
//! box that seals secrets at rest.

pub mod backoff;
pub mod endpoint;
pub mod flags;
pub mod fs;
pub mod metrics;
pub mod model_limits;
pub mod proxy_token;
pub mod sealed;
pub mod shutdown;
pub mod telemetry;

pub use backoff::Backoff;
