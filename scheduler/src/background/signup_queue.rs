//! Drains the signup queue at once when activated (a signup queued, a node
//! said hello) and twice a second regardless (capacity freed elsewhere),
//! and exports its depth.

use std::time::Duration;

use super::driver::Task;
use crate::app::tasks::Activator;
use crate::app::{App, AppRef};
use crate::error::Result;
use crate::lifecycle::queue;

pub struct SignupQueue;

impl Task<App> for SignupQueue {
    const NAME: &'static str = "signup_queue";

    fn period(&self) -> Duration {
        Duration::from_millis(500)
    }

    fn activator(app: &App) -> Option<&Activator> {
        Some(&app.tasks.signup_queue)
    }

    async fn run_once(&mut self, app: &AppRef) -> Result<()> {
        let drained = queue::drain(app).await.map(drop);
        if let Err(e) = queue::export_gauges(app).await {
            tracing::debug!(error = %e, "signup queue gauges not updated");
        }
        drained
    }
}
