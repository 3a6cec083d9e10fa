//! Telling Stripe what changed on an account's side: a deletion asked for
//! or undone (the subscription's `cancel_at_period_end`), and a new email
//! address (the customer's, so receipts follow the customer). The account
//! side only marks the row; this pass, from the `billing_sync` task, tells
//! Stripe and clears the mark, so a Stripe outage delays a change without
//! losing it or failing the customer's request.

use uuid::Uuid;

use crate::app::AppRef;
use crate::error::{Error, Result};
use crate::payments::PaymentProvider;

/// Changes one pass tells at the most, of each kind.
const PER_PASS: i64 = 50;

/// What one pass told Stripe.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Told {
    pub cancellations: usize,
    pub emails: usize,
}

/// A subscription to end with its period (`cancel`) or not.
#[derive(Debug, sqlx::FromRow)]
struct CancelChange {
    user_id: Uuid,
    subscription_id: Option<String>,
    cancel: bool,
}

/// A customer whose email is the account's old one.
#[derive(Debug, sqlx::FromRow)]
struct EmailChange {
    user_id: Uuid,
    email: String,
    customer_id: Option<String>,
}

pub async fn pass(app: &AppRef) -> Result<Told> {
    pass_with(app, app.stripe.as_ref()).await
}

/// `pass`, with the payment provider given (a fake in tests).
pub async fn pass_with<P: PaymentProvider>(app: &AppRef, stripe: Option<&P>) -> Result<Told> {
    let mut told = Told::default();
    let cancels: Vec<CancelChange> = sqlx::query_as(
        "SELECT u.id AS user_id, b.subscription_id, u.billing_cancel_wanted AS cancel
           FROM users u LEFT JOIN billing_accounts b ON b.user_id = u.id
          WHERE u.billing_cancel_wanted IS NOT NULL
          ORDER BY u.id LIMIT $1",
    )
    .bind(PER_PASS)
    .fetch_all(&app.db)
    .await?;
    for change in cancels {
        if let Some(sub) = &change.subscription_id {
            let stripe = stripe.ok_or_else(billing_off)?;
            stripe.cancel_at_period_end(sub, change.cancel).await?;
        }
        // Unless the account changed its mind meanwhile.
        sqlx::query(
            "UPDATE users SET billing_cancel_wanted = NULL WHERE id = $1 AND billing_cancel_wanted = $2",
        )
        .bind(change.user_id)
        .bind(change.cancel)
        .execute(&app.db)
        .await?;
        told.cancellations += 1;
    }
    let emails: Vec<EmailChange> = sqlx::query_as(
        "SELECT u.id AS user_id, u.email, b.customer_id
           FROM users u LEFT JOIN billing_accounts b ON b.user_id = u.id
          WHERE u.billing_email_stale AND u.purged_at IS NULL
          ORDER BY u.id LIMIT $1",
    )
    .bind(PER_PASS)
    .fetch_all(&app.db)
    .await?;
    for change in emails {
        if let Some(customer) = &change.customer_id {
            let stripe = stripe.ok_or_else(billing_off)?;
            stripe
                .update_customer_email(customer, &change.email)
                .await?;
            told.emails += 1;
        }
        // Unless the address moved again meanwhile.
        sqlx::query("UPDATE users SET billing_email_stale = false WHERE id = $1 AND email = $2")
            .bind(change.user_id)
            .bind(&change.email)
            .execute(&app.db)
            .await?;
    }
    Ok(told)
}

fn billing_off() -> Error {
    Error::Disabled {
        code: "billing_disabled",
        message: "an account with a Stripe customer waits for Stripe to be configured".into(),
    }
}
