//! The outbox: a mail is written in the same transaction as the event that
//! causes it, under a key unique to that cause (a retried transaction, or a
//! second report of the same event, never mails twice), and a background
//! task sends what is due (`background/mail.rs`). A server that is away or
//! busy only delays mail, with backoff; one that refuses a message for good
//! marks it failed. Each row is leased while it is sent, so two schedulers
//! never send it at once; a process that dies after the server took a
//! message but before the row was marked sends it again after the lease
//! (SMTP gives no way to ask whether it arrived).

use std::time::Duration;

use sqlx::types::Json;
use uuid::Uuid;

use crate::app::App;
use crate::crypto::aad;
use crate::error::Result;
use crate::mail::templates::{self, Mail, Purpose};
use crate::mail::{MailError, Mailer};

/// How long a row being sent is kept from other senders.
const LEASE: Duration = Duration::from_secs(300);
/// The longest wait between two tries of a mail the server did not take.
const RETRY_CAP: Duration = Duration::from_secs(300);
/// A mail the server has not taken after this long is given up.
const GIVE_UP_AFTER: Duration = Duration::from_secs(3 * 24 * 3600);

/// The statement that writes "your gateway is live", once per instance,
/// for the instances the SQL text `$ids` selects: one text for a single
/// completion and for a report's bulk completion (`lifecycle::complete`).
macro_rules! gateway_live_mail {
    ($ids:literal) => {
        concat!(
            "INSERT INTO outbox (purpose, recipient, dedupe_key, params)
         SELECT 'gateway_live', u.email, 'gateway_live:' || i.id,
                jsonb_build_object('instanceId', i.id, 'subdomain', i.subdomain)
           FROM instances i JOIN users u ON u.id = i.user_id
          WHERE i.id IN (",
            $ids,
            ")
         ON CONFLICT (dedupe_key) DO NOTHING"
        )
    };
}
pub(crate) use gateway_live_mail;

/// "Your gateway is live", once per instance, for `instances` that just
/// became ready (inside the transaction that made them ready).
pub async fn gateway_live(tx: &mut sqlx::PgConnection, instances: &[Uuid]) -> Result<()> {
    if instances.is_empty() {
        return Ok(());
    }
    sqlx::query(gateway_live_mail!("SELECT unnest($1::uuid[])"))
        .bind(instances)
        .execute(tx)
        .await?;
    Ok(())
}

/// A mail to queue.
pub struct NewMail<'a> {
    pub purpose: Purpose,
    pub to: &'a str,
    /// Names the cause: a second mail with the same key is not written.
    pub dedupe_key: String,
    pub params: serde_json::Value,
    /// A secret the mail carries (a link's token): sealed under the KEK
    /// until the mail is sent, then dropped.
    pub secret: Option<&'a str>,
}

/// Queues a mail inside the caller's transaction; `false` when its cause
/// already had one.
pub async fn enqueue(
    tx: &mut sqlx::PgConnection,
    secrets: &crate::crypto::SecretBox,
    mail: NewMail<'_>,
) -> Result<bool> {
    let sealed = mail
        .secret
        .map(|s| secrets.seal(&aad::outbox_secret(&mail.dedupe_key), s.as_bytes()))
        .transpose()?;
    let written = sqlx::query(
        "INSERT INTO outbox (purpose, recipient, dedupe_key, params, secret_enc)
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (dedupe_key) DO NOTHING",
    )
    .bind(mail.purpose)
    .bind(mail.to)
    .bind(&mail.dedupe_key)
    .bind(Json(&mail.params))
    .bind(sealed)
    .execute(tx)
    .await?
    .rows_affected();
    Ok(written == 1)
}

