//! Customer accounts: registration (with a link that proves the address:
//! `verify.rs`), login with argon2id (OWASP parameters: 19 MiB, 2
//! iterations, 1 lane), limits on failed logins, and opaque bearer tokens
//! of which only the SHA-256 is stored.

mod policy;
pub mod reset;
pub mod verify;

use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use crate::app::App;
use crate::audit::audit;
use crate::crypto::{password, random_token};
use crate::error::{Error, Result};
pub use policy::{check_password, normalize_email};

const TOKEN_LIFETIME_DAYS: i32 = 7;

/// Failed logins allowed per account (normalised email) in an hour; the
/// next attempt, right password or not, is refused until the window moves.
pub const MAX_FAILED_PER_ACCOUNT: i64 = 100;
/// Failed logins allowed per client address in an hour (offices share one).
pub const MAX_FAILED_PER_ADDRESS: i64 = 1000;

/// A hash to verify against when the email is unknown, so that both cases
/// cost one argon2 verification.
static DUMMY_HASH: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();

async fn dummy_hash() -> Result<String> {
    DUMMY_HASH
        .get_or_try_init(|| password::hash("not-a-real-password".into()))
        .await
        .cloned()
}

/// An account and a fresh session token for it.
#[derive(Debug)]
pub struct Session {
    pub user_id: Uuid,
    pub email: String,
    pub token: String,
}

/// The SHA-256 of a bearer token: what the `sessions` table keeps.
pub fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

async fn issue_token(db: &PgPool, user_id: Uuid) -> Result<String> {
    let token = format!("cdt_{}", random_token(32));
    sqlx::query("INSERT INTO sessions (token_hash, user_id, expires_at) VALUES ($1, $2, now() + make_interval(days => $3))")
        .bind(token_hash(&token))
        .bind(user_id)
        .bind(TOKEN_LIFETIME_DAYS)
        .execute(db)
        .await?;
    Ok(token)
}

/// Creates an account (the email normalised, the password checked against
/// the policy) and its first session.
/// A registration: what the client sent, and from where.
pub struct Registration<'a> {
    pub email: &'a str,
    pub password: String,
    pub name: &'a str,
    /// The client's address, when known: at most `per_address_per_hour`
    /// attempts from one address.
    pub address: Option<std::net::IpAddr>,
    pub per_address_per_hour: u32,
}

pub async fn register(app: &App, r: Registration<'_>) -> Result<Session> {
    let db = &app.db;
    let Registration {
        email,
        password,
        name,
        address,
        per_address_per_hour,
    } = r;
    let email = normalize_email(email)?;
    let name = display_name(name)?;
    check_password(&password, &email)?;
    if let Some(address) = address {
        check_registration_limit(db, &address.to_string(), per_address_per_hour).await?;
    }
    let hash = password::hash(password).await?;
    let id = Uuid::new_v4();
    // The account and the mail that proves its address, together.
    let mut tx = db.begin().await?;
    sqlx::query("INSERT INTO users (id, email, password_hash, name) VALUES ($1, $2, $3, $4)")
        .bind(id)
        .bind(&email)
        .bind(&hash)
        .bind(&name)
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            Error::on_unique(
                e,
                "users_email_key",
                "email_taken",
                "an account with that email exists",
            )
        })?;
    verify::start(&mut tx, &app.secrets, id, &email).await?;
    tx.commit().await?;
    app.tasks.mail.activate();
    audit(
        db,
        &format!("user:{id}"),
        "user.register",
        &id.to_string(),
        serde_json::json!({}),
    )
    .await;
    let token = issue_token(db, id).await?;
    Ok(Session {
        user_id: id,
        email,
        token,
    })
}

/// Refuses a registration from an address that used up its hour, saying
/// when the oldest attempt leaves the window; otherwise counts this one
/// (before the email is tried, so that probing for taken emails counts).
async fn check_registration_limit(db: &PgPool, address: &str, per_hour: u32) -> Result<()> {
    let (count, wait): (i64, Option<f64>) = sqlx::query_as(
        "SELECT count(*), EXTRACT(EPOCH FROM min(at) + interval '1 hour' - now())::float8
           FROM registration_attempts WHERE address = $1 AND at > now() - interval '1 hour'",
    )
    .bind(address)
    .fetch_one(db)
    .await?;
    if count >= i64::from(per_hour) {
        metrics::counter!("clawdeploy_registrations_total", "result" => "limited").increment(1);
        let retry_after_secs = wait.unwrap_or(3600.0).ceil().clamp(1.0, 3600.0) as u64;
        return Err(Error::RateLimited { retry_after_secs });
    }
    sqlx::query("INSERT INTO registration_attempts (address) VALUES ($1)")
        .bind(address)
        .execute(db)
        .await?;
    Ok(())
}

