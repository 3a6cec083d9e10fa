//! The answers of the account endpoints: sessions, the second factor, the
//! security log, the profile.

use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::accounts::security_log::{Entry, SecurityEvent};
use crate::accounts::sessions::Listed;

#[derive(Serialize, ToSchema)]
pub struct UserView {
    pub id: Uuid,
    pub email: String,
}

/// A new session: the bearer token lasts 7 days unless revoked.
#[derive(Serialize, ToSchema)]
pub struct SessionView {
    pub user: UserView,
    pub token: String,
}

impl From<crate::accounts::Session> for SessionView {
    fn from(s: crate::accounts::Session) -> Self {
        SessionView {
            user: UserView {
                id: s.user_id,
                email: s.email,
            },
            token: s.token,
        }
    }
}

/// An address proven.
#[derive(Serialize, ToSchema)]
pub struct Verified {
    pub verified: bool,
}

/// The answer to a request for a new verification link.
#[derive(Serialize, ToSchema)]
pub struct Resent {
    pub message: &'static str,
}

/// A password set with a reset link.
#[derive(Serialize, ToSchema)]
pub struct PasswordReset {
    pub reset: bool,
}

/// What a login answers: a session, or, when the account has two-factor
/// sign-in on, the token of the second step (`POST /api/auth/login/mfa`).
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum LoginAnswer {
    Session(SessionView),
    MfaRequired(MfaRequired),
}

impl From<crate::accounts::LoginOutcome> for LoginAnswer {
    fn from(o: crate::accounts::LoginOutcome) -> Self {
        match o {
            crate::accounts::LoginOutcome::Session(s) => LoginAnswer::Session(s.into()),
            crate::accounts::LoginOutcome::MfaRequired { mfa_token } => {
                LoginAnswer::MfaRequired(MfaRequired {
                    mfa_required: true,
                    mfa_token,
                    expires_in_secs: 60 * crate::accounts::mfa::challenge::VALID_MINUTES as u32,
                    tries: crate::accounts::mfa::challenge::TRIES as u32,
                })
            }
        }
    }
}

/// The password was right; a code is needed to finish.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MfaRequired {
    /// Always `true`.
    pub mfa_required: bool,
    pub mfa_token: String,
    /// How long the token works.
    pub expires_in_secs: u32,
    /// How many codes may be tried with it.
    pub tries: u32,
}

/// What an authenticator app needs. Nothing changes until a code from it
/// is confirmed.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MfaSetupView {
    /// The secret in base32, to type in by hand.
    pub secret: String,
    /// The `otpauth://totp/…` URL the QR code holds.
    pub otpauth_url: String,
    /// The QR code, as a `data:image/png;base64,…` URL.
    pub qr_png: String,
}

impl From<crate::accounts::mfa::Setup> for MfaSetupView {
    fn from(s: crate::accounts::mfa::Setup) -> Self {
        MfaSetupView {
            secret: s.secret,
            otpauth_url: s.otpauth_url,
            qr_png: s.qr_png,
        }
    }
}

/// Ten single-use recovery codes, shown this once; any earlier set no
/// longer works.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryCodes {
    pub mfa_enabled: bool,
    pub recovery_codes: Vec<String>,
}

/// A live session of the account.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionInfo {
    pub id: Uuid,
    pub created_at: DateTime<Utc>,
    /// To the minute.
    pub last_used_at: Option<DateTime<Utc>>,
    pub address: Option<String>,
    pub user_agent: String,
    /// Whether it is the session of this request.
    pub current: bool,
}

impl SessionInfo {
    pub fn of(s: Listed, current: Uuid) -> Self {
        SessionInfo {
            current: s.id == current,
            id: s.id,
            created_at: s.created_at,
            last_used_at: s.last_used_at,
            address: s.address,
            user_agent: s.user_agent,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct SessionList {
    pub sessions: Vec<SessionInfo>,
}

/// How many sessions ended.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionsEnded {
    pub sessions_ended: u64,
}

/// One line of the security log.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecurityLogEntry {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub event: SecurityEvent,
    pub address: Option<String>,
    pub user_agent: String,
    /// What else the event says (never a secret): e.g. `step` of a failed
    /// login, `mfa` of a successful one.
    #[schema(value_type = Object)]
    pub detail: serde_json::Value,
}

impl From<Entry> for SecurityLogEntry {
    fn from(e: Entry) -> Self {
        SecurityLogEntry {
            id: e.id,
            at: e.at,
            event: e.kind,
            address: e.address,
            user_agent: e.user_agent,
            detail: e.detail.0,
        }
    }
}

/// A page of the security log, newest first.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecurityLogPage {
    pub events: Vec<SecurityLogEntry>,
    /// Pass as `before` for the next (older) page; absent on the last.
    pub next_before: Option<i64>,
}

/// The account as its owner sees it.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProfileView {
    pub id: Uuid,
    pub email: String,
    pub name: String,
    /// An IANA time zone name.
    pub timezone: String,
    pub email_verified: bool,
    pub mfa_enabled: bool,
    pub created_at: DateTime<Utc>,
    /// A new address waiting for its confirmation link, if any.
    pub pending_email: Option<String>,
}

impl From<crate::accounts::profile::Profile> for ProfileView {
    fn from(p: crate::accounts::profile::Profile) -> Self {
        ProfileView {
            id: p.id,
            email: p.email,
            name: p.name,
            timezone: p.timezone,
            email_verified: p.email_verified,
            mfa_enabled: p.mfa_enabled,
            created_at: p.created_at,
            pending_email: p.pending_email,
        }
    }
}

/// A deletion undone.
#[derive(Serialize, ToSchema)]
pub struct Undone {
    pub undone: bool,
}

/// A deletion asked for.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeletionScheduled {
    /// When the account's data will be erased, unless the deletion is
    /// undone (the mailed link, or signing in) before then.
    pub erase_after: DateTime<Utc>,
    pub message: &'static str,
}
