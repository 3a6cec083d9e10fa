//! What an unproven address means for an instance: once its owner has left
//! the address unproven past the grace (`--verify-grace-hours`), the
//! instance is suspended (`suspension`: the container stopped with its
//! state, the routes paused so the edges say it waits for the
//! confirmation); proving the address resumes it at once. The link itself
//! is `accounts::verify`.

use uuid::Uuid;

use super::suspension::{self, Affected, Reason};
use crate::accounts::Client;
use crate::app::AppRef;
use crate::error::Result;

/// Instances one pass suspends at the most.
const PER_PASS: i64 = 50;

/// Proves the address with the link's token, then resumes the account's
/// instance if it was suspended for it.
pub async fn verify_email(app: &AppRef, token: &str, client: &Client) -> Result<Uuid> {
    let user_id = crate::accounts::verify::verify(app, token, client).await?;
    suspension::resume_user(app, user_id, Reason::EmailUnverified).await?;
    Ok(user_id)
}

/// Suspends the ready instances whose owners left their address unproven
/// past the grace; returns how many.
pub async fn suspend_overdue(app: &AppRef) -> Result<usize> {
    let mut tx = app.db.begin().await?;
    let due: Vec<Affected> = sqlx::query_as(
        "SELECT i.id, c.node_id FROM instances i
           JOIN users u ON u.id = i.user_id
           LEFT JOIN containers c ON c.id = i.container_id
          WHERE i.status = 'ready' AND u.email_verified_at IS NULL
            AND u.created_at < now() - make_interval(secs => $1)
          ORDER BY i.id LIMIT $2
          FOR UPDATE OF i SKIP LOCKED",
    )
    .bind(app.cfg.verify_grace.as_secs_f64())
    .bind(PER_PASS)
    .fetch_all(&mut *tx)
    .await?;
    if due.is_empty() {
        return Ok(0);
    }
    let deltas =
        suspension::suspend(app, &mut tx, &due, Reason::EmailUnverified, "scheduler").await?;
    tx.commit().await?;
    tracing::info!(
        instances = due.len(),
        "instances suspended: their owners' addresses are unproven past the grace"
    );
    suspension::settle(app, deltas, &due).await?;
    Ok(due.len())
}
