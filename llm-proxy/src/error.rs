//! The proxy's one error type, mapped once to an HTTP answer in OpenAI's
//! shape (`{"error": {"code", "message", "type"}}`), which is also the
//! platform's `{error: {code, message}}`: a gateway's OpenAI client reads
//! it and so does a person with `curl`.

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::money::Micros;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("missing or unknown proxy token")]
    Unauthorized,
    #[error("{0}")]
    BadRequest(String),
    #[error("the request body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("no such endpoint")]
    NotFound,
    #[error("this instance has no key for {0} and the platform does not resell it")]
    ProviderNotConfigured(String),
    #[error("model {0} is not offered with AI credits")]
    ModelNotOffered(String),
    #[error("not enough AI credits for this request (balance {balance})")]
    InsufficientCredits { balance: Micros },
    #[error("this month's {limit} free messages are used; the count starts again at {resets_at}")]
    MessageLimit { limit: u32, resets_at: String },
    #[error("too many requests from this instance")]
    RateLimited { retry_after: Duration },
    #[error("the model provider could not be reached")]
    Upstream(String),
    #[error("the database is unavailable")]
    Database(#[from] sqlx::Error),
    #[error("internal: {0}")]
    Internal(String),
}

pub type Result<T, E = ProxyError> = std::result::Result<T, E>;

impl From<clawdeploy_common::sealed::SealError> for ProxyError {
    fn from(e: clawdeploy_common::sealed::SealError) -> Self {
        ProxyError::Internal(e.to_string())
    }
}

impl ProxyError {
    pub fn internal(e: impl std::fmt::Display) -> Self {
        ProxyError::Internal(e.to_string())
    }

    /// Status, stable code and OpenAI's error type.
    fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        use ProxyError::*;
        match self {
            Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "invalid_token",
                "authentication_error",
            ),
            BadRequest(_) => (
                StatusCode::BAD_REQUEST,
                "bad_request",
                "invalid_request_error",
            ),
            TooLarge(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                "invalid_request_error",
            ),
            NotFound => (StatusCode::NOT_FOUND, "not_found", "invalid_request_error"),
            ProviderNotConfigured(_) => (
                StatusCode::FORBIDDEN,
                "provider_not_configured",
                "permission_error",
            ),
            ModelNotOffered(_) => (
                StatusCode::BAD_REQUEST,
                "model_not_offered",
                "invalid_request_error",
            ),
            InsufficientCredits { .. } => (
                StatusCode::PAYMENT_REQUIRED,
                "insufficient_credits",
                "insufficient_quota",
            ),
            MessageLimit { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "message_limit",
                "insufficient_quota",
            ),
            RateLimited { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "rate_limit_error",
            ),
            Upstream(_) => (StatusCode::BAD_GATEWAY, "upstream_unavailable", "api_error"),
            Database(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable", "api_error"),
            Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal", "api_error"),
        }
    }

    /// The `result` label of `clawdeploy_llm_requests_total`.
    pub fn result_label(&self) -> &'static str {
        self.parts().1
    }
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        let (status, code, kind) = self.parts();
        let message = match &self {
            // Causes stay in the log, not in the answer.
            ProxyError::Database(e) => {
                tracing::warn!(error = %e, "database unavailable");
                self.to_string()
            }
            ProxyError::Internal(m) => {
                tracing::error!(error = %m, "internal error");
                "internal error".to_owned()
            }
            ProxyError::Upstream(m) => {
                tracing::warn!(error = %m, "upstream unreachable");
                self.to_string()
            }
            _ => self.to_string(),
        };
        let mut error = json!({"code": code, "message": message, "type": kind});
        match &self {
            ProxyError::InsufficientCredits { balance } => {
                error["balanceMicros"] = json!(balance.0);
            }
            ProxyError::MessageLimit { limit, resets_at } => {
                error["limit"] = json!(limit);
                error["resetsAt"] = json!(resets_at);
            }
            _ => {}
        }
        let mut response = (status, axum::Json(json!({ "error": error }))).into_response();
        let retry_after = match &self {
            ProxyError::RateLimited { retry_after } => Some(retry_after.as_secs().max(1)),
            ProxyError::Database(_) | ProxyError::Upstream(_) => Some(1),
            _ => None,
        };
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}
