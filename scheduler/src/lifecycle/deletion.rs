//! What an account's deletion means for its instance and subscription:
//! asking suspends the instance (state kept) and has the subscription end
//! with its period; undoing (the link, or signing in) resumes both; past
//! the grace the instance is released through the release path (its data
//! exported to backups as for any release, then destroyed), the
//! subscription ends at once, and the account's personal data is erased.
//! Stripe hears of a deletion and its undoing from `billing::sync`, so a
//! Stripe outage delays the change without losing it. The account side is
//! `accounts::deletion`.

use uuid::Uuid;

use super::suspension::{self, Reason};
use crate::accounts::{deletion, Client};
use crate::app::AppRef;
use crate::error::{Error, Result};
use crate::payments::PaymentProvider;

/// Asks to delete the account, and suspends its instance.
pub async fn request(
    app: &AppRef,
    user_id: Uuid,
    password: String,
    code: Option<&str>,
    client: &Client,
) -> Result<()> {
    deletion::request(app, user_id, password, code, client).await?;
    suspension::suspend_user(app, user_id, Reason::AccountDeleted).await?;
    app.tasks.billing_sync.activate();
    Ok(())
}

/// Undoes a deletion with the mailed link; the instance resumes.
pub async fn undo_by_link(app: &AppRef, token: &str, client: &Client) -> Result<()> {
    let user_id = deletion::undo_by_link(app, token, client).await?;
    resumed(app, user_id).await
}

/// After any successful sign-in: a pending deletion is undone and the
/// instance resumes.
pub async fn signed_in(app: &AppRef, user_id: Uuid, client: &Client) -> Result<()> {
    if deletion::undo_on_sign_in(app, user_id, client).await? {
        resumed(app, user_id).await?;
    }
    Ok(())
}

async fn resumed(app: &AppRef, user_id: Uuid) -> Result<()> {
    suspension::resume_user(app, user_id, Reason::AccountDeleted).await?;
    app.tasks.billing_sync.activate();
    Ok(())
}

/// Accounts one pass erases at the most.
const PER_PASS: i64 = 20;

/// Erases the accounts past their grace: the instance released, the
/// subscription ended, the personal data erased; returns how many. An
/// account whose subscription cannot be ended now (Stripe away) waits for
/// the next pass. (Deletions asked for and undone reach Stripe through
/// `billing::sync`.)
pub async fn erase_due(app: &AppRef) -> Result<usize> {
    erase_due_with(app, app.stripe.as_ref()).await
}

/// `erase_due`, with the payment provider given (a fake in tests).
pub async fn erase_due_with<P: PaymentProvider>(app: &AppRef, stripe: Option<&P>) -> Result<usize> {
    let mut erased = 0;
    for user_id in deletion::due(&app.db, PER_PASS).await? {
        match super::release::release(app, user_id).await {
            Ok(_) | Err(Error::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        let live_subscription: Option<String> = sqlx::query_scalar(
            "SELECT subscription_id FROM billing_accounts
              WHERE user_id = $1 AND subscription_id IS NOT NULL AND status <> 'canceled'",
        )
        .bind(user_id)
        .fetch_optional(&app.db)
        .await?;
        if let Some(sub) = live_subscription {
            let stripe = stripe.ok_or_else(billing_off)?;
            stripe.cancel_now(&sub).await?;
        }
        deletion::erase(app, user_id).await?;
        tracing::info!(%user_id, "account erased after its deletion grace");
        erased += 1;
    }
    Ok(erased)
}

fn billing_off() -> Error {
    Error::Disabled {
        code: "billing_disabled",
        message: "an account with a subscription waits for Stripe to be configured".into(),
    }
}
