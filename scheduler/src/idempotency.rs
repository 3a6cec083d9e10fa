//! `Idempotency-Key` on `POST /api/instances`: a repeated request with the
//! same key gets the first answer (status and body, sealed at rest because
//! it carries the gateway token) instead of a second signup. The same key
//! with a different body is refused, and so is a repeat while the first is
//! still running. Keys are kept for 24 hours.

use axum::http::{HeaderMap, StatusCode};
use serde_json::Value;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::app::App;
use crate::error::{Error, Result};

pub const HEADER: &str = "idempotency-key";

/// A first request whose process died is taken over after this long.
const IN_FLIGHT_TAKEOVER_SECS: f64 = 120.0;

/// The key of a request, if it carries one: 1 to 255 printable ASCII.
pub fn key_from(headers: &HeaderMap) -> Result<Option<String>> {
    let Some(v) = headers.get(HEADER) else {
        return Ok(None);
    };
    let key = v.to_str().unwrap_or_default().trim();
    if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::Invalid {
            field: "Idempotency-Key",
            message: "must be 1 to 255 printable ASCII characters".into(),
        });
    }
    Ok(Some(key.to_owned()))
}

/// Fingerprint of a request body, to tell a true repeat from key reuse.
pub fn fingerprint(body: &impl serde::Serialize) -> Vec<u8> {
    Sha256::digest(serde_json::to_vec(body).unwrap_or_default()).to_vec()
}

fn aad(user_id: Uuid, key: &str) -> String {
    format!("idempotency:{user_id}:{key}")
}

pub enum Begin {
    /// This request is the first with the key: run it, then `finish`.
    First,
    /// The first answer, to send again.
    Replay(StatusCode, Value),
}

pub async fn begin(app: &App, user_id: Uuid, key: &str, hash: &[u8]) -> Result<Begin> {
    let first: Option<bool> = sqlx::query_scalar(
        "INSERT INTO idempotency_keys (user_id, key, request_hash) VALUES ($1, $2, $3)
         ON CONFLICT (user_id, key) DO UPDATE SET request_hash = EXCLUDED.request_hash, created_at = now()
          WHERE idempotency_keys.status_code IS NULL
            AND idempotency_keys.created_at < now() - make_interval(secs => $4)
         RETURNING true",
    )
    .bind(user_id)
    .bind(key)
    .bind(hash)
    .bind(IN_FLIGHT_TAKEOVER_SECS)
    .fetch_optional(&app.db)
    .await?;
    if first.is_some() {
        return Ok(Begin::First);
    }
    let (stored_hash, status, sealed): (Vec<u8>, Option<i16>, Option<Vec<u8>>) = sqlx::query_as(
        "SELECT request_hash, status_code, response_enc FROM idempotency_keys WHERE user_id = $1 AND key = $2",
    )
    .bind(user_id)
    .bind(key)
    .fetch_one(&app.db)
    .await?;
    if stored_hash != hash {
        return Err(Error::Unprocessable {
            code: "idempotency_key_reused",
            message: "this Idempotency-Key was used with a different request body".into(),
        });
    }
    let (Some(status), Some(sealed)) = (status, sealed) else {
        return Err(Error::Conflict {
            code: "idempotency_in_progress",
            message: "a request with this Idempotency-Key is still in progress; retry shortly"
                .into(),
        });
    };
    let body: Value = serde_json::from_slice(&app.secrets.open(&aad(user_id, key), &sealed)?)
        .map_err(Error::internal)?;
    let status = StatusCode::from_u16(status as u16).map_err(Error::internal)?;
    metrics::counter!("clawdeploy_idempotent_replays_total").increment(1);
    Ok(Begin::Replay(status, body))
}

/// Stores the first answer. Server errors are not stored: the key is
/// released so that a retry runs again.
pub async fn finish(app: &App, user_id: Uuid, key: &str, status: StatusCode, body: &Value) {
    let r = if status.is_server_error() {
        sqlx::query("DELETE FROM idempotency_keys WHERE user_id = $1 AND key = $2")
            .bind(user_id)
            .bind(key)
            .execute(&app.db)
            .await
    } else {
        let sealed = match app.secrets.seal(
            &aad(user_id, key),
            &serde_json::to_vec(body).unwrap_or_default(),
        ) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "idempotent answer not sealed");
                return;
            }
        };
        sqlx::query(
            "UPDATE idempotency_keys SET status_code = $3, response_enc = $4 WHERE user_id = $1 AND key = $2",
        )
        .bind(user_id)
        .bind(key)
        .bind(status.as_u16() as i16)
        .bind(sealed)
        .execute(&app.db)
        .await
    };
    if let Err(e) = r {
        tracing::warn!(error = %e, "idempotency record not updated");
    }
}

/// Re-seals every stored answer from `old` to `new` (KEK rotation), inside
/// the caller's transaction. Answers already under `new` are left alone.
pub async fn reseal(
    tx: &mut sqlx::PgConnection,
    old: &crate::crypto::SecretBox,
    new: &crate::crypto::SecretBox,
) -> Result<usize> {
    let rows: Vec<(Uuid, String, Vec<u8>)> = sqlx::query_as(
        "SELECT user_id, key, response_enc FROM idempotency_keys
          WHERE response_enc IS NOT NULL FOR UPDATE",
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut n = 0;
    for (user_id, key, sealed) in rows {
        let a = aad(user_id, &key);
        let Ok(plain) = old.open(&a, &sealed) else {
            new.open(&a, &sealed)?;
            continue;
        };
        sqlx::query(
            "UPDATE idempotency_keys SET response_enc = $3 WHERE user_id = $1 AND key = $2",
        )
        .bind(user_id)
        .bind(&key)
        .bind(new.seal(&a, &plain)?)
        .execute(&mut *tx)
        .await?;
        n += 1;
    }
    Ok(n)
}

/// Drops keys older than a day.
pub async fn purge_expired(app: &App) {
    let r = sqlx::query("DELETE FROM idempotency_keys WHERE created_at < now() - interval '1 day'")
        .execute(&app.db)
        .await;
    match r {
        Ok(done) if done.rows_affected() > 0 => {
            tracing::info!(
                purged = done.rows_affected(),
                "expired idempotency keys purged"
            )
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "idempotency keys not purged"),
    }
}
