//! `/api/account`: the signed-in customer's own account: its profile, its
//! sessions, its security log, its second factor, its export and its
//! deletion. Changes that matter ask for the
//! password again (sudo), whatever the session.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::Deserialize;
use uuid::Uuid;

use super::auth::bounded;
use super::extract::{ApiJson, AuthUser, RequestClient};
use super::views::{
    AnyObject, DeletionScheduled, ErrorBody, MfaSetupView, ProfileView, RecoveryCodes, Resent,
    SecurityLogPage, SessionInfo, SessionList, SessionsEnded,
};
use crate::accounts::{mfa, profile, security_log, sessions};
use crate::app::AppRef;
use crate::error::Result;

#[utoipa::path(get, path = "/api/account", tag = "account", security(("bearer" = [])),
    responses(
        (status = 200, description = "The account's profile", body = ProfileView),
        (status = 401, description = "No valid token", body = ErrorBody),
    ))]
pub async fn profile(State(app): State<AppRef>, user: AuthUser) -> Result<axum::Json<ProfileView>> {
    Ok(axum::Json(profile::get(&app.db, user.id).await?.into()))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProfileChanges {
    #[schema(max_length = 100)]
    name: Option<String>,
    /// An IANA time zone name, such as `Europe/Berlin`.
    #[schema(max_length = 64)]
    timezone: Option<String>,
}

#[utoipa::path(patch, path = "/api/account", tag = "account", security(("bearer" = [])),
    request_body = ProfileChanges,
    responses(
        (status = 200, description = "The profile after the change; absent fields are kept", body = ProfileView),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 422, description = "A name over 100 characters or with control characters, or a time zone that is not an IANA name", body = ErrorBody),
    ))]
pub async fn update_profile(
    State(app): State<AppRef>,
    user: AuthUser,
    RequestClient(client): RequestClient,
    ApiJson(b): ApiJson<ProfileChanges>,
) -> Result<axum::Json<ProfileView>> {
    let changes = profile::Changes {
        name: b.name.as_deref(),
        timezone: b.timezone.as_deref(),
    };
    Ok(axum::Json(
        profile::update(&app, user.id, changes, &client)
            .await?
            .into(),
    ))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeleteAccount {
    #[schema(max_length = 256)]
    password: String,
    /// With two-factor sign-in on: a code from the app or a recovery code.
    #[schema(max_length = 40)]
    code: Option<String>,
}

/// Deletes the account after a 30-day grace: every session ends now, the
/// gateway is paused with its data, the subscription is set to end with
/// its period, and a link that undoes it all is mailed (signing in again
/// undoes it too). After the grace the gateway, its data and domains and
/// the account's personal data are deleted.
#[utoipa::path(delete, path = "/api/account", tag = "account", security(("bearer" = [])),
    request_body = DeleteAccount,
    responses(
        (status = 202, description = "The deletion is scheduled; this session has ended", body = DeletionScheduled),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Wrong password (wrong_password)", body = ErrorBody),
        (status = 422, description = "Two-factor sign-in is on and no code was given (invalid_field), or a wrong one (wrong_code)", body = ErrorBody),
        (status = 429, description = "Too many wrong passwords in the last hour", body = ErrorBody),
    ))]
pub async fn delete_account(
    State(app): State<AppRef>,
    user: AuthUser,
    RequestClient(client): RequestClient,
    ApiJson(b): ApiJson<DeleteAccount>,
) -> Result<(StatusCode, axum::Json<DeletionScheduled>)> {
    let code = b.code.as_deref().map(bounded).transpose()?;
    crate::lifecycle::deletion::request(&app, user.id, b.password, code, &client).await?;
    let grace = chrono::Duration::days(i64::from(crate::accounts::deletion::GRACE_DAYS));
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(DeletionScheduled {
            erase_after: chrono::Utc::now() + grace,
            message: "Your account will be deleted in 30 days. Sign in again, or use the link we mailed you, to keep it.",
        }),
    ))
}

/// The account's own data as JSON: profile, sessions, security log,
/// instances, domains and billing (GDPR's right of access).
#[utoipa::path(get, path = "/api/account/export", tag = "account", security(("bearer" = [])),
    responses(
        (status = 200, description = "The account's data, as a JSON attachment", body = AnyObject),
        (status = 401, description = "No valid token", body = ErrorBody),
    ))]
