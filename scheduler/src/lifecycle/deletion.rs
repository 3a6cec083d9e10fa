//! What an account's deletion means for its instance and subscription:
//! asking suspends the instance (state kept) and has the subscription end
//! with its period; undoing (the link, or signing in) resumes both; past
//! the grace the instance is released through the release path (its data
//! exported to backups as for any release, then destroyed), the
//! subscription ends at once, and the account's personal data is erased.
//! Stripe is told by a background pass, so a Stripe outage delays the
//! change without losing it. The account side is `accounts::deletion`.

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
    app.tasks.deletions.activate();
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
    app.tasks.deletions.activate();
    Ok(())
}

/// Accounts one pass erases at the most, and subscriptions it tells.
const PER_PASS: i64 = 20;

/// What one pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pass {
    pub billing_told: usize,
    pub erased: usize,
}

/// Tells Stripe of deletions asked for and undone, and erases the
/// accounts past their grace: the instance released, the subscription
/// ended, the personal data erased. An account whose subscription cannot
/// be ended now (Stripe away) waits for the next pass.
pub async fn pass(app: &AppRef) -> Result<Pass> {
    pass_with(app, app.stripe.as_ref()).await
}

/// `pass`, with the payment provider given (a fake in tests).
pub async fn pass_with<P: PaymentProvider>(app: &AppRef, stripe: Option<&P>) -> Result<Pass> {
    let mut done = Pass::default();
    for change in deletion::billing_changes(&app.db, PER_PASS).await? {
        if let Some(sub) = &change.subscription_id {
            let stripe = stripe.ok_or_else(billing_off)?;
            stripe.cancel_at_period_end(sub, change.cancel).await?;
        }
        deletion::billing_told(&app.db, change.user_id, change.cancel).await?;
        done.billing_told += 1;
    }
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
        done.erased += 1;
    }
    Ok(done)
}

fn billing_off() -> Error {
    Error::Disabled {
        code: "billing_disabled",
        message: "an account with a subscription waits for Stripe to be configured".into(),
    }
}
