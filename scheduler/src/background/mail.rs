//! Sends what the outbox holds (`outbox.rs`): every few seconds, at once
//! when something is written to it, and exports its backlog. Runs only
//! when an SMTP server is configured; without one, mail waits.

use std::time::Duration;

use super::driver::Task;
use crate::app::tasks::Activator;
use crate::app::{App, AppRef};
use crate::error::Result;
use crate::mail::SmtpMailer;
use crate::outbox;

/// Mails one run sends at the most.
const PER_RUN: i64 = 50;

pub struct MailSender {
    pub mailer: SmtpMailer,
}

impl Task<App> for MailSender {
    const NAME: &'static str = "mail";

    fn period(&self) -> Duration {
        Duration::from_secs(2)
    }

    fn activator(app: &App) -> Option<&Activator> {
        Some(&app.tasks.mail)
    }

    async fn run_once(&mut self, app: &AppRef) -> Result<()> {
        let sent = outbox::send_due(app, &self.mailer, PER_RUN).await;
        let gauges = outbox::export_gauges(app).await;
        super::driver::both(Self::NAME, sent.map(drop), gauges)
    }
}