pub async fn export(
    State(app): State<AppRef>,
    user: AuthUser,
) -> Result<impl axum::response::IntoResponse> {
    let data = crate::accounts::deletion::export(&app.db, user.id).await?;
    Ok((
        [(
            axum::http::header::CONTENT_DISPOSITION,
            "attachment; filename=\"clawdeploy-account.json\"",
        )],
        axum::Json(data),
    ))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EmailChange {
    #[schema(format = "email", max_length = 254)]
    new_email: String,
    #[schema(max_length = 256)]
    password: String,
}

/// Asks to move the account to a new address: a link goes to it (valid 24
/// hours), a notice to the current one; the move happens when the link is
/// used (`POST /api/auth/verify-email`).
#[utoipa::path(post, path = "/api/account/email", tag = "account", security(("bearer" = [])),
    request_body = EmailChange,
    responses(
        (status = 202, description = "The link is on its way to the new address", body = Resent),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Wrong password (wrong_password), or the current address is not proven yet (email_unverified)", body = ErrorBody),
        (status = 409, description = "Another account uses the new address (email_taken)", body = ErrorBody),
        (status = 422, description = "Not an email address, or the current one", body = ErrorBody),
        (status = 429, description = "Too many links asked for in the last hour, or too many wrong passwords", body = ErrorBody),
    ))]
pub async fn change_email(
    State(app): State<AppRef>,
    user: AuthUser,
    RequestClient(client): RequestClient,
    ApiJson(b): ApiJson<EmailChange>,
) -> Result<(StatusCode, axum::Json<Resent>)> {
    profile::change_email(&app, user.id, &b.new_email, b.password, &client).await?;
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(Resent {
            message: "A link is on its way to the new address; the account moves when it is used.",
        }),
    ))
}

#[utoipa::path(get, path = "/api/account/sessions", tag = "account", security(("bearer" = [])),
    responses(
        (status = 200, description = "The account's live sessions, the most recently used first", body = SessionList),
        (status = 401, description = "No valid token", body = ErrorBody),
    ))]
pub async fn sessions(
    State(app): State<AppRef>,
    user: AuthUser,
) -> Result<axum::Json<SessionList>> {
    let listed = sessions::list(&app.db, user.id).await?;
    Ok(axum::Json(SessionList {
        sessions: listed
            .into_iter()
            .map(|s| SessionInfo::of(s, user.session_id))
            .collect(),
    }))
}

/// Ends one session (this one too, if named).
#[utoipa::path(delete, path = "/api/account/sessions/{id}", tag = "account", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The session's id, from the list")),
    responses(
        (status = 204, description = "The session ended"),
        (status = 400, description = "Not a session id", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No live session of this account has this id", body = ErrorBody),
    ))]
pub async fn revoke_session(
    State(app): State<AppRef>,
    user: AuthUser,
    RequestClient(client): RequestClient,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    let id = Uuid::parse_str(&id)
        .map_err(|_| crate::error::Error::BadRequest("the session id is not a UUID".into()))?;
    sessions::revoke(&app.db, user.id, id, &client).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Signs out everywhere: every session of the account ends, this one too.
#[utoipa::path(delete, path = "/api/account/sessions", tag = "account", security(("bearer" = [])),
    responses(
        (status = 200, description = "Every session ended", body = SessionsEnded),
        (status = 401, description = "No valid token", body = ErrorBody),
    ))]
pub async fn sign_out_everywhere(
    State(app): State<AppRef>,
    user: AuthUser,
    RequestClient(client): RequestClient,
) -> Result<axum::Json<SessionsEnded>> {
    let sessions_ended = sessions::revoke_all(&app.db, user.id, &client).await?;
    Ok(axum::Json(SessionsEnded { sessions_ended }))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogQuery {
    /// Lines older than this id (`nextBefore` of the page before).
    before: Option<i64>,
    /// Lines per page, 1 to 100 (50 when absent).
    limit: Option<i64>,
}

#[utoipa::path(get, path = "/api/account/security-log", tag = "account", security(("bearer" = [])),
    params(LogQuery),
    responses(
        (status = 200, description = "Sign-ins, MFA and password changes, sessions ended, …: newest first, kept a year", body = SecurityLogPage),
        (status = 400, description = "before or limit is not a number", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
    ))]
pub async fn security_log(
    State(app): State<AppRef>,
    user: AuthUser,
    query: std::result::Result<Query<LogQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::Json<SecurityLogPage>> {
    let Query(q) = query.map_err(|e| crate::error::Error::BadRequest(e.body_text()))?;
    let limit = q.limit.unwrap_or(50).clamp(1, security_log::PAGE_MAX);
    let entries = security_log::page(&app.db, user.id, q.before, limit).await?;
    let next_before = (entries.len() as i64 == limit)
        .then(|| entries.last().map(|e| e.id))
        .flatten();
    Ok(axum::Json(SecurityLogPage {
        events: entries.into_iter().map(Into::into).collect(),
        next_before,
    }))
}

/// The account's password, asked again.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Sudo {
    #[schema(max_length = 256)]
    password: String,
}

