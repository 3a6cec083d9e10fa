//! Email verification: a registration mails a link that proves the
//! address (valid 24 hours, once); only the token's SHA-256 is stored, and
//! the mail holds it sealed until it is sent. An unverified account may
//! sign up for its gateway at once, but not start a checkout nor add a
//! custom domain (`require_verified`).

use uuid::Uuid;

use super::security_log::{self, SecurityEvent};
use super::{token_hash, Client};
use crate::app::App;
use crate::audit::audit;
use crate::crypto::{random_token, SecretBox};
use crate::error::{Error, Result};
use crate::mail::templates::Purpose;
use crate::outbox;

/// How long a link works.
pub const VALID_HOURS: u32 = 24;
/// Links one account may ask for in an hour (the first, at registration,
/// included); more are not sent, and the answer does not say so.
pub(crate) const PER_HOUR: i64 = 5;

/// What a link proves.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Proof {
    /// The account's own address (after registering).
    Address,
    /// A new address the account moves to once it is proven.
    NewAddress,
}

/// A new link for `email`, and its mail, inside the caller's transaction.
pub(crate) async fn start(
    tx: &mut sqlx::PgConnection,
    secrets: &SecretBox,
    user_id: Uuid,
    email: &str,
    proof: Proof,
) -> Result<()> {
    let token = random_token(32);
    let hash = token_hash(&token);
    sqlx::query(
        "INSERT INTO email_verifications (token_hash, user_id, email, expires_at, new_email)
         VALUES ($1, $2, $3, now() + make_interval(hours => $4), $5)",
    )
    .bind(&hash)
    .bind(user_id)
    .bind(email)
    .bind(i32::try_from(VALID_HOURS).unwrap_or(24))
    .bind(proof == Proof::NewAddress)
    .execute(&mut *tx)
    .await?;
    let purpose = match proof {
        Proof::Address => Purpose::VerifyEmail,
        Proof::NewAddress => Purpose::ConfirmEmailChange,
    };
    let params = serde_json::json!({ "validHours": VALID_HOURS });
    outbox::enqueue_link(tx, secrets, purpose, email, &token, params).await?;
    Ok(())
}

/// Uses a link's token: the address it was sent to is proven (if it is
/// still the account's), or, for a change of address, becomes the
/// account's. A token that is unknown, used or expired is refused the same
/// way.
pub async fn verify(app: &App, token: &str, client: &Client) -> Result<Uuid> {
    let mut tx = app.db.begin().await?;
    let used: Option<(Uuid, String, bool)> = sqlx::query_as(
        "UPDATE email_verifications SET used_at = now()
          WHERE token_hash = $1 AND used_at IS NULL AND expires_at > now()
         RETURNING user_id, email, new_email",
    )
    .bind(token_hash(token.trim()))
    .fetch_optional(&mut *tx)
    .await?;
    let Some((user_id, email, new_email)) = used else {
        return Err(Error::InvalidToken(
            "this link is unknown, used or expired: ask for a new one",
        ));
    };
    if new_email {
        move_to(&mut tx, user_id, &email, client).await?;
        app.tasks.billing_sync.activate();
    } else {
        let proven = sqlx::query(
            "UPDATE users SET email_verified_at = COALESCE(email_verified_at, now())
              WHERE id = $1 AND email = $2",
        )
        .bind(user_id)
        .bind(&email)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if proven == 0 {
            return Err(Error::InvalidToken(
                "this link is for an address the account no longer uses",
            ));
        }
    }
    audit(
        &mut *tx,
        &format!("user:{user_id}"),
        if new_email {
            "user.email_changed"
        } else {
            "user.email_verified"
        },
        &user_id.to_string(),
        serde_json::json!({}),
    )
    .await;
    tx.commit().await?;
    Ok(user_id)
}

/// Moves the account to its newly proven address; the other links to new
/// addresses stop working.
async fn move_to(
    tx: &mut sqlx::PgConnection,
    user_id: Uuid,
    email: &str,
    client: &Client,
) -> Result<()> {
    let old: String = sqlx::query_scalar("SELECT email FROM users WHERE id = $1 FOR UPDATE")
        .bind(user_id)
        .fetch_one(&mut *tx)
        .await?;
    sqlx::query(
        "UPDATE users SET email = $2, email_verified_at = now(), billing_email_stale = true
          WHERE id = $1",
    )
    .bind(user_id)
    .bind(email)
    .execute(&mut *tx)
    .await
    .map_err(|e| {
        Error::on_unique(
            e,
            "users_email_key",
            "email_taken",
            "another account took this address meanwhile",
        )
    })?;
    sqlx::query(
        "UPDATE email_verifications SET used_at = now()
          WHERE user_id = $1 AND new_email AND used_at IS NULL",
    )
    .bind(user_id)
    .execute(&mut *tx)
    .await?;
    security_log::record(
        &mut *tx,
        user_id,
        SecurityEvent::EmailChanged,
        client,
        serde_json::json!({"from": old, "to": email}),
    )
    .await
}

/// Links to a new address asked for in the last hour, past which no more
/// are sent.
pub(crate) async fn recent_links(tx: &mut sqlx::PgConnection, user_id: Uuid) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM email_verifications
          WHERE user_id = $1 AND created_at > now() - interval '1 hour'",
    )
    .bind(user_id)
    .fetch_one(&mut *tx)
    .await?)
}

/// Mails a new link when the account's address still needs proving and it
/// has not asked too often; says nothing either way.
pub async fn resend(app: &App, user_id: Uuid) -> Result<()> {
    let mut tx = app.db.begin().await?;
    let pending: Option<(String, i64)> = sqlx::query_as(
        "SELECT u.email, (SELECT count(*) FROM email_verifications v
                           WHERE v.user_id = u.id AND v.created_at > now() - interval '1 hour')
           FROM users u WHERE u.id = $1 AND u.email_verified_at IS NULL FOR UPDATE",
    )
    .bind(user_id)
    .fetch_optional(&mut *tx)
    .await?;
    match pending {
        Some((email, recent)) if recent < PER_HOUR => {
            start(&mut tx, &app.secrets, user_id, &email, Proof::Address).await?;
            tx.commit().await?;
            app.tasks.mail.activate();
        }
        Some(_) => {
            tracing::info!(%user_id, "verification link not resent: too many in the last hour")
        }
        None => {}
    }
    Ok(())
}

/// Refuses what an unverified account may not do yet (`403
/// email_unverified`).
pub async fn require_verified(db: &sqlx::PgPool, user_id: Uuid) -> Result<()> {
    let verified: Option<bool> =
        sqlx::query_scalar("SELECT email_verified_at IS NOT NULL FROM users WHERE id = $1")
            .bind(user_id)
            .fetch_optional(db)
            .await?;
    match verified {
        Some(true) => Ok(()),
        _ => Err(Error::EmailUnverified),
    }
}

/// Whether the account's address is proven.
pub async fn is_verified(db: &sqlx::PgPool, user_id: Uuid) -> Result<bool> {
    Ok(require_verified(db, user_id).await.is_ok())
}
