//! Billing: the product spec's plans (`plans`) and moving an instance to
//! another tier (`tier`), live: the container keeps running and is resized
//! in place. Stripe's side (Checkout, the portal, webhooks) will call into
//! these.

pub mod checkout;
pub mod credits;
mod credits_events;
mod outcome;
pub mod plans;
pub mod sync;
pub mod tier;
pub mod webhook;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::error::Result;
use crate::model::{BillingStatus, Tier};

/// An account's billing state.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct BillingState {
    pub tier: Tier,
    pub status: BillingStatus,
    pub current_period_end: Option<DateTime<Utc>>,
    pub grace_until: Option<DateTime<Utc>>,
}

/// The account's billing state; free and never subscribed when Stripe has
/// not told us anything about it.
pub async fn state_of(db: &sqlx::PgPool, user_id: Uuid) -> Result<BillingState> {
    let row: Option<BillingState> = sqlx::query_as(
        "SELECT tier, status, current_period_end, grace_until FROM billing_accounts WHERE user_id = $1",
    )
    .bind(user_id)
    .fetch_optional(db)
    .await?;
    Ok(row.unwrap_or(BillingState {
        tier: Tier::Free,
        status: BillingStatus::None,
        current_period_end: None,
        grace_until: None,
    }))
}
