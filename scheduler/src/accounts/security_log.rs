//! The account's security log: sign-ins (won and failed), MFA turned on
//! and off, password and email changes, sessions ended, deletion asked
//! and undone, each with its time, address and user agent. It never holds
//! a password, token or code; rows older than a year are dropped.

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use super::Client;
use crate::error::Result;

/// What happened: the `kind` column.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, sqlx::Type, utoipa::ToSchema)]
#[sqlx(type_name = "text", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum SecurityEvent {
    LoginSucceeded,
    /// A wrong password, or a wrong second factor (`detail.step`).
    LoginFailed,
    MfaEnabled,
    MfaDisabled,
    RecoveryCodesRegenerated,
    /// A login completed with a recovery code (`detail.remaining`).
    RecoveryCodeUsed,
    PasswordChanged,
    EmailChangeRequested,
    EmailChanged,
    SessionRevoked,
    /// Every session ended at once (sign out everywhere).
    SessionsRevoked,
    ProfileUpdated,
    DeletionRequested,
    DeletionUndone,
}

/// One line of the log.
#[derive(Debug, sqlx::FromRow)]
pub struct Entry {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub kind: SecurityEvent,
    pub address: Option<String>,
    pub user_agent: String,
    pub detail: sqlx::types::Json<serde_json::Value>,
}

/// Writes one line inside the caller's transaction (or on the pool). The
/// detail is the caller's: never a secret.
pub async fn record<'e>(
    db: impl sqlx::PgExecutor<'e>,
    user_id: Uuid,
    kind: SecurityEvent,
    client: &Client,
    detail: serde_json::Value,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO security_events (user_id, kind, address, user_agent, detail)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(user_id)
    .bind(kind)
    .bind(client.address.map(|a| a.to_string()))
    .bind(&client.user_agent)
    .bind(detail)
    .execute(db)
    .await?;
    Ok(())
}

/// Most lines one page holds.
pub const PAGE_MAX: i64 = 100;

/// A page of the account's log, newest first: lines older than `before`
/// (an `id` from an earlier page), at most `limit` (1 to `PAGE_MAX`).
pub async fn page(
    db: &sqlx::PgPool,
    user_id: Uuid,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<Entry>> {
    Ok(sqlx::query_as(
        "SELECT id, at, kind, address, user_agent, detail FROM security_events
          WHERE user_id = $1 AND ($2::bigint IS NULL OR id < $2)
            AND at > now() - interval '1 year'
          ORDER BY id DESC LIMIT $3",
    )
    .bind(user_id)
    .bind(before)
    .bind(limit.clamp(1, PAGE_MAX))
    .fetch_all(db)
    .await?)
}

/// The account's whole log (its year), newest first: for its export.
pub async fn all(db: &sqlx::PgPool, user_id: Uuid) -> Result<Vec<Entry>> {
    Ok(sqlx::query_as(
        "SELECT id, at, kind, address, user_agent, detail FROM security_events
          WHERE user_id = $1 AND at > now() - interval '1 year' ORDER BY id DESC",
    )
    .bind(user_id)
    .fetch_all(db)
    .await?)
}

/// Drops the lines past their year.
pub async fn purge(db: &sqlx::PgPool) {
    let r = sqlx::query("DELETE FROM security_events WHERE at < now() - interval '1 year'")
        .execute(db)
        .await;
    if let Err(e) = r {
        tracing::warn!(error = %e, "security log lines past their year not purged");
    }
}
