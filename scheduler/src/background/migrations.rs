//! Drives live migrations and evacuations: woken when an agent reports on one (an export
//! done, a target up or failed) and every second regardless, for the
//! timeouts and for migrations a killed scheduler left mid-way.

use std::time::Duration;

use tokio::sync::watch;

use crate::app::AppRef;

const EVERY: Duration = Duration::from_secs(1);

pub async fn run(app: AppRef, mut shutdown: watch::Receiver<bool>) {
    loop {
        if let Err(e) = crate::migration::drive::advance(&app).await {
            tracing::warn!(error = %e, "migration pass failed");
        }
        if let Err(e) = crate::migration::evacuate::advance(&app).await {
            tracing::warn!(error = %e, "evacuation pass failed");
        }
        tokio::select! {
            _ = app.migration_wake.notified() => {}
            _ = tokio::time::sleep(EVERY) => {}
            _ = shutdown.changed() => return,
        }
    }
}
