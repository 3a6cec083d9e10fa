//! Password reset, after OWASP's Forgot Password cheat sheet and Devise's
//! recoverable: asking answers the same whether or not the account exists
//! (and mails only if it does); the link's token is 256 random bits, kept
//! only as its SHA-256, valid one hour, once; using it sets the password,
//! ends every session and every other reset token of the account, and
//! mails a notice. Requests are limited per email and per address.

use std::time::Duration;

use uuid::Uuid;

use super::security_log::{self, SecurityEvent};
use super::{check_password, normalize_email, sessions, token_hash, Client};
use crate::app::App;
use crate::audit::audit;
use crate::crypto::{password, random_token};
use crate::error::{Error, Result};
use crate::mail::templates::Purpose;
use crate::outbox::{self, NewMail};

/// How long a link works.
pub const VALID_MINUTES: u32 = 60;
/// Requests one email may make in an hour, and one address.
const PER_EMAIL_PER_HOUR: i64 = 5;
const PER_ADDRESS_PER_HOUR: i64 = 20;

/// Asks for a reset link for `email`. The same answer, after the same
/// statements, whether or not an account has it; a link is mailed only if
/// one does. `429` past the limits (which count unknown emails too).
pub async fn forgot(app: &App, email: &str, address: Option<std::net::IpAddr>) -> Result<()> {
    // An invalid email matches no account: the same answer as an unknown one.
    let email = normalize_email(email).unwrap_or_default();
    let address = address.map(|a| a.to_string());
    let mut tx = app.db.begin().await?;
    let (by_email, by_address, wait): (i64, i64, Option<f64>) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE email = $1),
                count(*) FILTER (WHERE $2::text IS NOT NULL AND address = $2),
                EXTRACT(EPOCH FROM min(at) + interval '1 hour' - now())::float8
           FROM reset_requests
          WHERE at > now() - interval '1 hour' AND (email = $1 OR address = $2)",
    )
    .bind(&email)
    .bind(&address)
    .fetch_one(&mut *tx)
    .await?;
    if by_email >= PER_EMAIL_PER_HOUR || by_address >= PER_ADDRESS_PER_HOUR {
        metrics::counter!("clawdeploy_password_resets_total", "step" => "limited").increment(1);
        let retry_after_secs = wait.unwrap_or(3600.0).ceil().clamp(1.0, 3600.0) as u64;
        return Err(Error::RateLimited { retry_after_secs });
    }
    sqlx::query("INSERT INTO reset_requests (email, address) VALUES ($1, $2)")
        .bind(&email)
        .bind(&address)
        .execute(&mut *tx)
        .await?;
    let user: Option<Uuid> = sqlx::query_scalar("SELECT id FROM users WHERE email = $1")
        .bind(&email)
        .fetch_optional(&mut *tx)
        .await?;
    // The token is made either way: the two paths cost the same.
    let token = random_token(32);
    let hash = token_hash(&token);
    if let Some(user_id) = user {
        sqlx::query(
            "INSERT INTO password_resets (token_hash, user_id, expires_at)
             VALUES ($1, $2, now() + make_interval(mins => $3))",
        )
        .bind(&hash)
        .bind(user_id)
        .bind(i32::try_from(VALID_MINUTES).unwrap_or(60))
        .execute(&mut *tx)
        .await?;
        let params = serde_json::json!({ "validMinutes": VALID_MINUTES });
        outbox::enqueue_link(
            &mut tx,
            &app.secrets,
            Purpose::PasswordReset,
            &email,
            &token,
            params,
        )
        .await?;
        metrics::counter!("clawdeploy_password_resets_total", "step" => "requested").increment(1);
    } else {
        metrics::counter!("clawdeploy_password_resets_total", "step" => "unknown_email")
            .increment(1);
    }
    tx.commit().await?;
    app.tasks.mail.activate();
    Ok(())
}

/// Sets a new password with a link's token: once, within the hour. Every
/// session and every other reset token of the account ends; a notice is
/// mailed. Returns the account.
pub async fn reset(app: &App, token: &str, new_password: String, client: &Client) -> Result<Uuid> {
    let hash = token_hash(token.trim());
    // Checked before the token is spent: a refused password leaves the
    // link working.
    let pending: Option<(Uuid, String)> = sqlx::query_as(
        "SELECT r.user_id, u.email FROM password_resets r JOIN users u ON u.id = r.user_id
          WHERE r.token_hash = $1 AND r.used_at IS NULL AND r.expires_at > now()",
    )
    .bind(&hash)
    .fetch_optional(&app.db)
    .await?;
    let Some((_, email)) = pending else {
        return Err(invalid());
    };
    check_password(&new_password, &email)?;
    let new_hash = password::hash(new_password).await?;
    let mut tx = app.db.begin().await?;
    // Spent atomically: of two concurrent uses, one wins.
    let used: Option<Uuid> = sqlx::query_scalar(
        "UPDATE password_resets SET used_at = now()
          WHERE token_hash = $1 AND used_at IS NULL AND expires_at > now()
         RETURNING user_id",
    )
    .bind(&hash)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(user_id) = used else {
        return Err(invalid());
    };
    sqlx::query("UPDATE users SET password_hash = $2 WHERE id = $1")
        .bind(user_id)
        .bind(&new_hash)
        .execute(&mut *tx)
        .await?;
    let ended = sessions::end_all(&mut tx, user_id).await?;
    security_log::record(
        &mut *tx,
        user_id,
        SecurityEvent::PasswordChanged,
        client,
        serde_json::json!({"by": "reset_link", "sessionsEnded": ended}),
    )
    .await?;
    // A move to a new address asked for by whoever had the old password
    // does not outlive it.
    sqlx::query(
        "UPDATE email_verifications SET used_at = now()
          WHERE user_id = $1 AND new_email AND used_at IS NULL",
    )
    .bind(user_id)
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM password_resets WHERE user_id = $1 AND token_hash <> $2")
        .bind(user_id)
        .bind(&hash)
        .execute(&mut *tx)
        .await?;
    outbox::enqueue(
        &mut tx,
        &app.secrets,
        NewMail {
            purpose: Purpose::PasswordChanged,
            to: &email,
            dedupe_key: format!("password_changed:{}", hex::encode(&hash[..16])),
            params: serde_json::json!({}),
            secret: None,
        },
    )
    .await?;
    audit(
        &mut *tx,
        &format!("user:{user_id}"),
        "user.password_reset",
        &user_id.to_string(),
        serde_json::json!({"sessionsEnded": ended}),
    )
    .await;
    tx.commit().await?;
    app.tasks.mail.activate();
    metrics::counter!("clawdeploy_password_resets_total", "step" => "completed").increment(1);
    Ok(user_id)
}

fn invalid() -> Error {
    Error::InvalidToken("this reset link is unknown, used or expired: ask for a new one")
}

/// Drops used and expired reset tokens, and requests past their hour.
pub async fn purge(db: &sqlx::PgPool) {
    let r = sqlx::query(
        "WITH t AS (DELETE FROM password_resets
                     WHERE used_at IS NOT NULL OR expires_at < now() - interval '1 day')
         DELETE FROM reset_requests WHERE at < now() - interval '1 hour'",
    )
    .execute(db)
    .await;
    if let Err(e) = r {
        tracing::warn!(error = %e, "reset rows not purged");
    }
}

/// How long the forgot answer takes at the least, so an account's mail
/// being queued does not show in the time.
pub const FORGOT_FLOOR: Duration = Duration::from_millis(250);
