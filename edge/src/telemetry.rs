//! Every metric the edge records, described once: the exporter serves
//! these descriptions as `# HELP`, `docs/metrics.md` lists them, and a test
//! checks the code records nothing else.

use clawdeploy_common::metrics::Metric;

/// Histogram buckets (seconds) for the edge's `_seconds` histograms.
pub const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

pub const CATALOG: &[Metric] = &[
    Metric::counter(
        "clawdeploy_edge_requests_total",
        &["class", "route"],
        "Requests by status class (2xx … 5xx) and route (known, unknown).",
    ),
    Metric::histogram(
        "clawdeploy_edge_upstream_seconds",
        &[],
        "From sending a request upstream to its response head.",
    ),
    Metric::gauge(
        "clawdeploy_edge_connections",
        &[],
        "Client connections open.",
    ),
    Metric::counter(
        "clawdeploy_edge_connections_refused_total",
        &["reason"],
        "Client connections refused, by reason: per_address_limit, proxy_header (a load balancer's connection without a valid PROXY header).",
    ),
    Metric::counter(
        "clawdeploy_edge_timeouts_total",
        &["kind"],
        "Connections cut by a timeout: handshake, idle, proxy_header.",
    ),
    Metric::gauge("clawdeploy_edge_websockets", &[], "WebSockets open."),
    Metric::counter(
        "clawdeploy_edge_websockets_ended_total",
        &["reason"],
        "WebSockets ended: closed, idle, route_changed.",
    ),
    Metric::counter(
        "clawdeploy_edge_upstream_connects_total",
        &[],
        "New upstream connections (the connection pool's misses).",
    ),
    Metric::gauge("clawdeploy_edge_routes", &[], "Routes in the table."),
    Metric::gauge(
        "clawdeploy_edge_route_version",
        &[],
        "The highest route version applied.",
    ),
    Metric::histogram(
        "clawdeploy_edge_route_update_lag_seconds",
        &[],
        "From the scheduler sending a route change to the edge applying it (wall clocks).",
    ),
    Metric::gauge(
        "clawdeploy_edge_scheduler_connected",
        &[],
        "1 while the route watch is connected.",
    ),
    Metric::counter(
        "clawdeploy_edge_tls_reloads_total",
        &["result"],
        "Certificate files reloaded, by result (error also counts an unusable custom domain certificate).",
    ),
    Metric::counter(
        "clawdeploy_edge_acme_challenges_total",
        &["result"],
        "ACME HTTP-01 requests on the plain listener, by result: answered, unknown.",
    ),
    Metric::counter(
        "clawdeploy_edge_tls_handshake_failures_total",
        &[],
        "TLS handshakes that failed.",
    ),
    Metric::gauge(
        "clawdeploy_edge_tls_cert_not_after_seconds",
        &["name"],
        "Expiry of each served certificate (Unix seconds).",
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
