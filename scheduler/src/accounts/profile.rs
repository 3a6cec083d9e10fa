//! The profile: a display name and an IANA time zone the customer may
//! change at will, and an email address that changes only once the new
//! address proves itself (a link to it; a notice to the old one).

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::security_log::{self, SecurityEvent};
use super::verify::{self, Proof};
use super::{confirm_password, display_name, normalize_email, Client};
use crate::app::App;
use crate::error::{Error, Result};
use crate::mail::templates::Purpose;
use crate::outbox::{self, NewMail};

/// The account as its owner sees it.
#[derive(Debug, sqlx::FromRow)]
pub struct Profile {
    pub id: Uuid,
    pub email: String,
    pub name: String,
    pub timezone: String,
    pub email_verified: bool,
    pub mfa_enabled: bool,
    pub created_at: DateTime<Utc>,
    /// A new address waiting for its link, if any.
    pub pending_email: Option<String>,
}

pub async fn get(db: &sqlx::PgPool, user_id: Uuid) -> Result<Profile> {
    sqlx::query_as(
        "SELECT u.id, u.email, u.name, u.timezone, u.email_verified_at IS NOT NULL AS email_verified,
                u.totp_enabled_at IS NOT NULL AS mfa_enabled, u.created_at,
                (SELECT v.email FROM email_verifications v
                  WHERE v.user_id = u.id AND v.new_email AND v.used_at IS NULL AND v.expires_at > now()
                  ORDER BY v.created_at DESC LIMIT 1) AS pending_email
           FROM users u WHERE u.id = $1",
    )
    .bind(user_id)
    .fetch_optional(db)
    .await?
    .ok_or(Error::Unauthenticated)
}

/// A time zone as stored: an IANA name (`Europe/Berlin`, `UTC`).
pub fn time_zone(raw: &str) -> Result<String> {
    let tz: chrono_tz::Tz = raw.trim().parse().map_err(|_| Error::Invalid {
        field: "timezone",
        message: "not an IANA time zone name (such as Europe/Berlin)".into(),
    })?;
    Ok(tz.name().to_owned())
}

/// What a customer may change at will; absent fields stay as they are.
#[derive(Debug, Default)]
pub struct Changes<'a> {
    pub name: Option<&'a str>,
    pub timezone: Option<&'a str>,
}

pub async fn update(
    app: &App,
    user_id: Uuid,
    changes: Changes<'_>,
    client: &Client,
) -> Result<Profile> {
    let name = changes.name.map(display_name).transpose()?;
    let timezone = changes.timezone.map(time_zone).transpose()?;
    let mut tx = app.db.begin().await?;
    sqlx::query(
        "UPDATE users SET name = COALESCE($2, name), timezone = COALESCE($3, timezone) WHERE id = $1",
    )
    .bind(user_id)
    .bind(&name)
    .bind(&timezone)
    .execute(&mut *tx)
    .await?;
    let fields: Vec<&str> = [("name", name.is_some()), ("timezone", timezone.is_some())]
        .into_iter()
        .filter_map(|(f, set)| set.then_some(f))
        .collect();
    if !fields.is_empty() {
        let detail = serde_json::json!({ "fields": fields });
        security_log::record(
            &mut *tx,
            user_id,
            SecurityEvent::ProfileUpdated,
            client,
            detail,
        )
        .await?;
    }
    tx.commit().await?;
    get(&app.db, user_id).await
}

/// Asks to move the account to `new_email` (the password again): a link
/// to the new address, valid 24 hours, and a notice to the current one.
/// Nothing changes until the link is used (`verify::verify`).
pub async fn change_email(
    app: &App,
    user_id: Uuid,
    new_email: &str,
    password: String,
    client: &Client,
) -> Result<()> {
    verify::require_verified(&app.db, user_id).await?;
    let new_email = normalize_email(new_email)?;
    let current = confirm_password(&app.db, user_id, password).await?;
    if new_email == current {
        return Err(Error::Invalid {
            field: "newEmail",
            message: "that is the account's address already".into(),
        });
    }
    let mut tx = app.db.begin().await?;
    let taken: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM users WHERE email = $1)")
        .bind(&new_email)
        .fetch_one(&mut *tx)
        .await?;
    if taken {
        return Err(Error::Conflict {
            code: "email_taken",
            message: "an account with that email exists".into(),
        });
    }
    if verify::recent_links(&mut tx, user_id).await? >= verify::PER_HOUR {
        return Err(Error::RateLimited {
            retry_after_secs: 3600,
        });
    }
    verify::start(
        &mut tx,
        &app.secrets,
        user_id,
        &new_email,
        Proof::NewAddress,
    )
    .await?;
    let link_id = Uuid::new_v4();
    outbox::enqueue(
        &mut tx,
        &app.secrets,
        NewMail {
            purpose: Purpose::EmailChangeNotice,
            to: &current,
            dedupe_key: format!("email_change_notice:{link_id}"),
            params: serde_json::json!({"newEmail": new_email}),
            secret: None,
        },
    )
    .await?;
    security_log::record(
        &mut *tx,
        user_id,
        SecurityEvent::EmailChangeRequested,
        client,
        serde_json::json!({"to": new_email}),
    )
    .await?;
    tx.commit().await?;
    app.tasks.mail.activate();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::time_zone;

    #[test]
    fn time_zones_are_iana_names() {
        assert_eq!(time_zone("Europe/Berlin").unwrap(), "Europe/Berlin");
        assert_eq!(time_zone(" UTC ").unwrap(), "UTC");
        assert_eq!(
            time_zone("America/Argentina/Buenos_Aires").unwrap(),
            "America/Argentina/Buenos_Aires"
        );
        assert!(time_zone("Mars/Olympus_Mons").is_err());
        assert!(time_zone("").is_err());
        assert!(time_zone("../../etc/passwd").is_err());
    }
}
