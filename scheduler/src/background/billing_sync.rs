//! Tells Stripe what changed on accounts' side (`billing::sync`): every
//! ten seconds, and at once when a deletion is asked or undone or an
//! account moves to a new address.

use std::time::Duration;

use super::driver::Task;
use crate::app::tasks::Activator;
use crate::app::{App, AppRef};
use crate::error::Result;

pub struct BillingSync;

impl Task<App> for BillingSync {
    const NAME: &'static str = "billing_sync";

    fn period(&self) -> Duration {
        Duration::from_secs(10)
    }

    fn activator(app: &App) -> Option<&Activator> {
        Some(&app.tasks.billing_sync)
    }

    async fn run_once(&mut self, app: &AppRef) -> Result<()> {
        crate::billing::sync::pass(app).await.map(drop)
    }
}