/// Queues the mail that carries a link's `token` (sealed until it is
/// sent) inside the caller's transaction, keyed by the token's digest: one
/// mail per link, however often its cause is retried.
pub async fn enqueue_link(
    tx: &mut sqlx::PgConnection,
    secrets: &crate::crypto::SecretBox,
    purpose: Purpose,
    to: &str,
    token: &str,
    params: serde_json::Value,
) -> Result<bool> {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(token.as_bytes());
    let mail = NewMail {
        purpose,
        to,
        dedupe_key: format!("{}:{}", purpose.as_str(), hex::encode(&digest[..16])),
        params,
        secret: Some(token),
    };
    enqueue(tx, secrets, mail).await
}

/// Queues a mail without secrets to an account's current address inside
/// the caller's transaction (none once the account is erased); `false`
/// when its cause already had one.
pub async fn enqueue_to_account(
    tx: &mut sqlx::PgConnection,
    user_id: uuid::Uuid,
    purpose: Purpose,
    dedupe_key: String,
    params: serde_json::Value,
) -> Result<bool> {
    let written = sqlx::query(
        "INSERT INTO outbox (purpose, recipient, dedupe_key, params)
         SELECT $1, email, $3, $4 FROM users WHERE id = $2 AND purged_at IS NULL
         ON CONFLICT (dedupe_key) DO NOTHING",
    )
    .bind(purpose)
    .bind(user_id)
    .bind(&dedupe_key)
    .bind(Json(&params))
    .execute(tx)
    .await?
    .rows_affected();
    Ok(written == 1)
}

/// A due mail, leased to this sender.
#[derive(sqlx::FromRow)]
struct Due {
    id: i64,
    purpose: Purpose,
    recipient: String,
    params: Json<serde_json::Value>,
    dedupe_key: String,
    secret_enc: Option<Vec<u8>>,
    attempts: i32,
    given_up: bool,
}

/// What a pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pass {
    pub sent: usize,
    pub failed: usize,
    /// Left for later: the server was away (this one and the rest of the
    /// pass).
    pub deferred: usize,
}

