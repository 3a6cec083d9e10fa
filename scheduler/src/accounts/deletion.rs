//! Deleting an account, with a 30-day grace (GDPR's erasure, the product
//! spec's grace): asking (the password again, and a code when MFA is on)
//! ends every session and mails a link that undoes it; signing in again
//! within the grace undoes it too. Past the grace the account's personal
//! data is erased (`erase`); the row stays, anonymised, because billing
//! and the audit log name the account by its id. Also the account's own
//! data as JSON (`export`, GDPR's access). What it means for the instance
//! and the subscription is `lifecycle::deletion`'s.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::security_log::{self, SecurityEvent};
use super::{confirm_password, mfa, sessions, token_hash, Client};
use crate::app::App;
use crate::audit::audit;
use crate::crypto::random_token;
use crate::error::{Error, Result};
use crate::mail::templates::Purpose;
use crate::outbox::{self, NewMail};

/// Days an account waits before its data is erased (and how long the
/// undo link works).
pub const GRACE_DAYS: i32 = 30;

/// Asks to delete the account: the password (and, with MFA on, a code or a
/// recovery code). Every session ends; an undo link is mailed.
pub async fn request(
    app: &App,
    user_id: Uuid,
    password: String,
    code: Option<&str>,
    client: &Client,
) -> Result<()> {
    let email = confirm_password(&app.db, user_id, password).await?;
    let mut tx = app.db.begin().await?;
    if mfa::enabled(&app.db, user_id).await? {
        let Some(code) = code else {
            return Err(Error::Invalid {
                field: "code",
                message: "two-factor sign-in is on: give a code from the app or a recovery code"
                    .into(),
            });
        };
        if !mfa::check_any_code(app, &mut tx, user_id, code).await? {
            return Err(Error::WrongCode);
        }
    }
    let marked = sqlx::query(
        "UPDATE users SET deletion_requested_at = now(), billing_cancel_wanted = true
          WHERE id = $1 AND deletion_requested_at IS NULL",
    )
    .bind(user_id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if marked == 0 {
        return Err(Error::Conflict {
            code: "deletion_pending",
            message: "this account is already being deleted".into(),
        });
    }
    let ended = sessions::end_all(&mut tx, user_id).await?;
    let token = random_token(32);
    let hash = token_hash(&token);
    sqlx::query(
        "INSERT INTO deletion_undo_links (token_hash, user_id, expires_at)
         VALUES ($1, $2, now() + make_interval(days => $3))",
    )
    .bind(&hash)
    .bind(user_id)
    .bind(GRACE_DAYS)
    .execute(&mut *tx)
    .await?;
    let params = serde_json::json!({ "graceDays": GRACE_DAYS });
    outbox::enqueue_link(
        &mut tx,
        &app.secrets,
        Purpose::DeletionRequested,
        &email,
        &token,
        params,
    )
    .await?;
    let detail = serde_json::json!({"sessionsEnded": ended, "graceDays": GRACE_DAYS});
    security_log::record(
        &mut *tx,
        user_id,
        SecurityEvent::DeletionRequested,
        client,
        detail,
    )
    .await?;
    audit(
        &mut *tx,
        &format!("user:{user_id}"),
        "user.deletion_requested",
        &user_id.to_string(),
        serde_json::json!({}),
    )
    .await;
    tx.commit().await?;
    app.tasks.mail.activate();
    metrics::counter!("clawdeploy_account_deletions_total", "step" => "requested").increment(1);
    Ok(())
}

/// How a deletion was undone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UndoneBy {
    Link,
    SignIn,
}

