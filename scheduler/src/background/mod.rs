//! Work no request waits for, as tasks of one driver (`driver.rs`): the
//! pool manager (one leader across schedulers, with housekeeping), the
//! signup queue, migrations, backups, billing's grace periods, custom
//! domains, the mail sender, account deletions, billing's sync to Stripe; and, apart, the consumer of the other schedulers' events (a
//! stream, not a periodic task).

pub mod backups;
pub mod billing_grace;
pub mod billing_sync;
pub mod deletions;
pub mod domains;
pub mod driver;
pub mod janitor;
pub mod mail;
pub mod migrations;
pub mod peer_events;
pub mod pool_manager;
pub mod signup_queue;
pub mod verification;

use crate::app::App;
pub use driver::Driver;

/// Starts every periodic background task on `driver` (the mail sender
/// when an SMTP server is configured).
pub fn start_all(driver: &mut Driver<App>, mailer: Option<crate::mail::SmtpMailer>) {
    driver.start(pool_manager::PoolManager::default());
    driver.start(signup_queue::SignupQueue);
    driver.start(migrations::Migrations);
    driver.start(backups::Backups);
    driver.start(billing_grace::BillingGrace);
    driver.start(domains::Domains);
    driver.start(domains::DomainGauges);
    driver.start(verification::VerifyGrace);
    driver.start(deletions::Deletions);
    driver.start(billing_sync::BillingSync);
    match mailer {
        Some(mailer) => driver.start(mail::MailSender { mailer }),
        None => tracing::warn!("no SMTP server (--smtp-url): mail waits in the outbox, unsent"),
    }
}