/// Starts turning on two-factor sign-in: a new secret for an
/// authenticator app. Nothing changes until a code is confirmed.
#[utoipa::path(post, path = "/api/account/mfa/totp", tag = "account", security(("bearer" = [])),
    request_body = Sudo,
    responses(
        (status = 200, description = "The secret, its otpauth URL and a QR code of it", body = MfaSetupView),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Wrong password (wrong_password)", body = ErrorBody),
        (status = 409, description = "Two-factor sign-in is already on (mfa_enabled)", body = ErrorBody),
        (status = 429, description = "Too many wrong passwords in the last hour", body = ErrorBody),
    ))]
pub async fn mfa_begin(
    State(app): State<AppRef>,
    user: AuthUser,
    ApiJson(b): ApiJson<Sudo>,
) -> Result<axum::Json<MfaSetupView>> {
    Ok(axum::Json(
        mfa::begin(&app, user.id, b.password).await?.into(),
    ))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MfaCode {
    /// Six digits from the authenticator app.
    #[schema(max_length = 20)]
    code: String,
}

/// Turns two-factor sign-in on with a code from the app; answers the ten
/// recovery codes, shown this once.
#[utoipa::path(post, path = "/api/account/mfa/totp/confirm", tag = "account", security(("bearer" = [])),
    request_body = MfaCode,
    responses(
        (status = 200, description = "Two-factor sign-in is on; the recovery codes", body = RecoveryCodes),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 409, description = "Already on (mfa_enabled), or not set up first (mfa_setup_missing)", body = ErrorBody),
        (status = 422, description = "A wrong or too old code (wrong_code)", body = ErrorBody),
    ))]
pub async fn mfa_confirm(
    State(app): State<AppRef>,
    user: AuthUser,
    RequestClient(client): RequestClient,
    ApiJson(b): ApiJson<MfaCode>,
) -> Result<axum::Json<RecoveryCodes>> {
    let codes = mfa::confirm(&app, user.id, bounded(&b.code)?, &client).await?;
    Ok(axum::Json(RecoveryCodes {
        mfa_enabled: true,
        recovery_codes: codes,
    }))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MfaOff {
    #[schema(max_length = 256)]
    password: String,
    /// A code from the app, or one of the recovery codes.
    #[schema(max_length = 40)]
    code: String,
}

/// Turns two-factor sign-in off: the password and a code again.
#[utoipa::path(delete, path = "/api/account/mfa/totp", tag = "account", security(("bearer" = [])),
    request_body = MfaOff,
    responses(
        (status = 204, description = "Two-factor sign-in is off; the recovery codes no longer work"),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Wrong password (wrong_password)", body = ErrorBody),
        (status = 409, description = "It is not on (mfa_not_enabled)", body = ErrorBody),
        (status = 422, description = "A wrong, used or too old code (wrong_code)", body = ErrorBody),
        (status = 429, description = "Too many wrong passwords in the last hour", body = ErrorBody),
    ))]
pub async fn mfa_disable(
    State(app): State<AppRef>,
    user: AuthUser,
    RequestClient(client): RequestClient,
    ApiJson(b): ApiJson<MfaOff>,
) -> Result<StatusCode> {
    mfa::disable(&app, user.id, b.password, bounded(&b.code)?, &client).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A new set of ten recovery codes; the old set stops working.
#[utoipa::path(post, path = "/api/account/mfa/recovery-codes", tag = "account", security(("bearer" = [])),
    request_body = Sudo,
    responses(
        (status = 200, description = "The new codes, shown this once", body = RecoveryCodes),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Wrong password (wrong_password)", body = ErrorBody),
        (status = 409, description = "Two-factor sign-in is not on (mfa_not_enabled)", body = ErrorBody),
        (status = 429, description = "Too many wrong passwords in the last hour", body = ErrorBody),
    ))]
pub async fn recovery_codes(
    State(app): State<AppRef>,
    user: AuthUser,
    RequestClient(client): RequestClient,
    ApiJson(b): ApiJson<Sudo>,
) -> Result<axum::Json<RecoveryCodes>> {
    let codes = mfa::regenerate(&app, user.id, b.password, &client).await?;
    Ok(axum::Json(RecoveryCodes {
        mfa_enabled: true,
        recovery_codes: codes,
    }))
}
