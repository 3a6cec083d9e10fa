//! Drains the signup queue when woken (a signup queued, a node said hello)
//! and twice a second regardless (capacity freed elsewhere).

use std::time::Duration;

use tokio::sync::watch;

use crate::app::AppRef;
use crate::lifecycle::queue;

const EVERY: Duration = Duration::from_millis(500);

pub async fn run(app: AppRef, mut shutdown: watch::Receiver<bool>) {
    loop {
        if let Err(e) = queue::drain(&app).await {
            tracing::warn!(error = %e, "signup queue pass failed");
        }
        if let Err(e) = queue::export_gauges(&app).await {
            tracing::debug!(error = %e, "signup queue gauges not updated");
        }
        tokio::select! {
            _ = app.queue_wake.notified() => {}
            _ = tokio::time::sleep(EVERY) => {}
            _ = shutdown.changed() => return,
        }
    }
}
