//! The one mapping of `Error` to a `tonic::Status`, by the HTTP status the
//! error stands for, so both faces of the scheduler agree.

use http::StatusCode;

use crate::error::Error;

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let (status, code, message) = e.public();
        if status.is_server_error() {
            tracing::error!(error = %e, code, "rpc failed");
        }
        let message = format!("{code}: {message}");
        match status {
            StatusCode::UNAUTHORIZED => tonic::Status::unauthenticated(message),
            StatusCode::FORBIDDEN => tonic::Status::permission_denied(message),
            StatusCode::NOT_FOUND => tonic::Status::not_found(message),
            StatusCode::CONFLICT => tonic::Status::already_exists(message),
            StatusCode::BAD_REQUEST
            | StatusCode::UNPROCESSABLE_ENTITY
            | StatusCode::PAYLOAD_TOO_LARGE => tonic::Status::invalid_argument(message),
            StatusCode::SERVICE_UNAVAILABLE => tonic::Status::unavailable(message),
            StatusCode::GATEWAY_TIMEOUT => tonic::Status::deadline_exceeded(message),
            _ => tonic::Status::internal(message),
        }
    }
}
