//! Sessions: opaque bearer tokens of which only the SHA-256 is stored,
//! each with where it was opened and when it was last used, so that the
//! customer can see them and end any one, or all. (Opaque rather than
//! JWTs: ending a session on logout, reset or deletion needs a lookup on
//! every request anyway; see docs/architecture.md.)

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use super::security_log::{self, SecurityEvent};
use super::Client;
use crate::crypto::random_token;
use crate::error::{Error, Result};

const LIFETIME_DAYS: i32 = 7;

/// The SHA-256 of a bearer token: what the `sessions` table keeps.
pub fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// Opens a session for `user_id` from `client`; returns its token.
pub(crate) async fn open<'e>(
    db: impl sqlx::PgExecutor<'e>,
    user_id: Uuid,
    client: &Client,
) -> Result<String> {
    let token = format!("cdt_{}", random_token(32));
    sqlx::query(
        "INSERT INTO sessions (token_hash, user_id, expires_at, last_used_at, address, user_agent)
         VALUES ($1, $2, now() + make_interval(days => $3), now(), $4, $5)",
    )
    .bind(token_hash(&token))
    .bind(user_id)
    .bind(LIFETIME_DAYS)
    .bind(client.address.map(|a| a.to_string()))
    .bind(&client.user_agent)
    .execute(db)
    .await?;
    Ok(token)
}

/// Who a live (unexpired, unrevoked) token belongs to, and which session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct Authenticated {
    pub user_id: Uuid,
    pub session_id: Uuid,
}

/// The account and session behind a live token. Marks the session used,
/// at most once a minute (a request does not write a row each time).
pub async fn authenticate(db: &PgPool, token_hash: &[u8]) -> Result<Option<Authenticated>> {
    let found: Option<(Uuid, Uuid, bool)> = sqlx::query_as(
        "SELECT user_id, id, last_used_at IS NULL OR last_used_at < now() - interval '1 minute'
           FROM sessions WHERE token_hash = $1 AND expires_at > now() AND revoked_at IS NULL",
    )
    .bind(token_hash)
    .fetch_optional(db)
    .await?;
    let Some((user_id, session_id, stale)) = found else {
        return Ok(None);
    };
    if stale {
        sqlx::query("UPDATE sessions SET last_used_at = now() WHERE id = $1")
            .bind(session_id)
            .execute(db)
            .await?;
    }
    Ok(Some(Authenticated {
        user_id,
        session_id,
    }))
}

/// Ends the session whose token hashes to `token_hash`.
pub async fn logout(db: &PgPool, token_hash: &[u8]) -> Result<()> {
    sqlx::query("UPDATE sessions SET revoked_at = now() WHERE token_hash = $1")
        .bind(token_hash)
        .execute(db)
        .await?;
    Ok(())
}

/// A live session as its owner sees it.
#[derive(Debug, sqlx::FromRow)]
pub struct Listed {
    pub id: Uuid,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub address: Option<String>,
    pub user_agent: String,
}

/// The account's live sessions, the most recently used first.
pub async fn list(db: &PgPool, user_id: Uuid) -> Result<Vec<Listed>> {
    Ok(sqlx::query_as(
        "SELECT id, created_at, last_used_at, address, user_agent FROM sessions
          WHERE user_id = $1 AND expires_at > now() AND revoked_at IS NULL
          ORDER BY last_used_at DESC NULLS LAST, created_at DESC",
    )
    .bind(user_id)
    .fetch_all(db)
    .await?)
}

/// Ends one live session of the account; `NotFound` when it has none by
/// that id (another account's is not found either).
pub async fn revoke(db: &PgPool, user_id: Uuid, session_id: Uuid, client: &Client) -> Result<()> {
    let mut tx = db.begin().await?;
    let ended = sqlx::query(
        "UPDATE sessions SET revoked_at = now()
          WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL AND expires_at > now()",
    )
    .bind(session_id)
    .bind(user_id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if ended == 0 {
        return Err(Error::NotFound("session"));
    }
    security_log::record(
        &mut *tx,
        user_id,
        SecurityEvent::SessionRevoked,
        client,
        serde_json::json!({"session": session_id}),
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Ends every session of the account inside the caller's transaction;
/// returns how many were live.
pub(crate) async fn end_all(tx: &mut sqlx::PgConnection, user_id: Uuid) -> Result<u64> {
    Ok(sqlx::query(
        "UPDATE sessions SET revoked_at = now() WHERE user_id = $1 AND revoked_at IS NULL",
    )
    .bind(user_id)
    .execute(&mut *tx)
    .await?
    .rows_affected())
}

/// Signs the account out everywhere (this session too).
pub async fn revoke_all(db: &PgPool, user_id: Uuid, client: &Client) -> Result<u64> {
    let mut tx = db.begin().await?;
    let ended = end_all(&mut tx, user_id).await?;
    security_log::record(
        &mut *tx,
        user_id,
        SecurityEvent::SessionsRevoked,
        client,
        serde_json::json!({"sessionsEnded": ended}),
    )
    .await?;
    tx.commit().await?;
    Ok(ended)
}