/// Refuses a login when the account or the address used up its failures.
/// Unknown emails are counted like known ones: the limit says nothing
/// about whether an account exists.
async fn check_login_limits(db: &PgPool, email: &str, address: Option<&str>) -> Result<()> {
    let (by_email, by_address): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE email = $1),
                count(*) FILTER (WHERE $2::text IS NOT NULL AND address = $2)
           FROM login_failures
          WHERE at > now() - interval '1 hour' AND (email = $1 OR address = $2)",
    )
    .bind(email)
    .bind(address)
    .fetch_one(db)
    .await?;
    if by_email >= MAX_FAILED_PER_ACCOUNT || by_address >= MAX_FAILED_PER_ADDRESS {
        metrics::counter!("clawdeploy_logins_total", "result" => "limited").increment(1);
        return Err(Error::TooManyAttempts);
    }
    Ok(())
}

async fn record_login_failure(db: &PgPool, email: &str, address: Option<&str>) -> Result<()> {
    sqlx::query("INSERT INTO login_failures (email, address) VALUES ($1, $2)")
        .bind(email)
        .bind(address)
        .execute(db)
        .await?;
    sqlx::query("DELETE FROM login_failures WHERE email = $1 AND at < now() - interval '1 hour'")
        .bind(email)
        .execute(db)
        .await?;
    Ok(())
}

/// Drops the failed logins and registration attempts that left their
/// one-hour windows (run every few minutes by the janitor; an account's
/// own failures are also pruned as it fails).
pub async fn purge_rate_windows(db: &PgPool) {
    for table in ["login_failures", "registration_attempts"] {
        let r = sqlx::query(&format!(
            "DELETE FROM {table} WHERE at < now() - interval '1 hour'"
        ))
        .execute(db)
        .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, table, "rows past the rate window not purged");
        }
    }
}

/// Checks a login from `address` (when known) and opens a session. A wrong
/// password and an unknown email get the same error, after the same work.
pub async fn login(
    db: &PgPool,
    email: &str,
    password: String,
    address: Option<std::net::IpAddr>,
) -> Result<Session> {
    // An invalid email cannot match an account: same answer as a wrong password.
    let email = normalize_email(email).unwrap_or_default();
    let address = address.map(|a| a.to_string());
    check_login_limits(db, &email, address.as_deref()).await?;
    let user: Option<(Uuid, String)> =
        sqlx::query_as("SELECT id, password_hash FROM users WHERE email = $1")
            .bind(&email)
            .fetch_optional(db)
            .await?;
    let (id, hash) = match user {
        Some((id, hash)) => (Some(id), hash),
        None => (None, dummy_hash().await?),
    };
    let ok = password::verify(password, hash).await?;
    let Some(id) = id.filter(|_| ok) else {
        record_login_failure(db, &email, address.as_deref()).await?;
        metrics::counter!("clawdeploy_logins_total", "result" => "failed").increment(1);
        return Err(Error::BadCredentials);
    };
    metrics::counter!("clawdeploy_logins_total", "result" => "ok").increment(1);
    let token = issue_token(db, id).await?;
    Ok(Session {
        user_id: id,
        email,
        token,
    })
}

/// Revokes the session whose token hashes to `token_hash`.
pub async fn logout(db: &PgPool, token_hash: &[u8]) -> Result<()> {
    sqlx::query("UPDATE sessions SET revoked_at = now() WHERE token_hash = $1")
        .bind(token_hash)
        .execute(db)
        .await?;
    Ok(())
}

/// The account a live (unexpired, unrevoked) token belongs to.
pub async fn authenticate(db: &PgPool, token_hash: &[u8]) -> Result<Option<Uuid>> {
    Ok(sqlx::query_scalar(
        "SELECT user_id FROM sessions WHERE token_hash = $1 AND expires_at > now() AND revoked_at IS NULL",
    )
    .bind(token_hash)
    .fetch_optional(db)
    .await?)
}

/// A display name as stored: trimmed, at most 100 characters, no control
/// characters; empty when none was given.
pub fn display_name(raw: &str) -> Result<String> {
    let name = raw.trim();
    if name.chars().count() > 100 {
        return Err(Error::Invalid {
            field: "name",
            message: "at most 100 characters".into(),
        });
    }
    if name.chars().any(char::is_control) {
        return Err(Error::Invalid {
            field: "name",
            message: "no control characters".into(),
        });
    }
    Ok(name.to_owned())
}

#[cfg(test)]
mod name_tests {
    use super::display_name;

    #[test]
    fn display_names_are_trimmed_and_bounded() {
        assert_eq!(display_name("  Ada Lovelace ").unwrap(), "Ada Lovelace");
        assert_eq!(display_name("").unwrap(), "");
        assert!(display_name(&"x".repeat(101)).is_err());
        assert_eq!(display_name(&"é".repeat(100)).unwrap().chars().count(), 100);
        assert!(display_name("a\u{0}b").is_err());
        assert!(display_name("line\nbreak").is_err());
    }
}
