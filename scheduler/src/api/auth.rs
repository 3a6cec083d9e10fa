//! `/api/auth`: register, login (and its second step), logout, email
//! verification and password reset.

use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;

use super::extract::{ApiJson, AuthUser, ClientAddr, RequestClient};
use super::views::{ErrorBody, LoginAnswer, PasswordReset, Resent, SessionView, Undone, Verified};
use crate::accounts;
use crate::app::AppRef;
use crate::error::Result;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    #[schema(format = "email", max_length = 254)]
    email: String,
    #[schema(min_length = 10, max_length = 256)]
    password: String,
}

/// The product spec's register body: email, password and an optional
/// display name (which billing gives Stripe as the customer's name).
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    #[schema(format = "email", max_length = 254)]
    email: String,
    #[schema(min_length = 10, max_length = 256)]
    password: String,
    #[schema(max_length = 100)]
    name: Option<String>,
}

#[utoipa::path(post, path = "/api/auth/register", tag = "accounts", request_body = Registration,
    responses(
        (status = 201, description = "Account created; a session token. A link that proves the address is mailed (valid 24 hours)", body = SessionView),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 409, description = "Email taken", body = ErrorBody),
        (status = 422, description = "Invalid email, password (10 to 256 characters) or name (at most 100 characters, no control characters)", body = ErrorBody),
        (status = 429, description = "Too many registrations from this address in the last hour (`rate_limited`, with Retry-After)", body = ErrorBody),
    ))]
pub async fn register(
    State(app): State<AppRef>,
    RequestClient(client): RequestClient,
    ApiJson(r): ApiJson<Registration>,
) -> Result<(StatusCode, axum::Json<SessionView>)> {
    let session = accounts::register(
        &app,
        accounts::Registration {
            email: &r.email,
            password: r.password,
            name: r.name.as_deref().unwrap_or(""),
            client,
            per_address_per_hour: app.cfg.registrations_per_address_per_hour,
        },
    )
    .await?;
    Ok((StatusCode::CREATED, axum::Json(session.into())))
}

#[utoipa::path(post, path = "/api/auth/login", tag = "accounts", request_body = Credentials,
    responses(
        (status = 200, description = "A session token; or, when the account has two-factor sign-in on, `{mfaRequired: true, mfaToken}` for POST /api/auth/login/mfa. Signing in undoes a pending deletion of the account", body = LoginAnswer),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "Wrong email or password (the same answer for both)", body = ErrorBody),
        (status = 429, description = "Too many failed logins for this account or address in the last hour", body = ErrorBody),
    ))]
pub async fn login(
    State(app): State<AppRef>,
    RequestClient(client): RequestClient,
    ApiJson(c): ApiJson<Credentials>,
) -> Result<axum::Json<LoginAnswer>> {
    let outcome = accounts::login(&app.db, &c.email, c.password, &client).await?;
    if let accounts::LoginOutcome::Session(s) = &outcome {
        crate::lifecycle::deletion::signed_in(&app, s.user_id, &client).await?;
    }
    Ok(axum::Json(outcome.into()))
}

/// The second step of a login: the token the password gave, and a code
/// from the authenticator app or one of the recovery codes.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MfaLogin {
    #[schema(min_length = 1, max_length = 200)]
    mfa_token: String,
    /// Six digits from the authenticator app.
    #[schema(max_length = 20)]
    code: Option<String>,
    /// One of the ten recovery codes (`xxxxx-xxxxx`), instead of `code`.
    #[schema(max_length = 40)]
    recovery_code: Option<String>,
}

#[utoipa::path(post, path = "/api/auth/login/mfa", tag = "accounts", request_body = MfaLogin,
    responses(
        (status = 200, description = "A session token", body = SessionView),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "The MFA token is unknown, expired, used or out of its five tries (mfa_token_invalid): sign in again", body = ErrorBody),
        (status = 422, description = "Neither or both of code and recoveryCode (invalid_field); or a wrong, used or too old code (wrong_code), which spends one of the token's tries", body = ErrorBody),
        (status = 429, description = "Too many failed logins for this account in the last hour", body = ErrorBody),
    ))]
pub async fn login_mfa(
    State(app): State<AppRef>,
    RequestClient(client): RequestClient,
    ApiJson(b): ApiJson<MfaLogin>,
) -> Result<axum::Json<SessionView>> {
    use accounts::mfa::challenge::{finish, SecondFactor};
    let factor = match (&b.code, &b.recovery_code) {
        (Some(code), None) => SecondFactor::Code(bounded(code)?),
        (None, Some(code)) => SecondFactor::RecoveryCode(bounded(code)?),
        _ => {
            return Err(crate::error::Error::Invalid {
                field: "code",
                message: "give either code or recoveryCode".into(),
            })
        }
    };
    let session = finish(&app, bounded(&b.mfa_token)?, factor, &client).await?;
    crate::lifecycle::deletion::signed_in(&app, session.user_id, &client).await?;
    Ok(axum::Json(session.into()))
}

/// `POST /api/auth/logout`: revokes the token the request carries.
#[utoipa::path(post, path = "/api/auth/logout", tag = "accounts", security(("bearer" = [])),
    responses(
        (status = 204, description = "The token is revoked"),
        (status = 401, description = "No valid token", body = ErrorBody),
    ))]
