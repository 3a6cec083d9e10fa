//! Account deletions (`lifecycle::deletion::erase_due`): erases the
//! accounts past their grace, every ten seconds.

use std::time::Duration;

use super::driver::Task;
use crate::app::{App, AppRef};
use crate::error::Result;

pub struct Deletions;

impl Task<App> for Deletions {
    const NAME: &'static str = "account_deletions";

    fn period(&self) -> Duration {
        Duration::from_secs(10)
    }

    async fn run_once(&mut self, app: &AppRef) -> Result<()> {
        crate::lifecycle::deletion::erase_due(app).await.map(drop)
    }
}
