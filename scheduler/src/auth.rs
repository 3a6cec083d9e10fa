//! Customer accounts: registration, login with argon2id (OWASP parameters:
//! 19 MiB, 2 iterations, 1 lane) and opaque bearer tokens of which only the
//! SHA-256 is stored.

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::app::AppRef;
use crate::crypto::random_token;
use crate::error::{Error, Result};
use crate::http::ApiJson;
use crate::password;

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

pub fn normalize_email(raw: &str) -> Result<String> {
    let email = raw.trim().to_lowercase();
    let valid = email.len() <= 254
        && email.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty()
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && !domain.contains('@')
        })
        && !email.chars().any(|c| c.is_whitespace() || c.is_control());
    if valid {
        Ok(email)
    } else {
        Err(Error::Invalid {
            field: "email",
            message: "must be a valid email address".into(),
        })
    }
}

/// Passwords that are long enough and still among the first an attacker tries.
const COMMON: &[&str] = &[
    "1234567890",
    "12345678910",
    "123456789012",
    "0123456789",
    "9876543210",
    "password12",
    "password123",
    "password1234",
    "passw0rd123",
    "qwertyuiop",
    "qwerty1234",
    "qwerty123456",
    "1q2w3e4r5t",
    "1qaz2wsx3edc",
    "abcdefghij",
    "iloveyou123",
    "letmein1234",
    "welcome123",
    "changeme123",
    "administrator",
];

/// The password policy: 10 to 256 characters, not one character repeated,
/// not a well-known password, and not built on the email address.
fn check_password(password: &str, email: &str) -> Result<()> {
    let invalid = |m: &str| {
        Err(Error::Invalid {
            field: "password",
            message: m.into(),
        })
    };
    let n = password.chars().count();
    if !(10..=256).contains(&n) {
        return invalid("must be 10 to 256 characters");
    }
    let mut chars = password.chars();
    let first = chars.next();
    if chars.all(|c| Some(c) == first) {
        return invalid("must not be one character repeated");
    }
    let lower = password.to_lowercase();
    if COMMON.contains(&lower.as_str()) {
        return invalid("is too common; choose another");
    }
    let local = email.split('@').next().unwrap_or_default();
    if local.chars().count() >= 3 && lower.contains(local) {
        return invalid("must not contain your email address");
    }
    Ok(())
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    #[schema(format = "email", max_length = 254)]
    email: String,
    #[schema(min_length = 10, max_length = 256)]
    password: String,
}

fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

async fn issue_token(app: &AppRef, user_id: Uuid) -> Result<String> {
    let token = format!("cdt_{}", random_token(32));
    sqlx::query("INSERT INTO sessions (token_hash, user_id, expires_at) VALUES ($1, $2, now() + make_interval(days => $3))")
        .bind(token_hash(&token))
        .bind(user_id)
        .bind(TOKEN_LIFETIME_DAYS)
        .execute(&app.db)
        .await?;
    Ok(token)
}

#[utoipa::path(post, path = "/api/auth/register", tag = "accounts", request_body = Credentials,
    responses(
        (status = 201, description = "Account created; a session token", body = crate::openapi::SessionView),
        (status = 400, description = "Malformed JSON", body = crate::openapi::ErrorBody),
        (status = 409, description = "Email taken", body = crate::openapi::ErrorBody),
        (status = 422, description = "Invalid email or password (10 to 256 characters)", body = crate::openapi::ErrorBody),
    ))]
pub async fn register(
    State(app): State<AppRef>,
    ApiJson(c): ApiJson<Credentials>,
) -> Result<(StatusCode, axum::Json<Value>)> {
    let email = normalize_email(&c.email)?;
    check_password(&c.password, &email)?;
    let hash = password::hash(c.password).await?;
    let id = Uuid::new_v4();
    sqlx::query("INSERT INTO users (id, email, password_hash) VALUES ($1, $2, $3)")
        .bind(id)
        .bind(&email)
        .bind(&hash)
        .execute(&app.db)
        .await
        .map_err(|e| {
            Error::on_unique(
                e,
                "users_email_key",
                "email_taken",
                "an account with that email exists",
            )
        })?;
    crate::audit(
        &app.db,
        &format!("user:{id}"),
        "user.register",
        &id.to_string(),
        json!({}),
    )
    .await;
    let token = issue_token(&app, id).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({"user": {"id": id, "email": email}, "token": token})),
    ))
}

/// The client's address, when the server knows it.
pub struct ClientAddr(pub Option<std::net::IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(ClientAddr(
            parts
                .extensions
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .map(|c| c.0.ip()),
        ))
    }
}

/// Refuses a login when the account or the address used up its failures.
/// Unknown emails are counted like known ones: the limit says nothing
/// about whether an account exists.
async fn check_login_limits(app: &AppRef, email: &str, address: Option<&str>) -> Result<()> {
    let (by_email, by_address): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE email = $1),
                count(*) FILTER (WHERE $2::text IS NOT NULL AND address = $2)
           FROM login_failures
          WHERE at > now() - interval '1 hour' AND (email = $1 OR address = $2)",
    )
    .bind(email)
    .bind(address)
    .fetch_one(&app.db)
    .await?;
    if by_email >= MAX_FAILED_PER_ACCOUNT || by_address >= MAX_FAILED_PER_ADDRESS {
        metrics::counter!("clawdeploy_logins_total", "result" => "limited").increment(1);
        return Err(Error::TooManyAttempts);
    }
    Ok(())
}

