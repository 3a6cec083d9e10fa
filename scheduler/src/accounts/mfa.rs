//! Two-factor sign-in, after OWASP's Multifactor Authentication cheat
//! sheet: TOTP (RFC 6238: SHA-1, six digits, 30-second steps, one step of
//! skew either way) with ten single-use recovery codes. Turning it on or
//! off asks for the password again (sudo), and turning it off also for a
//! code. The secret is sealed under the KEK; the last accepted step is
//! kept, so no code is accepted twice. A login with MFA on is finished by
//! a second request within five minutes and five tries (`challenge.rs`).

pub mod challenge;
mod recovery;

use totp_rs::{Algorithm, TOTP};
use uuid::Uuid;

use super::security_log::{self, SecurityEvent};
use super::{confirm_password, Client};
use crate::app::App;
use crate::crypto::{aad, same_bytes, SecretBox};
use crate::error::{Error, Result};
use crate::mail::templates::Purpose;
use crate::outbox::{self, NewMail};
pub use recovery::RECOVERY_CODES;

/// The name authenticator apps show above the account.
pub const ISSUER: &str = "ClawDeploy";
/// Seconds per TOTP step.
pub const STEP_SECS: u64 = 30;

/// What a customer needs to add the account to an authenticator app.
#[derive(Debug)]
pub struct Setup {
    /// The secret in base32, to type in by hand.
    pub secret: String,
    /// The `otpauth://totp/…` URL the QR code holds.
    pub otpauth_url: String,
    /// The QR code as a PNG `data:` URL.
    pub qr_png: String,
}

