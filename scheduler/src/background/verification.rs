//! Suspends the instances whose owners left their email address unproven
//! past the grace (`lifecycle::verification`), every ten seconds.

use std::time::Duration;

use super::driver::Task;
use crate::app::{App, AppRef};
use crate::error::Result;

pub struct VerifyGrace;

impl Task<App> for VerifyGrace {
    const NAME: &'static str = "verify_grace";

    fn period(&self) -> Duration {
        Duration::from_secs(10)
    }

    async fn run_once(&mut self, app: &AppRef) -> Result<()> {
        crate::lifecycle::verification::suspend_overdue(app)
            .await
            .map(drop)
    }
}
