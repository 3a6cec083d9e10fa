//! Billing's slow clock: grace periods that ran out end in the free tier
//! (live), those ending within three days are mailed about, so are free
//! messages and bought credits 90 % used, and the billing gauges are
//! refreshed, every few seconds.

use std::time::Duration;

use super::driver::Task;
use crate::app::{App, AppRef};
use crate::error::Result;

pub struct BillingGrace;

impl Task<App> for BillingGrace {
    const NAME: &'static str = "billing_grace";

    fn period(&self) -> Duration {
        Duration::from_secs(5)
    }

    async fn run_once(&mut self, app: &AppRef) -> Result<()> {
        crate::billing::webhook::end_grace(app).await?;
        crate::billing::webhook::warn_grace_ending(app).await?;
        crate::billing::credits::warn_low(app).await?;
        if let Err(e) = crate::billing::webhook::export_gauges(app).await {
            tracing::debug!(error = %e, "billing gauges not updated");
        }
        Ok(())
    }
}