/// Sends up to `limit` due mails through `mailer`. The first transient
/// failure ends the pass: the server is away, and the rest wait with it.
pub async fn send_due<M: Mailer>(app: &App, mailer: &M, limit: i64) -> Result<Pass> {
    let due: Vec<Due> = sqlx::query_as(
        "UPDATE outbox o SET next_attempt_at = now() + make_interval(secs => $2)
          WHERE o.id IN (SELECT id FROM outbox
                          WHERE state = 'pending' AND next_attempt_at <= now()
                          ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
         RETURNING o.id, o.purpose, o.recipient, o.params, o.dedupe_key, o.secret_enc, o.attempts,
                   o.created_at < now() - make_interval(secs => $3) AS given_up",
    )
    .bind(limit)
    .bind(LEASE.as_secs_f64())
    .bind(GIVE_UP_AFTER.as_secs_f64())
    .fetch_all(&app.db)
    .await?;
    let mut pass = Pass::default();
    let mut rest = due.iter();
    for mail in rest.by_ref() {
        let rendered = render(app, mail);
        let outcome = match rendered {
            Some(r) => mailer.send(&r).await,
            None => Err(MailError::Permanent(format!(
                "the {} mail's parameters are not readable",
                mail.purpose.as_str()
            ))),
        };
        match outcome {
            Ok(()) => {
                mark(app, mail.id, "sent", None, None).await?;
                metrics::counter!("clawdeploy_mail_sent_total", "purpose" => mail.purpose.as_str())
                    .increment(1);
                pass.sent += 1;
            }
            Err(MailError::Transient(why)) if !mail.given_up => {
                let wait = retry_after(mail.attempts + 1);
                mark(app, mail.id, "pending", Some(&why), Some(wait)).await?;
                metrics::counter!("clawdeploy_mail_failed_total", "purpose" => mail.purpose.as_str(), "kind" => "transient")
                    .increment(1);
                tracing::warn!(
                    mail = mail.id,
                    purpose = mail.purpose.as_str(),
                    error = why,
                    retry_in_secs = wait.as_secs(),
                    "mail not sent; the outbox keeps it"
                );
                pass.deferred += 1;
                break;
            }
            Err(e) => {
                let why = e.to_string();
                mark(app, mail.id, "failed", Some(&why), None).await?;
                metrics::counter!("clawdeploy_mail_failed_total", "purpose" => mail.purpose.as_str(), "kind" => "permanent")
                    .increment(1);
                tracing::error!(
                    mail = mail.id,
                    purpose = mail.purpose.as_str(),
                    error = why,
                    "mail given up"
                );
                pass.failed += 1;
            }
        }
    }
    // Not tried: the server went away. They wait as long as the one that
    // failed, without counting a try.
    let untried: Vec<i64> = rest.map(|m| m.id).collect();
    if !untried.is_empty() {
        sqlx::query(
            "UPDATE outbox SET next_attempt_at = now() + make_interval(secs => $2) WHERE id = ANY($1)",
        )
        .bind(&untried)
        .bind(retry_after(1).as_secs_f64())
        .execute(&app.db)
        .await?;
        pass.deferred += untried.len();
    }
    Ok(pass)
}

/// The wait before try number `attempt + 1`: 2, 4, 8 … seconds, at most
/// `RETRY_CAP`.
fn retry_after(attempt: i32) -> Duration {
    let exp = u32::try_from(attempt.clamp(1, 16)).unwrap_or(16);
    Duration::from_secs(2u64.saturating_pow(exp)).min(RETRY_CAP)
}

async fn mark(
    app: &App,
    id: i64,
    state: &str,
    error: Option<&str>,
    retry_in: Option<Duration>,
) -> Result<()> {
    sqlx::query(
        "UPDATE outbox SET state = $2, attempts = attempts + 1, last_error = $3,
                sent_at = CASE WHEN $2 = 'sent' THEN now() END,
                secret_enc = CASE WHEN $2 = 'pending' THEN secret_enc END,
                next_attempt_at = now() + make_interval(secs => $4)
          WHERE id = $1",
    )
    .bind(id)
    .bind(state)
    .bind(error)
    .bind(retry_in.unwrap_or_default().as_secs_f64())
    .execute(&app.db)
    .await?;
    Ok(())
}

/// The message for a due row, its links from the configuration (and its
/// secret opened); `None` when its parameters or secret cannot be read.
fn render(app: &App, mail: &Due) -> Option<crate::mail::Rendered> {
    let origin = app.cfg.public_origin.trim_end_matches('/');
    let dashboard = format!("{origin}/");
    let secret = match &mail.secret_enc {
        Some(sealed) => Some(
            app.secrets
                .open_string(&aad::outbox_secret(&mail.dedupe_key), sealed)
                .ok()?,
        ),
        None => None,
    };
    match mail.purpose {
        Purpose::GatewayLive => {
            let subdomain = mail.params.0.get("subdomain")?.as_str()?;
            let url = app.cfg.url_of(subdomain);
            Some(templates::render(
                &mail.recipient,
                &Mail::GatewayLive {
                    url: &url,
                    dashboard: &dashboard,
                },
            ))
        }
        Purpose::PasswordReset => {
            let link = format!("{origin}/#reset-password={}", secret?);
            let valid_minutes = u32::try_from(mail.params.0.get("validMinutes")?.as_u64()?).ok()?;
            Some(templates::render(
                &mail.recipient,
                &Mail::PasswordReset {
                    link: &link,
                    valid_minutes,
                },
            ))
        }
        Purpose::ConfirmEmailChange => {
            let link = format!("{origin}/#verify-email={}", secret?);
            let valid_hours = u32::try_from(mail.params.0.get("validHours")?.as_u64()?).ok()?;
            Some(templates::render(
                &mail.recipient,
                &Mail::ConfirmEmailChange {
                    link: &link,
                    valid_hours,
                },
            ))
        }
        Purpose::EmailChangeNotice => Some(templates::render(
            &mail.recipient,
            &Mail::EmailChangeNotice {
                new_email: mail.params.0.get("newEmail")?.as_str()?,
                dashboard: &dashboard,
            },
        )),
        Purpose::DeletionRequested => {
            let link = format!("{origin}/#undo-deletion={}", secret?);
            let grace_days = u32::try_from(mail.params.0.get("graceDays")?.as_u64()?).ok()?;
            Some(templates::render(
                &mail.recipient,
                &Mail::DeletionRequested {
                    link: &link,
                    grace_days,
                },
            ))
        }
        Purpose::PaymentFailed => Some(templates::render(
            &mail.recipient,
            &Mail::PaymentFailed {
                dashboard: &dashboard,
            },
        )),
        Purpose::GraceEnding => {
            let ends = mail.params.0.get("graceUntil")?.as_str()?;
            let tier = mail.params.0.get("tier")?.as_str()?;
            Some(templates::render(
                &mail.recipient,
                &Mail::GraceEnding {
                    ends,
                    tier,
                    dashboard: &dashboard,
                },
            ))
        }
        Purpose::MessagesNearLimit => {
            let used = mail.params.0.get("used")?.as_str()?;
            let limit = mail.params.0.get("limit")?.as_str()?;
            Some(templates::render(
                &mail.recipient,
                &Mail::MessagesNearLimit {
                    used,
                    limit,
                    dashboard: &dashboard,
                },
            ))
        }
        Purpose::CreditsLow => {
            let left = mail.params.0.get("left")?.as_str()?;
            let bought = mail.params.0.get("bought")?.as_str()?;
            Some(templates::render(
                &mail.recipient,
                &Mail::CreditsLow {
                    left,
                    bought,
                    dashboard: &dashboard,
                },
            ))
        }
        Purpose::DeletionUndone => Some(templates::render(
            &mail.recipient,
            &Mail::DeletionUndone {
                dashboard: &dashboard,
            },
        )),
        Purpose::MfaEnabled | Purpose::MfaDisabled => Some(templates::render(
            &mail.recipient,
            &Mail::MfaChanged {
                on: mail.purpose == Purpose::MfaEnabled,
                dashboard: &dashboard,
            },
        )),
        Purpose::PasswordChanged => Some(templates::render(
            &mail.recipient,
            &Mail::PasswordChanged {
                dashboard: &dashboard,
            },
        )),
        Purpose::VerifyEmail => {
            // In the fragment: a browser never sends it to a server, nor
            // in a Referer.
            let link = format!("{origin}/#verify-email={}", secret?);
            let valid_hours = u32::try_from(mail.params.0.get("validHours")?.as_u64()?).ok()?;
            Some(templates::render(
                &mail.recipient,
                &Mail::VerifyEmail {
                    link: &link,
                    valid_hours,
                },
            ))
        }
    }
}

/// Exports how many mails wait and how long the oldest has waited.
pub async fn export_gauges(app: &App) -> Result<()> {
    let (pending, oldest): (i64, Option<f64>) = sqlx::query_as(
        "SELECT count(*), extract(epoch FROM now() - min(created_at))::float8
           FROM outbox WHERE state = 'pending'",
    )
    .fetch_one(&app.db)
    .await?;
    metrics::gauge!("clawdeploy_mail_outbox_pending").set(pending as f64);
    metrics::gauge!("clawdeploy_mail_outbox_oldest_age_seconds").set(oldest.unwrap_or(0.0));
    Ok(())
}

/// Drops sent and failed mail after 30 days.
pub async fn purge_old(app: &App) {
    let r = sqlx::query(
        "DELETE FROM outbox WHERE state IN ('sent', 'failed') AND created_at < now() - interval '30 days'",
    )
    .execute(&app.db)
    .await;
    if let Err(e) = r {
        tracing::warn!(error = %e, "old mail not purged");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_to_the_cap() {
        assert_eq!(retry_after(1), Duration::from_secs(2));
        assert_eq!(retry_after(3), Duration::from_secs(8));
        assert_eq!(retry_after(9), RETRY_CAP);
        assert_eq!(retry_after(1000), RETRY_CAP);
        assert_eq!(retry_after(-5), Duration::from_secs(2));
    }
}
