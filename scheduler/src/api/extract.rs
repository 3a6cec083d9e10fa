//! Extractors: the JSON body in the API's error shape, the customer behind
//! a bearer token, the operator behind the admin token, the client's
//! address (and user agent) and the `Idempotency-Key` header.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::accounts;
use crate::app::AppRef;
use crate::error::{Error, Result};

/// `axum::Json`, with rejections mapped onto the API's error shape.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = Error;

    async fn from_request(req: Request, state: &S) -> Result<Self, Error> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(Error::TooLarge)
            }
            Err(rejection) => Err(Error::BadRequest(rejection.body_text())),
        }
    }
}

/// The token of an `Authorization: Bearer …` header.
fn bearer(parts: &Parts) -> Result<&str> {
    parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or(Error::Unauthenticated)
}

/// The authenticated customer behind a request's bearer token.
pub struct AuthUser {
    pub id: Uuid,
    /// The session the token opened.
    pub session_id: Uuid,
    /// The SHA-256 of the token that authenticated the request.
    pub token_hash: Vec<u8>,
}

impl FromRequestParts<AppRef> for AuthUser {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, app: &AppRef) -> Result<Self> {
        let hash = accounts::token_hash(bearer(parts)?);
        let found = accounts::authenticate(&app.db, &hash).await?;
        found
            .map(|a| AuthUser {
                id: a.user_id,
                session_id: a.session_id,
                token_hash: hash,
            })
            .ok_or(Error::Unauthenticated)
    }
}

/// An operator authenticated by the admin token.
pub struct Operator;

impl FromRequestParts<AppRef> for Operator {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, app: &AppRef) -> Result<Self> {
        let Some(want) = &app.admin_token_hash else {
            return Err(Error::Forbidden(
                "the admin API is off: start the scheduler with --admin-token".into(),
            ));
        };
        let given = Sha256::digest(bearer(parts)?.as_bytes());
        if !crate::crypto::same_bytes(&given, want) {
            return Err(Error::Unauthenticated);
        }
        Ok(Operator)
    }
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

/// The client as the security log and the sessions list keep it: its
/// address and its `User-Agent`.
pub struct RequestClient(pub accounts::Client);

impl<S: Send + Sync> FromRequestParts<S> for RequestClient {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let ClientAddr(address) = ClientAddr::from_request_parts(parts, state).await?;
        let agent = parts
            .headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        Ok(RequestClient(accounts::Client::new(address, agent)))
    }
}

/// The `Idempotency-Key` of a request, if it carries one: 1 to 255
/// printable ASCII characters.
pub struct IdempotencyKey(pub Option<String>);

pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self> {
        let Some(v) = parts.headers.get(IDEMPOTENCY_HEADER) else {
            return Ok(IdempotencyKey(None));
        };
        let key = v.to_str().unwrap_or_default().trim();
        if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::Invalid {
                field: "Idempotency-Key",
                message: "must be 1 to 255 printable ASCII characters".into(),
            });
        }
        Ok(IdempotencyKey(Some(key.to_owned())))
    }
}
