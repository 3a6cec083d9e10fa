//! Housekeeping the pool manager's leader runs every few minutes: rows that
//! only matter for a while (failed logins, registration attempts, idempotency keys, sent mail,
//! MFA challenges, security log lines past their year) are dropped
//! once they stop mattering.

use crate::app::App;

pub async fn housekeep(app: &App) {
    crate::lifecycle::idempotency::purge_expired(app).await;
    crate::accounts::purge_rate_windows(&app.db).await;
    crate::outbox::purge_old(app).await;
    crate::accounts::reset::purge(&app.db).await;
    crate::accounts::mfa::challenge::purge(&app.db).await;
    crate::accounts::security_log::purge(&app.db).await;
}
