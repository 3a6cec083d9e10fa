//! Runs the backup schedule every few seconds (see `backup::schedule`).

use std::time::Duration;

use tokio::sync::watch;

use crate::app::AppRef;

const EVERY: Duration = Duration::from_secs(5);

pub async fn run(app: AppRef, mut shutdown: watch::Receiver<bool>) {
    loop {
        if let Err(e) = crate::backup::schedule::run_once(&app).await {
            tracing::warn!(error = %e, "backup pass failed");
        }
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = shutdown.changed() => return,
        }
    }
}
