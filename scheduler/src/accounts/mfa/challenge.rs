//! The second step of a login with MFA on: the password opens a
//! challenge (a token valid five minutes, kept as its SHA-256), and a TOTP
//! code or a recovery code finishes it. Each try is counted before it is
//! checked, so five wrong ones lock the challenge whatever comes after;
//! every wrong one also counts as a failed login of the account, and an
//! account past its failed-login limit is refused at this step too.

use uuid::Uuid;

use super::super::security_log::{self, SecurityEvent};
use super::super::sessions::{self, token_hash};
use super::super::{check_login_limits, record_login_failure, Client, Session};
use super::{accept_code, recovery, state_for_update};
use crate::app::App;
use crate::crypto::random_token;
use crate::error::{Error, Result};

/// How long the second step may wait, and how many tries it has.
pub const VALID_MINUTES: i32 = 5;
pub const TRIES: i32 = 5;

/// What finishes a challenge.
pub enum SecondFactor<'a> {
    /// A code from the authenticator app.
    Code(&'a str),
    /// One of the account's recovery codes.
    RecoveryCode(&'a str),
}

/// Opens a challenge for an account whose password was right.
pub(crate) async fn open(db: &sqlx::PgPool, user_id: Uuid, client: &Client) -> Result<String> {
    let token = format!("cdm_{}", random_token(32));
    sqlx::query(
        "INSERT INTO mfa_challenges (token_hash, user_id, expires_at, address, user_agent)
         VALUES ($1, $2, now() + make_interval(mins => $3), $4, $5)",
    )
    .bind(token_hash(&token))
    .bind(user_id)
    .bind(VALID_MINUTES)
    .bind(client.address.map(|a| a.to_string()))
    .bind(&client.user_agent)
    .execute(db)
    .await?;
    Ok(token)
}

/// Finishes a login with its second factor: a session, or an error that
/// says whether the challenge may be tried again (`WrongCode`) or not
/// (`MfaTokenInvalid`: unknown, expired, used or out of tries).
pub async fn finish(
    app: &App,
    mfa_token: &str,
    factor: SecondFactor<'_>,
    client: &Client,
) -> Result<Session> {
    let hash = token_hash(mfa_token.trim());
    // The try is spent first, in its own statement: a wrong code cannot
    // roll it back.
    let counted: Option<(Uuid, i32)> = sqlx::query_as(
        "UPDATE mfa_challenges SET attempts = attempts + 1
          WHERE token_hash = $1 AND expires_at > now() AND attempts < $2
         RETURNING user_id, attempts",
    )
    .bind(&hash)
    .bind(TRIES)
    .fetch_optional(&app.db)
    .await?;
    let Some((user_id, attempts)) = counted else {
        metrics::counter!("clawdeploy_mfa_events_total", "event" => "challenge_refused")
            .increment(1);
        return Err(Error::MfaTokenInvalid);
    };
    let mut tx = app.db.begin().await?;
    let state = state_for_update(&mut tx, user_id).await?;
    // An account past its failed-login limit is refused here too, right
    // code or not (the limit counts this step's failures).
    check_login_limits(&app.db, &state.email, client.address_text().as_deref()).await?;
    let (ok, method, remaining) = match factor {
        SecondFactor::Code(code) => (
            state.totp_enabled && accept_code(&mut tx, &app.secrets, user_id, &state, code).await?,
            "totp",
            None,
        ),
        SecondFactor::RecoveryCode(code) => {
            let left = if state.totp_enabled {
                recovery::spend(&mut tx, user_id, code).await?
            } else {
                None
            };
            (left.is_some(), "recovery_code", left)
        }
    };
    if !ok {
        drop(tx);
        record_login_failure(&app.db, &state.email, client.address_text().as_deref()).await?;
        security_log::record(
            &app.db,
            user_id,
            SecurityEvent::LoginFailed,
            client,
            serde_json::json!({"step": "mfa", "method": method}),
        )
        .await?;
        metrics::counter!("clawdeploy_logins_total", "result" => "failed").increment(1);
        metrics::counter!("clawdeploy_mfa_events_total", "event" => "code_refused").increment(1);
        return Err(if attempts >= TRIES {
            Error::MfaTokenInvalid
        } else {
            Error::WrongCode
        });
    }
    sqlx::query("DELETE FROM mfa_challenges WHERE token_hash = $1")
        .bind(&hash)
        .execute(&mut *tx)
        .await?;
    if let Some(left) = remaining {
        security_log::record(
            &mut *tx,
            user_id,
            SecurityEvent::RecoveryCodeUsed,
            client,
            serde_json::json!({"remaining": left}),
        )
        .await?;
    }
    security_log::record(
        &mut *tx,
        user_id,
        SecurityEvent::LoginSucceeded,
        client,
        serde_json::json!({"mfa": method}),
    )
    .await?;
    let token = sessions::open(&mut *tx, user_id, client).await?;
    tx.commit().await?;
    metrics::counter!("clawdeploy_logins_total", "result" => "ok").increment(1);
    metrics::counter!("clawdeploy_mfa_events_total", "event" => "code_accepted").increment(1);
    Ok(Session {
        user_id,
        email: state.email,
        token,
    })
}

/// Drops challenges past their time.
pub async fn purge(db: &sqlx::PgPool) {
    let r = sqlx::query("DELETE FROM mfa_challenges WHERE expires_at < now() - interval '1 hour'")
        .execute(db)
        .await;
    if let Err(e) = r {
        tracing::warn!(error = %e, "MFA challenges past their time not purged");
    }
}
