//! Drives live migrations and evacuations: at once when an agent reports
//! on one (an export done, a target up or failed) or one starts, and every
//! second regardless, for the timeouts and for migrations a killed
//! scheduler left mid-way.

use std::time::Duration;

use super::driver::Task;
use crate::app::tasks::Activator;
use crate::app::{App, AppRef};
use crate::error::Result;

pub struct Migrations;

impl Task<App> for Migrations {
    const NAME: &'static str = "migrations";

    fn period(&self) -> Duration {
        Duration::from_secs(1)
    }

    fn activator(app: &App) -> Option<&Activator> {
        Some(&app.tasks.migrations)
    }

    async fn run_once(&mut self, app: &AppRef) -> Result<()> {
        // A failed pass over migrations does not hold evacuations back.
        let moved = crate::migration::drive::advance(app).await;
        let evacuated = crate::migration::evacuate::advance(app).await;
        super::driver::both(Self::NAME, moved, evacuated)
    }
}
