//! Work no request waits for, as tasks of one driver (`driver.rs`): the
//! pool manager (one leader across schedulers, with housekeeping), the
//! signup queue, migrations, backups, billing's grace periods, custom
//! domains; and, apart, the consumer of the other schedulers' events (a
//! stream, not a periodic task).

pub mod backups;
pub mod billing_grace;
pub mod domains;
pub mod driver;
pub mod janitor;
pub mod migrations;
pub mod peer_events;
pub mod pool_manager;
pub mod signup_queue;

use crate::app::App;
pub use driver::Driver;

/// Starts every periodic background task on `driver`.
pub fn start_all(driver: &mut Driver<App>) {
    driver.start(pool_manager::PoolManager::default());
    driver.start(signup_queue::SignupQueue);
    driver.start(migrations::Migrations);
    driver.start(backups::Backups);
    driver.start(billing_grace::BillingGrace);
    driver.start(domains::Domains);
    driver.start(domains::DomainGauges);
}
