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
    /// The account's password, asked again before a sensitive change, was
    /// wrong.
    #[error("wrong password")]
    WrongPassword,
    /// A wrong, malformed or already used second-factor code.
    #[error("wrong code")]
    WrongCode,
    /// An MFA login token that is unknown, expired, used or out of tries.
    #[error("MFA token unknown, expired or out of tries")]
    MfaTokenInvalid,
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// Not allowed on this account's plan.
    #[error("plan required: {0}")]
    PlanRequired(String),
    /// Not allowed until the account's email address is proven.
    #[error("the account's email address is not verified")]
    EmailUnverified,
    /// A link's token that is unknown, used or expired.
    #[error("invalid token: {0}")]
    InvalidToken(&'static str),
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
    /// The customer's bank declined a charge (Stripe's reason).
    #[error("payment declined: {0}")]
    PaymentDeclined(String),
    /// A capability this deployment has not configured (archives, billing).
    #[error("disabled ({code}): {message}")]
    Disabled { code: &'static str, message: String },
    #[error("no capacity: {0}")]
    NoCapacity(String),
    #[error("timed out: {0}")]
    Timeout(String),
    /// Too many requests of a kind from one client address.
    #[error("rate limited for {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
    /// Connection-level failures (the server restarting or away, the pool
    /// exhausted, a serialization conflict) answer 503 and may be retried;
    /// anything else is a bug and answers 500.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// The object store (state archives) did not answer or refused.
    #[error("object storage: {0}")]
    Storage(String),
    #[error("internal: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A key or sealed value that does not open is our fault, never the
/// caller's: it is an internal error (and logged as one).
impl From<clawdeploy_common::sealed::SealError> for Error {
    fn from(e: clawdeploy_common::sealed::SealError) -> Self {
        Error::Internal(e.to_string())
    }
}

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
            Error::RateLimited { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many requests from this address; try again later".into(),
            ),
            Error::TooManyAttempts => (
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_attempts",
                "too many failed logins; try again later".into(),
            ),
            Error::WrongPassword => (
                StatusCode::FORBIDDEN,
                "wrong_password",
                "that is not the account's password".into(),
            ),
            // Not 401: on the account's own endpoints the session stands.
            Error::WrongCode => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "wrong_code",
                "that code is wrong, already used or too old".into(),
            ),
            Error::MfaTokenInvalid => (
                StatusCode::UNAUTHORIZED,
                "mfa_token_invalid",
                "this sign-in expired or ran out of tries: sign in again with your password"
                    .into(),
            ),
            Error::Forbidden(m) => (StatusCode::FORBIDDEN, "forbidden", m.clone()),
            Error::PlanRequired(m) => (StatusCode::FORBIDDEN, "plan_required", m.clone()),
            Error::EmailUnverified => (
                StatusCode::FORBIDDEN,
                "email_unverified",
                "confirm your email address first: follow the link we mailed you, or ask for a new one (POST /api/auth/resend-verification)".into(),
            ),
            Error::InvalidToken(m) => (StatusCode::BAD_REQUEST, "invalid_token", (*m).into()),
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
            Error::PaymentDeclined(m) => (StatusCode::PAYMENT_REQUIRED, "card_declined", m.clone()),
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
            Error::Database(e) if database_unavailable(e) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "database_unavailable",
                "the database is unavailable; retry shortly (with the same Idempotency-Key)".into(),
            ),
            Error::Database(_) | Error::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error".into(),
            ),
        }
    }

    /// Seconds a client should wait before retrying, when a retry can help.
    pub(crate) fn retry_after(&self) -> Option<u64> {
        match self {
            // At most the limits' one-hour window.
            Error::TooManyAttempts => Some(3600),
            Error::RateLimited { retry_after_secs } => Some((*retry_after_secs).max(1)),
            // The first request is still running: it ends within the claim wait.
            Error::Conflict {
                code: "idempotency_in_progress",
                ..
            } => Some(2),
            // Busy, no capacity, a dependency away: worth a retry soon.
            _ if self.public().0 == StatusCode::SERVICE_UNAVAILABLE => Some(5),
            _ => None,
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

/// Whether a database error is the database being away or overloaded (worth
/// a retry) rather than a fault in the request or the code: lost or refused
/// connections, the pool exhausted, the server shutting down or starting,
/// too many connections, serialization failures and deadlocks, a statement
/// cancelled by the statement timeout.
pub fn database_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|c| {
            // Class 08: connection exception; 57P01-57P03: shutting down or
            // starting; 53300: too many connections; 40001/40P01:
            // serialization failure, deadlock; 57014: statement timeout.
            c.starts_with("08")
                || matches!(
                    &*c,
                    "57P01" | "57P02" | "57P03" | "53300" | "40001" | "40P01" | "57014"
                )
        }),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_connections_are_retryable_503s() {
        let io = Error::Database(sqlx::Error::Io(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        )));
        let (status, code, _) = io.public();
        assert_eq!(
            (status, code),
            (StatusCode::SERVICE_UNAVAILABLE, "database_unavailable")
        );
        assert_eq!(io.retry_after(), Some(5));
        let pool = Error::Database(sqlx::Error::PoolTimedOut);
        assert_eq!(pool.public().0, StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn other_database_errors_stay_500s() {
        let e = Error::Database(sqlx::Error::RowNotFound);
        let (status, code, message) = e.public();
        assert_eq!(
            (status, code),
            (StatusCode::INTERNAL_SERVER_ERROR, "internal")
        );
        assert_eq!(message, "internal error");
        assert_eq!(e.retry_after(), None);
    }

    #[test]
    fn rate_limits_say_when() {
        let e = Error::RateLimited {
            retry_after_secs: 42,
        };
        assert_eq!(e.public().0, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(e.retry_after(), Some(42));
        assert_eq!(Error::TooManyAttempts.retry_after(), Some(3600));
    }
}
