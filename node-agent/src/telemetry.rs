//! Every metric the agent records, described once: the exporter serves
//! these descriptions as `# HELP`, `docs/metrics.md` lists them, and a test
//! checks the code records nothing else.

use clawdeploy_common::metrics::Metric;

/// Histogram buckets (seconds) for the agent's `_seconds` histograms.
pub const BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

pub const CATALOG: &[Metric] = &[
    Metric::histogram(
        "clawdeploy_agent_docker_op_seconds",
        &["op"],
        "Docker API calls by operation.",
    ),
    Metric::counter(
        "clawdeploy_agent_docker_unavailable_total",
        &["op"],
        "Docker calls that failed because the engine did not answer.",
    ),
    Metric::histogram(
        "clawdeploy_agent_config_apply_seconds",
        &[],
        "From a tenant config's arrival to the gateway proving it live.",
    ),
    Metric::counter(
        "clawdeploy_agent_reconcile_errors_total",
        &["step"],
        "Reconcile steps that failed, by step.",
    ),
    Metric::gauge(
        "clawdeploy_agent_containers",
        &["phase"],
        "This node's containers by phase.",
    ),
    Metric::gauge(
        "clawdeploy_agent_desired_generation",
        &[],
        "The desired-state generation the agent holds.",
    ),
    Metric::counter(
        "clawdeploy_agent_stale_generations_total",
        &[],
        "Desired states refused for being older than the ledger's.",
    ),
    Metric::counter(
        "clawdeploy_agent_ledger_write_failures_total",
        &[],
        "Desired states not applied because the ledger could not be written (a full disk).",
    ),
    Metric::counter("clawdeploy_agent_heartbeats_total", &[], "Heartbeats sent."),
    Metric::histogram(
        "clawdeploy_agent_heartbeat_lag_seconds",
        &[],
        "How late each heartbeat left against its schedule.",
    ),
    Metric::counter(
        "clawdeploy_agent_sessions_opened_total",
        &[],
        "Sessions opened with a scheduler.",
    ),
    Metric::gauge(
        "clawdeploy_agent_connected",
        &[],
        "1 while a session with a scheduler is open.",
    ),
    Metric::counter(
        "clawdeploy_agent_cert_renewals_total",
        &[],
        "Node certificates renewed.",
    ),
    Metric::counter(
        "clawdeploy_agent_cert_renewal_failures_total",
        &[],
        "Certificate renewals that failed (retried).",
    ),
    Metric::gauge(
        "clawdeploy_agent_cert_not_after_seconds",
        &[],
        "Expiry of the node certificate (Unix seconds).",
    ),
    Metric::gauge(
        "clawdeploy_agent_host_cpu_busy_ratio",
        &[],
        "The host's CPU busy share over the last sample (0 to 1).",
    ),
    Metric::gauge(
        "clawdeploy_agent_host_memory_available_bytes",
        &[],
        "The host's available memory.",
    ),
    Metric::gauge(
        "clawdeploy_agent_host_disk_available_bytes",
        &[],
        "Free space on the agent's state directory's filesystem.",
    ),
    Metric::counter(
        "clawdeploy_agent_firewall_errors_total",
        &[],
        "Firewall checks or repairs that failed.",
    ),
    Metric::counter(
        "clawdeploy_agent_archive_transfers_total",
        &["direction", "result"],
        "State archives moved to or from object storage (upload, download), by result.",
    ),
    Metric::counter(
        "clawdeploy_agent_archive_bytes_total",
        &["direction"],
        "Bytes of state archives moved to or from object storage.",
    ),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_recorded_metric_is_described_and_documented() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        clawdeploy_common::metrics::check_catalog(dir, CATALOG);
    }
}
