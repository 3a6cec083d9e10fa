//! Account deletions (`lifecycle::deletion::pass`): tells Stripe of
//! deletions asked for and undone, and erases the accounts past their
//! grace; every ten seconds, and at once when a deletion is asked or undone.

use std::time::Duration;

use super::driver::Task;
use crate::app::tasks::Activator;
use crate::app::{App, AppRef};
use crate::error::Result;

pub struct Deletions;

impl Task<App> for Deletions {
    const NAME: &'static str = "account_deletions";

    fn period(&self) -> Duration {
        Duration::from_secs(10)
    }

    fn activator(app: &App) -> Option<&Activator> {
        Some(&app.tasks.deletions)
    }

    async fn run_once(&mut self, app: &AppRef) -> Result<()> {
        crate::lifecycle::deletion::pass(app).await.map(drop)
    }
}
