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

fn check_password(password: &str) -> Result<()> {
    let n = password.chars().count();
    if !(10..=256).contains(&n) {
        return Err(Error::Invalid {
            field: "password",
            message: "must be 10 to 256 characters".into(),
        });
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    email: String,
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

pub async fn register(
    State(app): State<AppRef>,
    ApiJson(c): ApiJson<Credentials>,
) -> Result<(StatusCode, axum::Json<Value>)> {
    let email = normalize_email(&c.email)?;
    check_password(&c.password)?;
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

pub async fn login(
    State(app): State<AppRef>,
    ApiJson(c): ApiJson<Credentials>,
) -> Result<axum::Json<Value>> {
    // An invalid email cannot match an account: same answer as a wrong password.
    let email = normalize_email(&c.email).unwrap_or_default();
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
        return Err(Error::BadCredentials);
    };
    let token = issue_token(&app, id).await?;
    Ok(axum::Json(
        json!({"user": {"id": id, "email": email}, "token": token}),
    ))
}

/// The authenticated customer behind a request's bearer token.
pub struct AuthUser {
    pub id: Uuid,
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
        let id: Option<Uuid> = sqlx::query_scalar(
            "SELECT user_id FROM sessions WHERE token_hash = $1 AND expires_at > now() AND revoked_at IS NULL",
        )
        .bind(token_hash(token.trim()))
        .fetch_optional(&app.db)
        .await?;
        id.map(|id| AuthUser { id }).ok_or(Error::Unauthenticated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