async fn record_login_failure(app: &AppRef, email: &str, address: Option<&str>) -> Result<()> {
    sqlx::query("INSERT INTO login_failures (email, address) VALUES ($1, $2)")
        .bind(email)
        .bind(address)
        .execute(&app.db)
        .await?;
    sqlx::query("DELETE FROM login_failures WHERE email = $1 AND at < now() - interval '1 hour'")
        .bind(email)
        .execute(&app.db)
        .await?;
    Ok(())
}

/// Drops failed logins that left the one-hour window (run every few
/// minutes by the pool manager; an account's own are pruned as it fails).
pub async fn purge_login_failures(app: &crate::app::App) {
    let r = sqlx::query("DELETE FROM login_failures WHERE at < now() - interval '1 hour'")
        .execute(&app.db)
        .await;
    if let Err(e) = r {
        tracing::warn!(error = %e, "old failed logins not purged");
    }
}

#[utoipa::path(post, path = "/api/auth/login", tag = "accounts", request_body = Credentials,
    responses(
        (status = 200, description = "A session token", body = crate::openapi::SessionView),
        (status = 400, description = "Malformed JSON", body = crate::openapi::ErrorBody),
        (status = 401, description = "Wrong email or password (the same answer for both)", body = crate::openapi::ErrorBody),
        (status = 429, description = "Too many failed logins for this account or address in the last hour", body = crate::openapi::ErrorBody),
    ))]
pub async fn login(
    State(app): State<AppRef>,
    ClientAddr(client): ClientAddr,
    ApiJson(c): ApiJson<Credentials>,
) -> Result<axum::Json<Value>> {
    // An invalid email cannot match an account: same answer as a wrong password.
    let email = normalize_email(&c.email).unwrap_or_default();
    let address = client.map(|a| a.to_string());
    check_login_limits(&app, &email, address.as_deref()).await?;
    let user: Option<(Uuid, String)> =
        sqlx::query_as("SELECT id, password_hash FROM users WHERE email = $1")
            .bind(&email)
            .fetch_optional(&app.db)
            .await?;
    let (id, hash) = match user {
        Some((id, hash)) => (Some(id), hash),
        None => (None, dummy_hash().await?),
    };
    let ok = password::verify(c.password, hash).await?;
    let Some(id) = id.filter(|_| ok) else {
        record_login_failure(&app, &email, address.as_deref()).await?;
        metrics::counter!("clawdeploy_logins_total", "result" => "failed").increment(1);
        return Err(Error::BadCredentials);
    };
    metrics::counter!("clawdeploy_logins_total", "result" => "ok").increment(1);
    let token = issue_token(&app, id).await?;
    Ok(axum::Json(
        json!({"user": {"id": id, "email": email}, "token": token}),
    ))
}

/// `POST /api/auth/logout`: revokes the token the request carries.
#[utoipa::path(post, path = "/api/auth/logout", tag = "accounts", security(("bearer" = [])),
    responses(
        (status = 204, description = "The token is revoked"),
        (status = 401, description = "No valid token", body = crate::openapi::ErrorBody),
    ))]
pub async fn logout(State(app): State<AppRef>, user: AuthUser) -> Result<StatusCode> {
    sqlx::query("UPDATE sessions SET revoked_at = now() WHERE token_hash = $1")
        .bind(&user.token_hash)
        .execute(&app.db)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The authenticated customer behind a request's bearer token.
pub struct AuthUser {
    pub id: Uuid,
    /// The SHA-256 of the token that authenticated the request.
    pub token_hash: Vec<u8>,
}

impl FromRequestParts<AppRef> for AuthUser {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, app: &AppRef) -> Result<Self> {
        let token = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or(Error::Unauthenticated)?;
        let hash = token_hash(token.trim());
        let id: Option<Uuid> = sqlx::query_scalar(
            "SELECT user_id FROM sessions WHERE token_hash = $1 AND expires_at > now() AND revoked_at IS NULL",
        )
        .bind(&hash)
        .fetch_optional(&app.db)
        .await?;
        id.map(|id| AuthUser {
            id,
            token_hash: hash,
        })
        .ok_or(Error::Unauthenticated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_policy_refuses_weak_ones() {
        let email = "alice.smith@example.com";
        assert!(check_password("correct-horse-battery", email).is_ok());
        for bad in [
            "short",
            "aaaaaaaaaaaa",
            "Password123",
            "qwertyuiop",
            "my-alice.smith-pass",
        ] {
            assert!(check_password(bad, email).is_err(), "{bad}");
        }
        assert!(check_password(&"x".repeat(257), email).is_err());
        assert!(check_password(&"ab".repeat(128), email).is_ok());
    }

    #[test]
    fn emails_are_normalised_and_checked() {
        assert_eq!(
            normalize_email("  Alice@Example.COM ").unwrap(),
            "alice@example.com"
        );
        for bad in [
            "",
            "alice",
            "@x.com",
            "a@b",
            "a b@x.com",
            "a@@x.com",
            "a@x.com.",
        ] {
            assert!(normalize_email(bad).is_err(), "{bad}");
        }
    }
}