fn totp(secret: Vec<u8>, email: &str) -> Result<TOTP> {
    TOTP::new(
        Algorithm::SHA1,
        6,
        1,
        STEP_SECS,
        secret,
        Some(ISSUER.into()),
        email.into(),
    )
    .map_err(|e| Error::internal(format!("TOTP parameters: {e}")))
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// The time step that `code` is the code of, within one step of `now`;
/// `None` for anything else (wrong, malformed, or too old).
fn matching_step(totp: &TOTP, code: &str, now: u64) -> Option<i64> {
    let code = code.trim();
    if code.len() != 6 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let current = now / STEP_SECS;
    // Every candidate is computed, so the time does not say which matched.
    let mut found = None;
    for step in [current.saturating_sub(1), current, current + 1] {
        if same_bytes(totp.generate(step * STEP_SECS).as_bytes(), code.as_bytes()) {
            found = Some(i64::try_from(step).unwrap_or(i64::MAX));
        }
    }
    found
}

/// An account's second-factor state, read for update.
#[derive(sqlx::FromRow)]
struct State {
    email: String,
    totp_secret_enc: Option<Vec<u8>>,
    totp_enabled: bool,
    totp_last_step: Option<i64>,
}

async fn state_for_update(tx: &mut sqlx::PgConnection, user_id: Uuid) -> Result<State> {
    sqlx::query_as(
        "SELECT email, totp_secret_enc, totp_enabled_at IS NOT NULL AS totp_enabled, totp_last_step
           FROM users WHERE id = $1 FOR UPDATE",
    )
    .bind(user_id)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(Error::Unauthenticated)
}

/// Accepts a TOTP code for the account whose state is locked in `tx`: the
/// code of a step after the last one accepted; that step becomes the last.
async fn accept_code(
    tx: &mut sqlx::PgConnection,
    secrets: &SecretBox,
    user_id: Uuid,
    state: &State,
    code: &str,
) -> Result<bool> {
    let Some(sealed) = &state.totp_secret_enc else {
        return Ok(false);
    };
    let secret = secrets.open(&aad::totp_secret(user_id), sealed)?;
    let Some(step) = matching_step(&totp(secret, &state.email)?, code, now_secs()) else {
        return Ok(false);
    };
    if state.totp_last_step.is_some_and(|last| step <= last) {
        return Ok(false);
    }
    sqlx::query("UPDATE users SET totp_last_step = $2 WHERE id = $1")
        .bind(user_id)
        .bind(step)
        .execute(&mut *tx)
        .await?;
    Ok(true)
}

/// Accepts a code from the app or one of the recovery codes of an account
/// with TOTP on (its state locked in `tx`); `false` for anything else.
pub(crate) async fn check_any_code(
    app: &App,
    tx: &mut sqlx::PgConnection,
    user_id: Uuid,
    code: &str,
) -> Result<bool> {
    let state = state_for_update(tx, user_id).await?;
    if !state.totp_enabled {
        return Ok(false);
    }
    Ok(accept_code(tx, &app.secrets, user_id, &state, code).await?
        || recovery::spend(tx, user_id, code).await?.is_some())
}

/// Starts (or starts again) turning TOTP on: a new secret, not yet in
/// force. Asks for the password.
pub async fn begin(app: &App, user_id: Uuid, password: String) -> Result<Setup> {
    let email = confirm_password(&app.db, user_id, password).await?;
    let secret: [u8; 20] = rand::random();
    let t = totp(secret.to_vec(), &email)?;
    let sealed = app.secrets.seal(&aad::totp_secret(user_id), &secret)?;
    let pending = sqlx::query(
        "UPDATE users SET totp_secret_enc = $2, totp_last_step = NULL
          WHERE id = $1 AND totp_enabled_at IS NULL",
    )
    .bind(user_id)
    .bind(sealed)
    .execute(&app.db)
    .await?
    .rows_affected();
    if pending == 0 {
        return Err(already_on());
    }
    let qr = t
        .get_qr_base64()
        .map_err(|e| Error::internal(format!("QR code: {e}")))?;
    Ok(Setup {
        secret: t.get_secret_base32(),
        otpauth_url: t.get_url(),
        qr_png: format!("data:image/png;base64,{qr}"),
    })
}

fn already_on() -> Error {
    Error::Conflict {
        code: "mfa_enabled",
        message: "two-factor sign-in is already on; turn it off first to set it up again".into(),
    }
}

fn not_on() -> Error {
    Error::Conflict {
        code: "mfa_not_enabled",
        message: "two-factor sign-in is not on".into(),
    }
}

/// Turns TOTP on with a code from the app the secret went to; returns the
/// recovery codes, shown this once.
pub async fn confirm(app: &App, user_id: Uuid, code: &str, client: &Client) -> Result<Vec<String>> {
    let mut tx = app.db.begin().await?;
    let state = state_for_update(&mut tx, user_id).await?;
    if state.totp_enabled {
        return Err(already_on());
    }
    if state.totp_secret_enc.is_none() {
        return Err(Error::Conflict {
            code: "mfa_setup_missing",
            message: "start with POST /api/account/mfa/totp".into(),
        });
    }
    if !accept_code(&mut tx, &app.secrets, user_id, &state, code).await? {
        return Err(Error::WrongCode);
    }
    sqlx::query("UPDATE users SET totp_enabled_at = now() WHERE id = $1")
        .bind(user_id)
        .execute(&mut *tx)
        .await?;
    let codes = recovery::replace(&mut tx, user_id).await?;
    changed(
        app,
        &mut tx,
        user_id,
        &state.email,
        Purpose::MfaEnabled,
        client,
    )
    .await?;
    tx.commit().await?;
    app.tasks.mail.activate();
    metrics::counter!("clawdeploy_mfa_events_total", "event" => "enabled").increment(1);
    Ok(codes)
}

/// Turns TOTP off: the password and a code (or a recovery code) again.
pub async fn disable(
    app: &App,
    user_id: Uuid,
    password: String,
    code: &str,
    client: &Client,
) -> Result<()> {
    confirm_password(&app.db, user_id, password).await?;
    let mut tx = app.db.begin().await?;
    let state = state_for_update(&mut tx, user_id).await?;
    if !state.totp_enabled {
        return Err(not_on());
    }
    if !check_any_code(app, &mut tx, user_id, code).await? {
        return Err(Error::WrongCode);
    }
    sqlx::query(
        "UPDATE users SET totp_secret_enc = NULL, totp_enabled_at = NULL, totp_last_step = NULL
          WHERE id = $1",
    )
    .bind(user_id)
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM recovery_codes WHERE user_id = $1")
        .bind(user_id)
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM mfa_challenges WHERE user_id = $1")
        .bind(user_id)
        .execute(&mut *tx)
        .await?;
    changed(
        app,
        &mut tx,
        user_id,
        &state.email,
        Purpose::MfaDisabled,
        client,
    )
    .await?;
    tx.commit().await?;
    app.tasks.mail.activate();
    metrics::counter!("clawdeploy_mfa_events_total", "event" => "disabled").increment(1);
    Ok(())
}

/// A new set of recovery codes (the old set stops working). Asks for the
/// password.
pub async fn regenerate(
    app: &App,
    user_id: Uuid,
    password: String,
    client: &Client,
) -> Result<Vec<String>> {
    confirm_password(&app.db, user_id, password).await?;
    let mut tx = app.db.begin().await?;
    if !state_for_update(&mut tx, user_id).await?.totp_enabled {
        return Err(not_on());
    }
    let codes = recovery::replace(&mut tx, user_id).await?;
    security_log::record(
        &mut *tx,
        user_id,
        SecurityEvent::RecoveryCodesRegenerated,
        client,
        serde_json::json!({}),
    )
    .await?;
    tx.commit().await?;
    metrics::counter!("clawdeploy_mfa_events_total", "event" => "codes_regenerated").increment(1);
    Ok(codes)
}

/// The log line and the notice mail of MFA turned on or off.
async fn changed(
    app: &App,
    tx: &mut sqlx::PgConnection,
    user_id: Uuid,
    email: &str,
    purpose: Purpose,
    client: &Client,
) -> Result<()> {
    let event = if purpose == Purpose::MfaEnabled {
        SecurityEvent::MfaEnabled
    } else {
        SecurityEvent::MfaDisabled
    };
    security_log::record(&mut *tx, user_id, event, client, serde_json::json!({})).await?;
    outbox::enqueue(
        tx,
        &app.secrets,
        NewMail {
            purpose,
            to: email,
            dedupe_key: format!("{}:{user_id}:{}", purpose.as_str(), Uuid::new_v4()),
            params: serde_json::json!({}),
            secret: None,
        },
    )
    .await?;
    Ok(())
}

/// Whether the account has TOTP on.
pub async fn enabled(db: &sqlx::PgPool, user_id: Uuid) -> Result<bool> {
    Ok(
        sqlx::query_scalar("SELECT totp_enabled_at IS NOT NULL FROM users WHERE id = $1")
            .bind(user_id)
            .fetch_optional(db)
            .await?
            .unwrap_or(false),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 6238, appendix B: the SHA-1 secret "12345678901234567890".
    const RFC_SECRET: &[u8] = b"12345678901234567890";

    #[test]
    fn codes_match_rfc_6238_and_one_step_either_side() {
        let t = totp(RFC_SECRET.to_vec(), "ada@example.com").unwrap();
        // At T = 59 s the eight-digit code is 94287082: six digits 287082.
        assert_eq!(matching_step(&t, "287082", 59), Some(1));
        assert_eq!(matching_step(&t, " 287082 ", 59 + 30), Some(1));
        assert_eq!(matching_step(&t, "287082", 59 + 60), None);
        assert_eq!(matching_step(&t, "28708", 59), None);
        assert_eq!(matching_step(&t, "28708x", 59), None);
        // T = 1111111109: 07081804 → 081804.
        assert_eq!(matching_step(&t, "081804", 1_111_111_109), Some(37_037_036));
    }

    #[test]
    fn the_url_names_the_issuer_the_account_and_the_parameters() {
        let t = totp(RFC_SECRET.to_vec(), "ada@example.com").unwrap();
        let url = t.get_url();
        assert!(
            url.starts_with("otpauth://totp/ClawDeploy:ada%40example.com?"),
            "{url}"
        );
        assert!(url.contains("issuer=ClawDeploy"), "{url}");
        assert!(
            url.contains(&format!("secret={}", t.get_secret_base32())),
            "{url}"
        );
    }
}
