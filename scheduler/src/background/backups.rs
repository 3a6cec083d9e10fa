//! The backup schedule (see `backup::schedule`): due backups started,
//! overdue ones timed out, expired ones deleted, every few seconds.

use std::time::Duration;

use super::driver::Task;
use crate::app::{App, AppRef};
use crate::error::Result;

pub struct Backups;

impl Task<App> for Backups {
    const NAME: &'static str = "backups";

    fn period(&self) -> Duration {
        Duration::from_secs(5)
    }

    async fn run_once(&mut self, app: &AppRef) -> Result<()> {
        crate::backup::schedule::run_once(app).await
    }
}