pub async fn logout(State(app): State<AppRef>, user: AuthUser) -> Result<StatusCode> {
    accounts::logout(&app.db, &user.token_hash).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyEmail {
    /// The token from the mailed link (after `#verify-email=`, or
    /// `#undo-deletion=`).
    #[schema(min_length = 1, max_length = 200)]
    token: String,
}

/// Proves the account's address with the token of the mailed link (once,
/// within 24 hours), and resumes its instance if it was suspended for it.
/// A link mailed to a new address (`POST /api/account/email`) moves the
/// account to it.
/// No session is needed: the link may be opened anywhere.
#[utoipa::path(post, path = "/api/auth/verify-email", tag = "accounts", request_body = VerifyEmail,
    responses(
        (status = 200, description = "The address is proven", body = Verified),
        (status = 400, description = "Malformed JSON, or a token that is unknown, used or expired (invalid_token)", body = ErrorBody),
        (status = 409, description = "A new address another account took meanwhile (email_taken)", body = ErrorBody),
    ))]
pub async fn verify_email(
    State(app): State<AppRef>,
    RequestClient(client): RequestClient,
    ApiJson(body): ApiJson<VerifyEmail>,
) -> Result<axum::Json<Verified>> {
    crate::lifecycle::verification::verify_email(&app, bounded(&body.token)?, &client).await?;
    Ok(axum::Json(Verified { verified: true }))
}

/// Mails a new link when the caller's address still needs proving (at
/// most five an hour). The answer is the same whatever the account's state.
#[utoipa::path(post, path = "/api/auth/resend-verification", tag = "accounts", security(("bearer" = [])),
    responses(
        (status = 202, description = "If the address still needs proving, a new link is on its way", body = Resent),
        (status = 401, description = "No valid token", body = ErrorBody),
    ))]
pub async fn resend_verification(
    State(app): State<AppRef>,
    user: AuthUser,
) -> Result<(StatusCode, axum::Json<Resent>)> {
    accounts::verify::resend(&app, user.id).await?;
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(Resent {
            message: "If your address still needs confirming, a new link is on its way.",
        }),
    ))
}

/// Undoes the account's pending deletion with the token of the mailed link
/// (within the 30 days); the gateway resumes with its data. No session is
/// needed.
#[utoipa::path(post, path = "/api/auth/undo-deletion", tag = "accounts", request_body = VerifyEmail,
    responses(
        (status = 200, description = "The deletion is undone; sign in again", body = Undone),
        (status = 400, description = "Malformed JSON, or a token that is unknown, used or expired (invalid_token)", body = ErrorBody),
    ))]
pub async fn undo_deletion(
    State(app): State<AppRef>,
    RequestClient(client): RequestClient,
    ApiJson(body): ApiJson<VerifyEmail>,
) -> Result<axum::Json<Undone>> {
    crate::lifecycle::deletion::undo_by_link(&app, bounded(&body.token)?, &client).await?;
    Ok(axum::Json(Undone { undone: true }))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForgotPassword {
    #[schema(format = "email", max_length = 254)]
    email: String,
}

/// Asks for a password reset link. The answer (status, body, and time: at
/// least a quarter of a second either way) is the same whether or not an
/// account has this email; the link is mailed only if one does.
#[utoipa::path(post, path = "/api/auth/password/forgot", tag = "accounts", request_body = ForgotPassword,
    responses(
        (status = 202, description = "If an account has this email, a link is on its way", body = Resent),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 429, description = "Too many requests for this email or from this address in the last hour (rate_limited, with Retry-After)", body = ErrorBody),
    ))]
pub async fn forgot_password(
    State(app): State<AppRef>,
    ClientAddr(client): ClientAddr,
    ApiJson(body): ApiJson<ForgotPassword>,
) -> Result<(StatusCode, axum::Json<Resent>)> {
    let floor = tokio::time::Instant::now() + accounts::reset::FORGOT_FLOOR;
    let asked = accounts::reset::forgot(&app, &body.email, client).await;
    tokio::time::sleep_until(floor).await;
    asked?;
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(Resent {
            message: "If an account uses this address, a link to reset its password is on its way.",
        }),
    ))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResetPassword {
    /// The token from the mailed link (after `#reset-password=`).
    #[schema(min_length = 1, max_length = 200)]
    token: String,
    #[schema(min_length = 10, max_length = 256)]
    password: String,
}

/// Sets a new password with the mailed link's token (once, within the
/// hour). Every session of the account ends; a notice is mailed.
#[utoipa::path(post, path = "/api/auth/password/reset", tag = "accounts", request_body = ResetPassword,
    responses(
        (status = 200, description = "The password is set; sign in with it", body = PasswordReset),
        (status = 400, description = "Malformed JSON, or a token that is unknown, used or expired (invalid_token)", body = ErrorBody),
        (status = 422, description = "A password the policy refuses (the link still works)", body = ErrorBody),
    ))]
pub async fn reset_password(
    State(app): State<AppRef>,
    RequestClient(client): RequestClient,
    ApiJson(body): ApiJson<ResetPassword>,
) -> Result<axum::Json<PasswordReset>> {
    accounts::reset::reset(&app, bounded(&body.token)?, body.password, &client).await?;
    Ok(axum::Json(PasswordReset { reset: true }))
}

/// A link's token as the domain takes it: one longer than any we make is
/// refused before it is hashed, as an unknown one is.
pub(super) fn bounded(token: &str) -> Result<&str> {
    if token.len() > 200 {
        return Err(crate::error::Error::InvalidToken(
            "this link is unknown, used or expired: ask for a new one",
        ));
    }
    Ok(token)
}