/// Undoes the account's pending deletion; `false` when none was pending.
async fn undo(app: &App, user_id: Uuid, by: UndoneBy, client: &Client) -> Result<bool> {
    let mut tx = app.db.begin().await?;
    let email: Option<String> = sqlx::query_scalar(
        "UPDATE users SET deletion_requested_at = NULL, billing_cancel_wanted = false
          WHERE id = $1 AND deletion_requested_at IS NOT NULL AND purged_at IS NULL
         RETURNING email",
    )
    .bind(user_id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(email) = email else {
        return Ok(false);
    };
    sqlx::query(
        "UPDATE deletion_undo_links SET used_at = now() WHERE user_id = $1 AND used_at IS NULL",
    )
    .bind(user_id)
    .execute(&mut *tx)
    .await?;
    let via = match by {
        UndoneBy::Link => "link",
        UndoneBy::SignIn => "sign_in",
    };
    outbox::enqueue(
        &mut tx,
        &app.secrets,
        NewMail {
            purpose: Purpose::DeletionUndone,
            to: &email,
            dedupe_key: format!("deletion_undone:{user_id}:{}", Uuid::new_v4()),
            params: serde_json::json!({}),
            secret: None,
        },
    )
    .await?;
    let detail = serde_json::json!({ "by": via });
    security_log::record(
        &mut *tx,
        user_id,
        SecurityEvent::DeletionUndone,
        client,
        detail,
    )
    .await?;
    tx.commit().await?;
    app.tasks.mail.activate();
    metrics::counter!("clawdeploy_account_deletions_total", "step" => "undone").increment(1);
    Ok(true)
}

/// Undoes a pending deletion with the mailed link's token; returns the
/// account.
pub async fn undo_by_link(app: &App, token: &str, client: &Client) -> Result<Uuid> {
    let user: Option<Uuid> = sqlx::query_scalar(
        "SELECT l.user_id FROM deletion_undo_links l JOIN users u ON u.id = l.user_id
          WHERE l.token_hash = $1 AND l.used_at IS NULL AND l.expires_at > now()
            AND u.deletion_requested_at IS NOT NULL AND u.purged_at IS NULL",
    )
    .bind(token_hash(token.trim()))
    .fetch_optional(&app.db)
    .await?;
    let Some(user_id) = user else {
        return Err(Error::InvalidToken(
            "this link is unknown, used or expired, or the account is no longer being deleted",
        ));
    };
    undo(app, user_id, UndoneBy::Link, client).await?;
    Ok(user_id)
}

/// Undoes a pending deletion of an account that just signed in; `true`
/// when there was one.
pub async fn undo_on_sign_in(app: &App, user_id: Uuid, client: &Client) -> Result<bool> {
    undo(app, user_id, UndoneBy::SignIn, client).await
}

/// Accounts whose grace is over and whose data is still there, oldest
/// first.
pub async fn due(db: &sqlx::PgPool, limit: i64) -> Result<Vec<Uuid>> {
    Ok(sqlx::query_scalar(
        "SELECT id FROM users
          WHERE deletion_requested_at < now() - make_interval(days => $1) AND purged_at IS NULL
          ORDER BY deletion_requested_at LIMIT $2",
    )
    .bind(GRACE_DAYS)
    .bind(limit)
    .fetch_all(db)
    .await?)
}

/// Erases the personal data of an account past its grace (its instance
/// already released): every row that names the person goes, and the
/// account row keeps its id alone. The audit log keeps the id only.
pub async fn erase(app: &App, user_id: Uuid) -> Result<()> {
    let mut tx = app.db.begin().await?;
    let email: Option<String> = sqlx::query_scalar(
        "SELECT email FROM users WHERE id = $1 AND purged_at IS NULL FOR UPDATE",
    )
    .bind(user_id)
    .fetch_optional(&mut *tx)
    .await?;
    if email.is_none() {
        return Ok(());
    }
    // Every address the account has used (the security log keeps its
    // moves): rows keyed by an address, not by the account, go by these.
    let addresses: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT a FROM (
            SELECT email AS a FROM users WHERE id = $1
            UNION SELECT email FROM email_verifications WHERE user_id = $1
            UNION SELECT detail->>'from' FROM security_events WHERE user_id = $1
            UNION SELECT detail->>'to' FROM security_events WHERE user_id = $1
         ) x WHERE a IS NOT NULL",
    )
    .bind(user_id)
    .fetch_all(&mut *tx)
    .await?;
    for statement in [
        "DELETE FROM outbox WHERE recipient = ANY($1) OR params->>'newEmail' = ANY($1)",
        "DELETE FROM login_failures WHERE email = ANY($1)",
        "DELETE FROM reset_requests WHERE email = ANY($1)",
    ] {
        sqlx::query(statement)
            .bind(&addresses)
            .execute(&mut *tx)
            .await?;
    }
    for statement in [
        "DELETE FROM sessions WHERE user_id = $1",
        "DELETE FROM security_events WHERE user_id = $1",
        "DELETE FROM recovery_codes WHERE user_id = $1",
        "DELETE FROM mfa_challenges WHERE user_id = $1",
        "DELETE FROM email_verifications WHERE user_id = $1",
        "DELETE FROM password_resets WHERE user_id = $1",
        "DELETE FROM deletion_undo_links WHERE user_id = $1",
        "DELETE FROM idempotency_keys WHERE user_id = $1",
        "DELETE FROM secrets WHERE instance_id IN (SELECT id FROM instances WHERE user_id = $1)",
        "UPDATE billing_accounts SET customer_id = NULL WHERE user_id = $1",
        // The audit log keeps what happened to the account, by its id
        // alone: the details (a Stripe customer, a subdomain) go.
        "UPDATE audit_log SET detail = '{}'
          WHERE subject = $1::text OR actor = 'user:' || $1::text",
    ] {
        sqlx::query(statement)
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query(
        "UPDATE users SET email = 'erased-' || id || '@erased.invalid', name = '', password_hash = '!',
                timezone = 'UTC', totp_secret_enc = NULL, totp_enabled_at = NULL,
                totp_last_step = NULL, email_verified_at = NULL, purged_at = now()
          WHERE id = $1",
    )
    .bind(user_id)
    .execute(&mut *tx)
    .await?;
    audit(
        &mut *tx,
        "scheduler",
        "user.erased",
        &user_id.to_string(),
        serde_json::json!({"graceDays": GRACE_DAYS}),
    )
    .await;
    tx.commit().await?;
    metrics::counter!("clawdeploy_account_deletions_total", "step" => "erased").increment(1);
    Ok(())
}

/// The account's own data, as its owner may take it away.
pub async fn export(db: &sqlx::PgPool, user_id: Uuid) -> Result<serde_json::Value> {
    let profile = super::profile::get(db, user_id).await?;
    let sessions = sessions::list(db, user_id).await?;
    let log = security_log::all(db, user_id).await?;
    let instances: Vec<(Uuid, String, String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT id, subdomain, status, created_at FROM instances WHERE user_id = $1 ORDER BY created_at",
    )
    .bind(user_id)
    .fetch_all(db)
    .await?;
    let domains: Vec<(String, String)> = sqlx::query_as(
        "SELECT d.hostname, d.state FROM domains d JOIN instances i ON i.id = d.instance_id
          WHERE i.user_id = $1 ORDER BY d.hostname",
    )
    .bind(user_id)
    .fetch_all(db)
    .await?;
    let billing: Option<(String, String, Option<DateTime<Utc>>)> = sqlx::query_as(
        "SELECT tier, status, current_period_end FROM billing_accounts WHERE user_id = $1",
    )
    .bind(user_id)
    .fetch_optional(db)
    .await?;
    Ok(serde_json::json!({
        "exportedAt": Utc::now(),
        "account": {
            "id": profile.id, "email": profile.email, "name": profile.name,
            "timezone": profile.timezone, "emailVerified": profile.email_verified,
            "mfaEnabled": profile.mfa_enabled, "createdAt": profile.created_at,
        },
        "sessions": sessions.iter().map(|s| serde_json::json!({
            "id": s.id, "createdAt": s.created_at, "lastUsedAt": s.last_used_at,
            "address": s.address, "userAgent": s.user_agent,
        })).collect::<Vec<_>>(),
        "securityLog": log.iter().map(|e| serde_json::json!({
            "at": e.at, "event": e.kind, "address": e.address,
            "userAgent": e.user_agent, "detail": e.detail.0,
        })).collect::<Vec<_>>(),
        "instances": instances.iter().map(|(id, sub, status, at)| serde_json::json!({
            "id": id, "subdomain": sub, "status": status, "createdAt": at,
        })).collect::<Vec<_>>(),
        "domains": domains.iter().map(|(h, s)| serde_json::json!({"hostname": h, "state": s}))
            .collect::<Vec<_>>(),
        "billing": billing.map(|(tier, status, end)| serde_json::json!({
            "tier": tier, "status": status, "currentPeriodEnd": end,
        })),
    }))
}
