//! Every metric the scheduler records, described once: the exporter serves
//! these descriptions as `# HELP`, `docs/metrics.md` lists them, and a test
//! checks the code records nothing else.

use clawdeploy_common::metrics::Metric;

/// Histogram buckets (seconds) for the scheduler's `_seconds` histograms.
pub const BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

pub const CATALOG: &[Metric] = &[
    Metric::gauge("clawdeploy_pool_idle", &[], "Warm idle pool containers on schedulable nodes (from the pool manager's leader)."),
    Metric::gauge("clawdeploy_pool_warming", &[], "Pool containers being created or warming."),
    Metric::gauge("clawdeploy_pool_target", &[], "How many warm containers the pool aims for: min_idle plus the expected signups while one warms."),
    Metric::gauge("clawdeploy_pool_stale", &[], "Warm containers of an older image or generation (a roll in progress)."),
    Metric::gauge("clawdeploy_pool_signup_rate", &[], "Signups per second over the last 10 s, across schedulers."),
    Metric::gauge("clawdeploy_pool_warm_seconds", &[], "Mean create-to-idle time of the last 20 containers."),
    Metric::gauge("clawdeploy_pool_min_idle", &[], "The pool's min_idle setting (what the idle pool should not fall below)."),
    Metric::gauge("clawdeploy_pool_manager_leader", &[], "1 while this scheduler runs the pool manager."),
    Metric::counter("clawdeploy_background_runs_total", &["task", "result", "cause"], "Background task runs by task, result (ok, error) and cause (period, activation)."),
    Metric::histogram("clawdeploy_background_run_seconds", &["task"], "How long one run of a background task took."),
    Metric::gauge("clawdeploy_background_last_run_timestamp_seconds", &["task"], "Unix time a background task's last run ended (a task that stopped running stops moving it)."),
    Metric::gauge("clawdeploy_background_failing", &["task"], "1 while a background task's last run failed (its error is in the scheduler's log)."),
    Metric::gauge("clawdeploy_nodes", &["state"], "Nodes by state (active, draining, unreachable, removed)."),
    Metric::gauge("clawdeploy_agent_sessions", &[], "Agent sessions open with this scheduler."),
    Metric::gauge("clawdeploy_edges_connected", &[], "Edges watching routes on this scheduler."),
    Metric::counter("clawdeploy_assignments_total", &["result"], "Signup claims by outcome: ready, deadline (answered 202), retried, failed, conflict, error."),
    Metric::histogram("clawdeploy_assignment_duration_seconds", &[], "From a claim to its instance being ready."),
    Metric::histogram("clawdeploy_claim_commit_seconds", &[], "A claim, from its start to its commit (in a warm batch, or alone)."),
    Metric::histogram("clawdeploy_claim_batch_size", &[], "Claims per warm-claim batch (one transaction each)."),
    Metric::counter("clawdeploy_desired_pushes_total", &[], "Desired states sent to agents (each carries its node's whole state; a burst's claims share them)."),
    Metric::counter("clawdeploy_claim_fallbacks_total", &[], "Claims that found the pool empty and created a container on demand."),
    Metric::counter("clawdeploy_idempotent_replays_total", &[], "Signups answered from a stored Idempotency-Key answer."),
    Metric::counter("clawdeploy_route_changes_total", &[], "Route changes sent to this scheduler's edges."),
    Metric::histogram("clawdeploy_route_propagation_seconds", &[], "From a route change's commit to every connected edge acknowledging it."),
    Metric::counter("clawdeploy_logins_total", &["result"], "Logins by result: ok, failed (a wrong password or second factor), limited, mfa_required (the password was right; a code is asked)."),
    Metric::counter("clawdeploy_registrations_total", &["result"], "Registrations refused by the per-address limit (result=limited)."),
    Metric::counter("clawdeploy_account_deletions_total", &["step"], "Account deletions by step: requested, undone, erased (past the 30-day grace)."),
    Metric::counter("clawdeploy_mfa_events_total", &["event"], "Two-factor sign-in events: enabled, disabled, codes_regenerated, code_accepted, code_refused, challenge_refused (a login token unknown, expired or out of tries)."),
    Metric::counter("clawdeploy_password_resets_total", &["step"], "Password resets by step: requested, unknown_email (answered the same), limited, completed."),
    Metric::counter("clawdeploy_password_queue_full_total", &[], "Password hashes refused because the hashing queue was full (answered 503)."),
    Metric::counter("clawdeploy_node_joins_total", &["result"], "Node joins by result: ok, refused."),
    Metric::counter("clawdeploy_node_cert_renewals_total", &[], "Node certificates renewed."),
    Metric::counter("clawdeploy_migrations_total", &["result"], "Migrations ended, by result: done, rolled_back."),
    Metric::histogram("clawdeploy_migration_downtime_seconds", &[], "From a migration's start (the route pauses, the source stops) to the route switching to the target."),
    Metric::counter("clawdeploy_archive_bytes_total", &["purpose"], "Bytes of state archives agents reported stored, by purpose (migration, backup)."),
    Metric::gauge("clawdeploy_signup_queue_depth", &[], "Signups waiting for capacity (every node was full)."),
    Metric::gauge("clawdeploy_signup_queue_oldest_age_seconds", &[], "How long the oldest queued signup has waited."),
    Metric::counter("clawdeploy_billing_webhooks_total", &["type", "result"], "Stripe webhooks by event type and outcome (applied, linked, duplicate, stale, unknown_account, ignored, unreadable)."),
    Metric::gauge("clawdeploy_billing_accounts", &["tier", "status"], "Accounts Stripe told us about, by tier and billing status (active, past_due, grace, canceled)."),
    Metric::counter("clawdeploy_billing_signature_failures_total", &[], "Stripe webhooks refused: bad signature, stale timestamp or malformed signature header."),
    Metric::gauge("clawdeploy_billing_unreadable_events", &[], "Signed Stripe events billing could not read (another API version), kept and acknowledged, that no operator has resolved yet."),
    Metric::counter("clawdeploy_domain_checks_total", &["result"], "Domain ownership checks (on verify, daily, before renewals) by result: found, missing, error (DNS unreachable)."),
    Metric::gauge("clawdeploy_domains", &["state"], "Custom domains by state: pending_dns, verified, issuing, active, renewing, failed, off."),
    Metric::counter("clawdeploy_acme_orders_total", &["result"], "ACME certificate orders by result: issued, failed, deferred (a rate cap)."),
    Metric::gauge("clawdeploy_domain_cert_soonest_expiry_seconds", &[], "Seconds until the soonest-expiring served custom domain certificate ends (0: none served)."),
    Metric::gauge("clawdeploy_domain_certs_ending_soon", &[], "Served custom domain certificates ending within 14 days (renewal starts at 30: any here means renewals fail)."),
    Metric::counter("clawdeploy_mail_sent_total", &["purpose"], "Mail the SMTP server took, by purpose (gateway_live)."),
    Metric::counter("clawdeploy_mail_failed_total", &["purpose", "kind"], "Mail not sent, by purpose and kind: transient (tried again later), permanent (given up)."),
    Metric::gauge("clawdeploy_mail_outbox_pending", &[], "Mail waiting in the outbox (exported while an SMTP server is configured)."),
    Metric::gauge("clawdeploy_mail_outbox_oldest_age_seconds", &[], "How long the oldest mail in the outbox has waited (0: none)."),
    Metric::counter("clawdeploy_backups_total", &["result"], "Backups ended, by result: stored, failed."),
    Metric::gauge("clawdeploy_backup_oldest_age_seconds", &[], "Age of the stalest ready instance's newest stored backup (or of the instance, when it has none)."),
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
