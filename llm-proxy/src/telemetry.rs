//! Every metric the proxy records, described once: the exporter serves
//! these as `# HELP`, `docs/metrics.md` lists them, and a test checks the
//! code records nothing else.

use clawdeploy_common::metrics::Metric;

/// Buckets (seconds) for the `_seconds` histograms: the overhead is
/// sub-millisecond, a request's whole time reaches minutes.
pub const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.25, 1.0, 5.0, 30.0, 120.0,
];

pub const CATALOG: &[Metric] = &[
    Metric::counter(
        "clawdeploy_llm_requests_total",
        &["model", "pay_mode", "result"],
        "Chat completions by model (a priced one, or other), pay mode (byok, credits) and result (ok, estimated: the upstream never told the usage, upstream_error, or the refusal's code).",
    ),
    Metric::histogram(
        "clawdeploy_llm_overhead_seconds",
        &["kind"],
        "The proxy's own time on a request, the upstream's excluded: before forwarding, plus (kind=whole) after the answer arrived.",
    ),
    Metric::histogram(
        "clawdeploy_llm_request_seconds",
        &[],
        "A chat completion from arrival to settlement (a stream's included).",
    ),
    Metric::gauge(
        "clawdeploy_llm_holds_outstanding_micros",
        &[],
        "Credits held for requests in flight, in micro-dollars.",
    ),
    Metric::counter(
        "clawdeploy_llm_charged_micros_total",
        &[],
        "Credits charged, in micro-dollars.",
    ),
    Metric::counter(
        "clawdeploy_llm_lease_micros_total",
        &["direction"],
        "Credits moved from balances into this proxy's leases (direction=taken), in micro-dollars.",
    ),
    Metric::counter(
        "clawdeploy_llm_leases_recovered_total",
        &[],
        "Expired leases of proxies that died, their unspent part put back.",
    ),
    Metric::counter(
        "clawdeploy_llm_upstream_errors_total",
        &["kind"],
        "Upstream failures before an answer: connect, timeout, 4xx, 5xx (nothing charged).",
    ),
    Metric::counter(
        "clawdeploy_llm_client_disconnects_total",
        &[],
        "Streams whose client left before the end (the upstream is still read for its usage).",
    ),
    Metric::histogram(
        "clawdeploy_llm_flush_seconds",
        &[],
        "One usage flush's transaction.",
    ),
    Metric::histogram(
        "clawdeploy_llm_flush_events",
        &[],
        "Usage events written by one flush.",
    ),
    Metric::counter(
        "clawdeploy_llm_flush_failures_total",
        &[],
        "Usage flushes that failed (their events wait for the next).",
    ),
    Metric::gauge(
        "clawdeploy_llm_flush_lag_seconds",
        &[],
        "Seconds since the last usage flush that succeeded (the settle lag).",
    ),
    Metric::counter(
        "clawdeploy_llm_usage_dropped_total",
        &[],
        "Usage events dropped because flushes kept failing and the buffer was full.",
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
