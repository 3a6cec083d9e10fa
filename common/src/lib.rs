//! What the three binaries (scheduler, agent, edge) each need once: tracing
//! set-up, the shutdown signal, the Prometheus exporter with every metric
//! described, one backoff, private atomic file writes, the flags that
//! name the scheduler to its clients, and flag value parsers.

pub mod backoff;
pub mod endpoint;
pub mod flags;
pub mod fs;
pub mod metrics;
pub mod shutdown;
pub mod telemetry;

pub use backoff::Backoff;
