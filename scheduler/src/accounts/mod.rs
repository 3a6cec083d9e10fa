//! Customer accounts: registration (with a link that proves the address:
//! `verify.rs`), login with argon2id (OWASP parameters: 19 MiB, 2
//! iterations, 1 lane) and, when it is on, a second factor (`mfa`),
//! limits on failed logins, sessions (`sessions.rs`), the security log,
//! password reset and the profile.

pub mod deletion;
pub mod mfa;
mod policy;
pub mod profile;
pub mod reset;
pub mod security_log;
pub mod sessions;
pub mod verify;

use sqlx::PgPool;
use uuid::Uuid;

use crate::app::App;
use crate::audit::audit;
use crate::crypto::password;
use crate::error::{Error, Result};
pub use policy::{check_password, normalize_email};
use security_log::SecurityEvent;
pub use sessions::{authenticate, logout, token_hash};

/// Where a request came from, as the security log and the sessions list
/// show it: the client's address (when known) and its user agent (cut to
/// `USER_AGENT_MAX` characters).
#[derive(Debug, Clone, Default)]
pub struct Client {
    pub address: Option<std::net::IpAddr>,
    pub user_agent: String,
}

/// The longest user agent kept.
pub const USER_AGENT_MAX: usize = 256;

impl Client {
    pub fn new(address: Option<std::net::IpAddr>, user_agent: &str) -> Self {
        let user_agent = user_agent
            .chars()
            .filter(|c| !c.is_control())
            .take(USER_AGENT_MAX)
            .collect();
        Client {
            address,
            user_agent,
        }
    }

    pub fn address_text(&self) -> Option<String> {
        self.address.map(|a| a.to_string())
    }
}

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

/// A registration: what the client sent, and from where.
pub struct Registration<'a> {
    pub email: &'a str,
    pub password: String,
    pub name: &'a str,
    /// The client: at most `per_address_per_hour` attempts from one
    /// address (when it is known).
    pub client: Client,
    pub per_address_per_hour: u32,
}

/// Creates an account (the email normalised, the password checked against
/// the policy) and its first session.
pub async fn register(app: &App, r: Registration<'_>) -> Result<Session> {
    let db = &app.db;
    let Registration {
        email,
        password,
        name,
        client,
        per_address_per_hour,
    } = r;
    let address = client.address;
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
    verify::start(&mut tx, &app.secrets, id, &email, verify::Proof::Address).await?;
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
    let token = sessions::open(db, id, &client).await?;
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
pub(crate) async fn check_login_limits(
    db: &PgPool,
    email: &str,
    address: Option<&str>,
) -> Result<()> {
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

pub(crate) async fn record_login_failure(
    db: &PgPool,
    email: &str,
    address: Option<&str>,
) -> Result<()> {
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

/// What a right password leads to.
#[derive(Debug)]
pub enum LoginOutcome {
    /// Signed in.
    Session(Session),
    /// The account has MFA on: the second step (`mfa::challenge::finish`)
    /// takes this token and a code.
    MfaRequired { mfa_token: String },
}

/// Checks a login from `client`: a session, or the second step when the
/// account has MFA on. A wrong password and an unknown email get the same
/// error, after the same work; a wrong password for a known account goes
/// into its security log.
pub async fn login(
    db: &PgPool,
    email: &str,
    password: String,
    client: &Client,
) -> Result<LoginOutcome> {
    // An invalid email cannot match an account: same answer as a wrong password.
    let email = normalize_email(email).unwrap_or_default();
    let address = client.address_text();
    check_login_limits(db, &email, address.as_deref()).await?;
    let user: Option<(Uuid, String, bool)> = sqlx::query_as(
        "SELECT id, password_hash, totp_enabled_at IS NOT NULL FROM users WHERE email = $1",
    )
    .bind(&email)
    .fetch_optional(db)
    .await?;
    let (id, hash, mfa_on) = match user {
        Some((id, hash, mfa_on)) => (Some(id), hash, mfa_on),
        None => (None, dummy_hash().await?, false),
    };
    let ok = password::verify(password, hash).await?;
    let Some(id) = id.filter(|_| ok) else {
        record_login_failure(db, &email, address.as_deref()).await?;
        if let Some(id) = id {
            let detail = serde_json::json!({"step": "password"});
            security_log::record(db, id, SecurityEvent::LoginFailed, client, detail).await?;
        }
        metrics::counter!("clawdeploy_logins_total", "result" => "failed").increment(1);
        return Err(Error::BadCredentials);
    };
    if mfa_on {
        metrics::counter!("clawdeploy_logins_total", "result" => "mfa_required").increment(1);
        let mfa_token = mfa::challenge::open(db, id, client).await?;
        return Ok(LoginOutcome::MfaRequired { mfa_token });
    }
    metrics::counter!("clawdeploy_logins_total", "result" => "ok").increment(1);
    let mut tx = db.begin().await?;
    let detail = serde_json::json!({"mfa": null});
    security_log::record(&mut *tx, id, SecurityEvent::LoginSucceeded, client, detail).await?;
    let token = sessions::open(&mut *tx, id, client).await?;
    tx.commit().await?;
    Ok(LoginOutcome::Session(Session {
        user_id: id,
        email,
        token,
    }))
}

/// Asks for the account's password again before a sensitive change
/// (GitHub's sudo mode); returns the account's email. A wrong one counts
/// as a failed login.
pub async fn confirm_password(db: &PgPool, user_id: Uuid, password: String) -> Result<String> {
    let (email, hash): (String, String) =
        sqlx::query_as("SELECT email, password_hash FROM users WHERE id = $1")
            .bind(user_id)
            .fetch_optional(db)
            .await?
            .ok_or(Error::Unauthenticated)?;
    check_login_limits(db, &email, None).await?;
    if !password::verify(password, hash).await? {
        record_login_failure(db, &email, None).await?;
        return Err(Error::WrongPassword);
    }
    Ok(email)
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
