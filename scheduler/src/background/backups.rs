//! Runs the backup schedule (see `backup::schedule`) and ends billing's
//! grace periods, every few seconds.

use std::time::Duration;

use tokio::sync::watch;

use crate::app::AppRef;

const EVERY: Duration = Duration::from_secs(5);

pub async fn run(app: AppRef, mut shutdown: watch::Receiver<bool>) {
    loop {
        if let Err(e) = crate::backup::schedule::run_once(&app).await {
            tracing::warn!(error = %e, "backup pass failed");
        }
        // Billing's grace periods end on the same slow clock.
        if let Err(e) = crate::billing::webhook::end_grace(&app).await {
            tracing::warn!(error = %e, "ending grace periods failed");
        }
        if let Err(e) = crate::billing::webhook::export_gauges(&app).await {
            tracing::debug!(error = %e, "billing gauges not updated");
        }
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = shutdown.changed() => return,
        }
    }
}
