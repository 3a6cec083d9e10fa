//! Custom domains' background work: certificate orders and renewals (one
//! at a time per scheduler, under leases), the periodic ownership checks,
//! and the domain gauges. Every second, sooner when a domain is proven.

use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::app::AppRef;

const EVERY: Duration = Duration::from_secs(1);
const GAUGES_EVERY: Duration = Duration::from_secs(5);

pub async fn run(app: AppRef, mut shutdown: watch::Receiver<bool>) {
    let mut gauges_at = Instant::now();
    loop {
        if let Err(e) = crate::domains::issue::run_due(&app, 4).await {
            tracing::warn!(error = %e, "certificate pass failed");
        }
        if let Err(e) = crate::domains::recheck::run_due(&app, 20).await {
            tracing::warn!(error = %e, "domain re-check pass failed");
        }
        if gauges_at.elapsed() >= GAUGES_EVERY {
            gauges_at = Instant::now();
            if let Err(e) = crate::domains::export_gauges(&app).await {
                tracing::debug!(error = %e, "domain gauges not updated");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = app.domain_wake.notified() => {}
            _ = shutdown.changed() => return,
        }
    }
}
