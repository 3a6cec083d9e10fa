//! The scheduler's one error type and what each case means to a client: a
//! status, a stable code and a message. It is mapped once to an HTTP answer
//! (`api::error`) and once to a `tonic::Status` (`rpc::status`); the detail
//! goes to the log only.

use http::StatusCode;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("invalid {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("request body too large")]
    TooLarge,
    #[error("authentication required")]
    Unauthenticated,
    #[error("wrong email or password")]
    BadCredentials,
    #[error("too many failed logins")]
    TooManyAttempts,
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// Not allowed on this account's plan.
    #[error("plan required: {0}")]
    PlanRequired(String),
    #[error("not found: {0}")]
    NotFound(&'static str),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("conflict ({code}): {message}")]
    Conflict { code: &'static str, message: String },
    #[error("unprocessable ({code}): {message}")]
    Unprocessable { code: &'static str, message: String },
    #[error("busy: {0}")]
    Busy(String),
    /// A capability this deployment has not configured (archives, billing).
    #[error("disabled ({code}): {message}")]
    Disabled { code: &'static str, message: String },
    #[error("no capacity: {0}")]
    NoCapacity(String),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// The object store (state archives) did not answer or refused.
    #[error("object storage: {0}")]
    Storage(String),
    #[error("internal: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn internal(e: impl std::fmt::Display) -> Self {
        Error::Internal(e.to_string())
    }

    /// Stable machine-readable code, status and customer-facing message.
    pub(crate) fn public(&self) -> (StatusCode, &'static str, String) {
        match self {
            Error::BadRequest(m) => (StatusCode::BAD_REQUEST, "bad_request", m.clone()),
            Error::Invalid { field, message } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_field",
                format!("{field}: {message}"),
            ),
            Error::TooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                "request body too large".into(),
            ),
            Error::Unauthenticated => (
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "a valid bearer token is required".into(),
            ),
            Error::BadCredentials => (
                StatusCode::UNAUTHORIZED,
                "bad_credentials",
                "wrong email or password".into(),
            ),
            Error::TooManyAttempts => (
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_attempts",
                "too many failed logins; try again later".into(),
            ),
            Error::Forbidden(m) => (StatusCode::FORBIDDEN, "forbidden", m.clone()),
            Error::PlanRequired(m) => (StatusCode::FORBIDDEN, "plan_required", m.clone()),
            Error::NotFound(what) => (
                StatusCode::NOT_FOUND,
                "not_found",
                format!("{what} not found"),
            ),
            Error::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint does not take that method".into(),
            ),
            Error::Conflict { code, message } => (StatusCode::CONFLICT, code, message.clone()),
            Error::Unprocessable { code, message } => {
                (StatusCode::UNPROCESSABLE_ENTITY, code, message.clone())
            }
            Error::Busy(m) => (StatusCode::SERVICE_UNAVAILABLE, "busy", m.clone()),
            Error::Disabled { code, message } => {
                (StatusCode::SERVICE_UNAVAILABLE, code, message.clone())
            }
            Error::NoCapacity(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "no_capacity",
                "no capacity to start an instance right now; try again shortly".into(),
            ),
            Error::Timeout(_) => (
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                "the operation did not finish in time".into(),
            ),
            Error::Storage(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "storage_unavailable",
                "the archive store is unavailable; try again shortly".into(),
            ),
            Error::Database(_) | Error::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error".into(),
            ),
        }
    }

    /// Maps a unique-violation on `constraint` to a conflict, anything else
    /// stays a database error.
    pub fn on_unique(e: sqlx::Error, constraint: &str, code: &'static str, message: &str) -> Self {
        match &e {
            sqlx::Error::Database(db) if db.constraint() == Some(constraint) => Error::Conflict {
                code,
                message: message.into(),
            },
            _ => Error::Database(e),
        }
    }
}
