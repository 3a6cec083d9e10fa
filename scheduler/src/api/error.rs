//! The one mapping of `Error` to an HTTP answer: `{error: {code, message}}`
//! with the error's status (and `Retry-After` where a retry can help).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::views::{ErrorBody, ErrorDetail};
use crate::error::Error;

impl Error {
    /// The status and body a client gets for this error.
    pub fn answer(&self) -> (StatusCode, ErrorBody) {
        let (status, code, message) = self.public();
        (
            status,
            ErrorBody {
                error: ErrorDetail {
                    code: code.to_owned(),
                    message,
                },
            },
        )
    }

    /// `answer`, with the detail logged (server errors as errors).
    pub fn answer_logged(&self) -> (StatusCode, ErrorBody) {
        let (status, body) = self.answer();
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        } else {
            tracing::debug!(error = %self, "request refused");
        }
        (status, body)
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let (status, body) = self.answer_logged();
        let mut resp = (status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after() {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}
