//! `Idempotency-Key` on `POST /api/instances`: a repeated request with the
//! same key gets the first answer (status and body, sealed at rest because
//! it carries the gateway token) instead of a second signup. The same key
//! with a different body is refused, and so is a repeat while the first is
//! still running. Keys are kept for 24 hours.

use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::app::App;
use crate::crypto::aad;
use crate::error::{Error, Result};

/// A first request whose process died is taken over after this long.
const IN_FLIGHT_TAKEOVER_SECS: f64 = 120.0;

/// Fingerprint of a request body, to tell a true repeat from key reuse.
pub fn fingerprint(body: &impl serde::Serialize) -> Vec<u8> {
    Sha256::digest(serde_json::to_vec(body).unwrap_or_default()).to_vec()
}

pub enum Begin {
    /// This request is the first with the key: run it, then `finish`.
    First,
    /// The first answer (HTTP status and JSON body), to send again.
    Replay(u16, Vec<u8>),
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
    let body = app
        .secrets
        .open(&aad::idempotent_answer(user_id, key), &sealed)?;
    let status = u16::try_from(status).map_err(Error::internal)?;
    metrics::counter!("clawdeploy_idempotent_replays_total").increment(1);
    Ok(Begin::Replay(status, body))
}

/// Stores the first answer (HTTP status and JSON body). Server errors are
/// not stored: the key is released so that a retry runs again.
pub async fn finish(app: &App, user_id: Uuid, key: &str, status: u16, body: &[u8]) {
    let r = if status >= 500 {
        sqlx::query("DELETE FROM idempotency_keys WHERE user_id = $1 AND key = $2")
            .bind(user_id)
            .bind(key)
            .execute(&app.db)
            .await
    } else {
        let sealed = match app
            .secrets
            .seal(&aad::idempotent_answer(user_id, key), body)
        {
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
        .bind(i16::try_from(status).unwrap_or(i16::MAX))
        .bind(sealed)
        .execute(&app.db)
        .await
    };
    if let Err(e) = r {
        tracing::warn!(error = %e, "idempotency record not updated");
    }
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
