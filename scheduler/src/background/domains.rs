//! Custom domains' background work: certificate orders and renewals (a few
//! at a time per scheduler, under leases) and the periodic ownership
//! checks, every second and at once when a domain is proven; and, apart,
//! the domain gauges every few seconds.

use std::time::Duration;

use super::driver::Task;
use crate::app::tasks::Activator;
use crate::app::{App, AppRef};
use crate::error::Result;

/// Certificate orders and renewals per run.
const ORDERS_PER_RUN: usize = 4;
/// Ownership re-checks per run.
const RECHECKS_PER_RUN: i64 = 20;

pub struct Domains;

impl Task<App> for Domains {
    const NAME: &'static str = "domains";

    fn period(&self) -> Duration {
        Duration::from_secs(1)
    }

    fn activator(app: &App) -> Option<&Activator> {
        Some(&app.tasks.domains)
    }

    async fn run_once(&mut self, app: &AppRef) -> Result<()> {
        // A failed certificate pass does not hold the re-checks back.
        let issued = crate::domains::issue::run_due(app, ORDERS_PER_RUN).await;
        let rechecked = crate::domains::recheck::run_due(app, RECHECKS_PER_RUN).await;
        super::driver::both(Self::NAME, issued.map(drop), rechecked.map(drop))
    }
}

pub struct DomainGauges;

impl Task<App> for DomainGauges {
    const NAME: &'static str = "domain_gauges";

    fn period(&self) -> Duration {
        Duration::from_secs(5)
    }

    async fn run_once(&mut self, app: &AppRef) -> Result<()> {
        crate::domains::export_gauges(app).await
    }
}
