//! `Idempotency-Key` on `POST /api/instances`: a repeated request with the
//! same key gets the first answer (status and body, sealed at rest because
//! it carries the gateway token) instead of a second signup. The same key
//! with a different body is refused, and so is a repeat while the first is
//! still running. Keys are kept for 24 hours.

use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::app::{App, AppRef};
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
    /// The first request claimed this instance, but it has not stored its
    /// answer in the takeover time (its process died, or the database was
    /// away too long): answer with the instance as it is now.
    Claimed(Uuid),
}

pub async fn begin(app: &App, user_id: Uuid, key: &str, hash: &[u8]) -> Result<Begin> {
    let first: Option<bool> = sqlx::query_scalar(
        "INSERT INTO idempotency_keys (user_id, key, request_hash) VALUES ($1, $2, $3)
         ON CONFLICT (user_id, key) DO UPDATE SET request_hash = EXCLUDED.request_hash, created_at = now()
          WHERE idempotency_keys.status_code IS NULL AND idempotency_keys.instance_id IS NULL
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
    #[derive(sqlx::FromRow)]
    struct Stored {
        request_hash: Vec<u8>,
        status_code: Option<i16>,
        response_enc: Option<Vec<u8>>,
        instance_id: Option<Uuid>,
        abandoned: bool,
    }
    let stored: Stored = sqlx::query_as(
        "SELECT request_hash, status_code, response_enc, instance_id,
                created_at < now() - make_interval(secs => $3) AS abandoned
           FROM idempotency_keys WHERE user_id = $1 AND key = $2",
    )
    .bind(user_id)
    .bind(key)
    .bind(IN_FLIGHT_TAKEOVER_SECS)
    .fetch_one(&app.db)
    .await?;
    if stored.request_hash != hash {
        return Err(Error::Unprocessable {
            code: "idempotency_key_reused",
            message: "this Idempotency-Key was used with a different request body".into(),
        });
    }
    let (Some(status), Some(sealed)) = (stored.status_code, stored.response_enc) else {
        // The first request claimed an instance and never stored its
        // answer (its process died, or the database stayed away past the
        // retries of `finish`): answer with the instance, never claim again.
        if let (Some(instance_id), true) = (stored.instance_id, stored.abandoned) {
            metrics::counter!("clawdeploy_idempotent_replays_total").increment(1);
            return Ok(Begin::Claimed(instance_id));
        }
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
/// not stored: the key is released so that a retry runs again (unless the
/// request had already claimed an instance, which a retry answers with).
/// When the database is away the write is retried in the background for a
/// few minutes, so that a retry is not told "in progress" until takeover.
pub async fn finish(app: &AppRef, user_id: Uuid, key: &str, status: u16, body: &[u8]) {
    let sealed = if status >= 500 {
        None
    } else {
        match app
            .secrets
            .seal(&aad::idempotent_answer(user_id, key), body)
        {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(error = %e, "idempotent answer not sealed");
                return;
            }
        }
    };
    let status = i16::try_from(status).unwrap_or(i16::MAX);
    if let Err(e) = record(app, user_id, key, status, sealed.as_deref()).await {
        tracing::warn!(error = %e, "idempotency record not updated; retrying in the background");
        let (app, key) = (app.clone(), key.to_owned());
        tokio::spawn(async move {
            let mut backoff = clawdeploy_common::backoff::Backoff::new(
                std::time::Duration::from_millis(250),
                std::time::Duration::from_secs(10),
            )
            .jittered();
            for _ in 0..30 {
                backoff.wait().await;
                if record(&app, user_id, &key, status, sealed.as_deref())
                    .await
                    .is_ok()
                {
                    return;
                }
            }
            tracing::warn!("idempotency record never updated; the key is taken over after it ages");
        });
    }
}

async fn record(
    app: &App,
    user_id: Uuid,
    key: &str,
    status: i16,
    sealed: Option<&[u8]>,
) -> Result<(), sqlx::Error> {
    match sealed {
        None => sqlx::query(
            "DELETE FROM idempotency_keys WHERE user_id = $1 AND key = $2 AND instance_id IS NULL",
        )
        .bind(user_id)
        .bind(key)
        .execute(&app.db)
        .await
        .map(drop),
        Some(sealed) => sqlx::query(
            "UPDATE idempotency_keys SET status_code = $3, response_enc = $4 WHERE user_id = $1 AND key = $2",
        )
        .bind(user_id)
        .bind(key)
        .bind(status)
        .bind(sealed)
        .execute(&app.db)
        .await
        .map(drop),
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
