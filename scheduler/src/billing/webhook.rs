//! Stripe's webhooks: the signature is checked on the raw body by
//! async-stripe's webhook module (5 minutes' tolerance), then each event is
//! applied once, in the same transaction as its effect, from the event's
//! own object (no call back to Stripe: a slow Stripe cannot fail a
//! delivery). Subscription events are ordered by their `created` time, so a
//! late `customer.subscription.updated` never undoes a newer state.
//! Unknown types, customers and subscriptions are acknowledged and logged:
//! Stripe retries a 5xx for days. A signed event that billing cannot read
//! (the endpoint sends another API version than `api_version()`) is kept
//! whole in `stripe_unreadable_events` for an operator and acknowledged:
//! refusing it would only make Stripe retry it, then disable the endpoint.

use chrono::{DateTime, Utc};
use sqlx::{Postgres, Transaction};
use stripe_webhook::{EventObject, Webhook, WebhookError};
use uuid::Uuid;

pub use super::outcome::Outcome;
use super::tier::{live_instance_of, set_tier_in, Changed};
use crate::app::AppRef;
use crate::audit::audit;
use crate::error::{Error, Result};
use crate::mail::templates::Purpose;
use crate::model::{BillingStatus, Tier};
use crate::outbox;

/// The Stripe API version billing reads events as: the webhook endpoint
/// must be created with it (docs/operations.md, "Billing").
pub fn api_version() -> &'static str {
    stripe_shared::version::VERSION.as_str()
}

/// Checks the signature and applies the event.
pub async fn receive(app: &AppRef, payload: &str, signature: &str) -> Result<Outcome> {
    let secret = app
        .cfg
        .stripe_webhook_secret
        .as_deref()
        .ok_or_else(|| Error::Disabled {
            code: "billing_disabled",
            message: "billing is not configured (--stripe-webhook-secret)".into(),
        })?;
    // The signature and its age are checked before the event is parsed:
    // a parse error is a signed event billing cannot read.
    let event = match Webhook::construct_event(payload, signature, secret) {
        Ok(event) => event,
        Err(WebhookError::BadParse(why)) => return keep_unreadable(app, payload, &why).await,
        Err(e) => {
            let why = match &e {
                WebhookError::BadTimestamp(_) => "the signature is older than 5 minutes",
                WebhookError::BadHeader(_) => "the Stripe-Signature header is malformed",
                _ => "the signature does not match",
            };
            metrics::counter!("clawdeploy_billing_signature_failures_total").increment(1);
            tracing::warn!(error = %e, "webhook refused");
            return Err(Error::BadRequest(format!("webhook refused: {why}")));
        }
    };
    let kind = event.type_.as_str().to_owned();
    let outcome = apply(app, &event).await?;
    metrics::counter!("clawdeploy_billing_webhooks_total", "type" => kind.clone(), "result" => outcome.as_str())
        .increment(1);
    tracing::info!(
        event = event.id.as_str(),
        kind,
        outcome = outcome.as_str(),
        "webhook"
    );
    Ok(outcome)
}

/// Keeps a signed event billing could not read, whole, for an operator
/// (once per event id; a redelivery counts), and acknowledges it.
async fn keep_unreadable(app: &AppRef, payload: &str, why: &str) -> Result<Outcome> {
    #[derive(serde::Deserialize, Default)]
    struct Head {
        #[serde(default)]
        id: String,
        #[serde(default, rename = "type")]
        kind: String,
        #[serde(default)]
        api_version: Option<String>,
    }
    let head: Head = serde_json::from_str(payload).unwrap_or_default();
    let id = if head.id.is_empty() {
        use sha2::Digest;
        format!(
            "sha256:{}",
            hex::encode(sha2::Sha256::digest(payload.as_bytes()))
        )
    } else {
        head.id
    };
    let api_version = head.api_version.unwrap_or_default();
    sqlx::query(
        "INSERT INTO stripe_unreadable_events (id, type, api_version, payload, error)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (id) DO UPDATE SET deliveries = stripe_unreadable_events.deliveries + 1",
    )
    .bind(&id)
    .bind(&head.kind)
    .bind(&api_version)
    .bind(payload)
    .bind(why)
    .execute(&app.db)
    .await?;
    metrics::counter!("clawdeploy_billing_webhooks_total", "type" => head.kind.clone(), "result" => Outcome::Unreadable.as_str())
        .increment(1);
    tracing::error!(
        event = id,
        kind = head.kind,
        api_version,
        expected = self::api_version(),
        error = why,
        "signed Stripe event not readable: kept in stripe_unreadable_events and acknowledged"
    );
    Ok(Outcome::Unreadable)
}

/// The account a billing row belongs to, with its state.
#[derive(sqlx::FromRow)]
struct Account {
    user_id: Uuid,
    tier: Tier,
    status: BillingStatus,
    state_at: Option<DateTime<Utc>>,
}

fn at(ts: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(ts, 0).unwrap_or_default()
}

async fn apply(app: &AppRef, event: &stripe_webhook::Event) -> Result<Outcome> {
    let created = at(event.created);
    let mut tx = app.db.begin().await?;
    let fresh: Option<String> = sqlx::query_scalar(
        "INSERT INTO stripe_events (id, type, created, outcome) VALUES ($1, $2, $3, 'pending')
         ON CONFLICT (id) DO NOTHING RETURNING id",
    )
    .bind(event.id.as_str())
    .bind(event.type_.as_str())
    .bind(created)
    .fetch_optional(&mut *tx)
    .await?;
    if fresh.is_none() {
        return Ok(Outcome::Duplicate);
    }
    let mut changed = None;
    // Credits' events (purchases, refunds, disputes) first; then the
    // subscription's.
    let credits = super::credits_events::apply(&mut tx, &event.data.object).await?;
    let outcome = match &event.data.object {
        _ if credits.is_some() => credits.unwrap_or(Outcome::Ignored),
        EventObject::CheckoutSessionCompleted(s) => {
            let account = s
                .client_reference_id
                .as_deref()
                .and_then(|r| r.parse::<Uuid>().ok());
            let customer = s.customer.as_ref().map(|c| c.id().as_str().to_owned());
            let subscription = s.subscription.as_ref().map(|c| c.id().as_str().to_owned());
            link(&mut tx, account, customer, subscription).await?
        }
        EventObject::CustomerSubscriptionCreated(sub)
        | EventObject::CustomerSubscriptionUpdated(sub)
        | EventObject::CustomerSubscriptionDeleted(sub) => {
            let deleted = matches!(
                &event.data.object,
                EventObject::CustomerSubscriptionDeleted(_)
            );
            subscription(app, &mut tx, sub, deleted, created, &mut changed).await?
        }
        EventObject::InvoicePaymentFailed(inv) | EventObject::InvoicePaid(inv) => {
            let paid = matches!(&event.data.object, EventObject::InvoicePaid(_));
            let customer = inv.customer.as_ref().map(|c| c.id().as_str().to_owned());
            invoice(&mut tx, customer, paid).await?
        }
        _ => Outcome::Ignored,
    };
    sqlx::query("UPDATE stripe_events SET outcome = $2 WHERE id = $1")
        .bind(event.id.as_str())
        .bind(outcome.as_str())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    if let Some(changed) = changed {
        crate::routes::broadcast(app, changed.routes, None).await;
        if let Some(node) = changed.node {
            crate::agents::desired::bump_and_push(app, &node).await?;
        }
    }
    Ok(outcome)
}

/// `checkout.session.completed`: the account (its id is the session's
/// `client_reference_id`) gets the customer and subscription.
async fn link(
    tx: &mut Transaction<'_, Postgres>,
    account: Option<Uuid>,
    customer: Option<String>,
    subscription: Option<String>,
) -> Result<Outcome> {
    let Some(user_id) = account else {
        return Ok(Outcome::UnknownAccount);
    };
    let known: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM users WHERE id = $1)")
        .bind(user_id)
        .fetch_one(&mut **tx)
        .await?;
    if !known {
        return Ok(Outcome::UnknownAccount);
    }
    sqlx::query(
        "INSERT INTO billing_accounts (user_id, customer_id, subscription_id) VALUES ($1, $2, $3)
         ON CONFLICT (user_id) DO UPDATE
            SET customer_id = COALESCE(EXCLUDED.customer_id, billing_accounts.customer_id),
                subscription_id = COALESCE(EXCLUDED.subscription_id, billing_accounts.subscription_id),
                updated_at = now()",
    )
    .bind(user_id)
    .bind(&customer)
    .bind(&subscription)
    .execute(&mut **tx)
    .await?;
    audit(
        &mut **tx,
        "stripe",
        "billing.linked",
        &user_id.to_string(),
        serde_json::json!({"customer": customer, "subscription": subscription}),
    )
    .await;
    Ok(Outcome::Linked)
}

/// The account of a Stripe customer, locked.
async fn account_of(
    tx: &mut Transaction<'_, Postgres>,
    customer: &str,
    subscription: Option<&str>,
) -> Result<Option<Account>> {
    Ok(sqlx::query_as(
        "SELECT user_id, tier, status, state_at FROM billing_accounts
          WHERE customer_id = $1 OR subscription_id = $2 FOR UPDATE",
    )
    .bind(customer)
    .bind(subscription)
    .fetch_optional(&mut **tx)
    .await?)
}

/// `customer.subscription.*`: the account's tier and status follow the
/// subscription, unless a newer state was applied already.
async fn subscription(
    app: &AppRef,
    tx: &mut Transaction<'_, Postgres>,
    sub: &stripe_shared::Subscription,
    deleted: bool,
    created: DateTime<Utc>,
    changed: &mut Option<Changed>,
) -> Result<Outcome> {
    use stripe_shared::{CancellationDetailsReason, SubscriptionStatus};
    let Some(account) = account_of(tx, sub.customer.id().as_str(), Some(sub.id.as_str())).await?
    else {
        return Ok(Outcome::UnknownAccount);
    };
    if account.state_at.is_some_and(|s| s > created) {
        return Ok(Outcome::Stale);
    }
    let item = sub.items.data.first();
    let paid_tier = item.and_then(|i| app.cfg.tier_of_price(i.price.id.as_str()));
    let period_end = item.map(|i| at(i.current_period_end));
    let payment_failed = sub
        .cancellation_details
        .as_ref()
        .and_then(|d| d.reason.as_ref())
        .is_some_and(|r| matches!(r, CancellationDetailsReason::PaymentFailed));
    let grace_until = Utc::now()
        + chrono::Duration::from_std(app.cfg.billing_grace).unwrap_or(chrono::Duration::days(7));
    // What the account becomes: tier, status, and whether a grace period
    // starts now.
    let (tier, status, grace_starts) = match &sub.status {
        _ if deleted && !payment_failed => (Tier::Free, BillingStatus::Canceled, false),
        SubscriptionStatus::Active | SubscriptionStatus::Trialing if !deleted => (
            paid_tier.unwrap_or(account.tier),
            BillingStatus::Active,
            false,
        ),
        SubscriptionStatus::PastDue => (account.tier, BillingStatus::PastDue, false),
        // Stripe's retries are over: a grace period, then the free tier.
        SubscriptionStatus::Unpaid | SubscriptionStatus::Canceled => {
            (account.tier, BillingStatus::Grace, true)
        }
        SubscriptionStatus::IncompleteExpired => (Tier::Free, BillingStatus::Canceled, false),
        _ => (account.tier, account.status, false),
    };
    // A grace period already running keeps its deadline.
    let keep_deadline = grace_starts && account.status == BillingStatus::Grace;
    let deadline = (grace_starts && !keep_deadline).then_some(grace_until);
    sqlx::query(
        "UPDATE billing_accounts
            SET tier = $2, status = $3, subscription_id = $4, current_period_end = $5,
                grace_until = CASE WHEN $7 THEN grace_until ELSE $6 END,
                state_at = $8, updated_at = now()
          WHERE user_id = $1",
    )
    .bind(account.user_id)
    .bind(tier)
    .bind(status)
    .bind(sub.id.as_str())
    .bind(period_end)
    .bind(deadline)
    .bind(keep_deadline)
    .bind(created)
    .execute(&mut **tx)
    .await?;
    if status == BillingStatus::PastDue && account.status != BillingStatus::PastDue {
        mail_payment_failed(tx, account.user_id, period_end).await?;
    }
    if tier != account.tier {
        if let Some(instance) = live_instance_of(tx, account.user_id).await? {
            *changed = Some(set_tier_in(app, tx, instance, tier, "stripe").await?);
        }
    }
    audit(
        &mut **tx,
        "stripe",
        "billing.subscription",
        &account.user_id.to_string(),
        serde_json::json!({"subscription": sub.id.as_str(), "status": sub.status.as_str(),
                           "tier": tier, "accountStatus": status}),
    )
    .await;
    Ok(Outcome::Applied)
}

/// `invoice.payment_failed` marks a paying account `past_due` (its tier
/// stays while Stripe retries); `invoice.paid` ends `past_due` or a grace
/// period with the tier kept.
async fn invoice(
    tx: &mut Transaction<'_, Postgres>,
    customer: Option<String>,
    paid: bool,
) -> Result<Outcome> {
    let Some(customer) = customer else {
        return Ok(Outcome::UnknownAccount);
    };
    let Some(account) = account_of(tx, &customer, None).await? else {
        return Ok(Outcome::UnknownAccount);
    };
    let status = match (paid, account.status) {
        (true, BillingStatus::PastDue | BillingStatus::Grace) => BillingStatus::Active,
        (false, BillingStatus::Active) => BillingStatus::PastDue,
        _ => return Ok(Outcome::Applied),
    };
    sqlx::query(
        "UPDATE billing_accounts SET status = $2, grace_until = NULL, updated_at = now() WHERE user_id = $1",
    )
    .bind(account.user_id)
    .bind(status)
    .execute(&mut **tx)
    .await?;
    if status == BillingStatus::PastDue {
        let period: Option<DateTime<Utc>> = sqlx::query_scalar(
            "SELECT current_period_end FROM billing_accounts WHERE user_id = $1",
        )
        .bind(account.user_id)
        .fetch_one(&mut **tx)
        .await?;
        mail_payment_failed(tx, account.user_id, period).await?;
    }
    audit(
        &mut **tx,
        "stripe",
        "billing.invoice",
        &account.user_id.to_string(),
        serde_json::json!({"paid": paid, "from": account.status, "to": status}),
    )
    .await;
    Ok(Outcome::Applied)
}

/// The "payment failed" mail of an account that just became `past_due`:
/// one per subscription and billing period, whichever event said it first
/// (`invoice.payment_failed` or the subscription's update).
async fn mail_payment_failed(
    tx: &mut Transaction<'_, Postgres>,
    user_id: Uuid,
    period_end: Option<DateTime<Utc>>,
) -> Result<()> {
    let period = period_end.map_or(0, |p| p.timestamp());
    outbox::enqueue_to_account(
        tx,
        user_id,
        Purpose::PaymentFailed,
        format!("payment_failed:{user_id}:{period}"),
        serde_json::json!({}),
    )
    .await?;
    Ok(())
}

/// Mails the accounts whose grace period ends within three days (once per
/// grace period); returns how many were mailed.
pub async fn warn_grace_ending(app: &AppRef) -> Result<usize> {
    let mut tx = app.db.begin().await?;
    let ending: Vec<(Uuid, DateTime<Utc>, Tier)> = sqlx::query_as(
        "SELECT user_id, grace_until, tier FROM billing_accounts
          WHERE status = 'grace' AND grace_until > now() AND grace_until < now() + interval '3 days'",
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut mailed = 0;
    for (user_id, until, tier) in ending {
        let tier = serde_json::json!(tier);
        let params = serde_json::json!({
            "graceUntil": until.format("%Y-%m-%d %H:%M").to_string(),
            "tier": tier,
        });
        let key = format!("grace_ending:{user_id}:{}", until.timestamp());
        if outbox::enqueue_to_account(&mut tx, user_id, Purpose::GraceEnding, key, params).await? {
            mailed += 1;
        }
    }
    tx.commit().await?;
    if mailed > 0 {
        app.tasks.mail.activate();
    }
    Ok(mailed)
}

/// Exports how many accounts are in each tier and billing status, and how
/// many unreadable events wait for an operator.
pub async fn export_gauges(app: &AppRef) -> Result<()> {
    let unreadable: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM stripe_unreadable_events WHERE resolved_at IS NULL",
    )
    .fetch_one(&app.db)
    .await?;
    metrics::gauge!("clawdeploy_billing_unreadable_events").set(unreadable as f64);
    let rows: Vec<(Tier, BillingStatus, i64)> =
        sqlx::query_as("SELECT tier, status, count(*) FROM billing_accounts GROUP BY tier, status")
            .fetch_all(&app.db)
            .await?;
    for tier in [Tier::Free, Tier::Pro, Tier::Team] {
        for status in [
            BillingStatus::None,
            BillingStatus::Active,
            BillingStatus::PastDue,
            BillingStatus::Grace,
            BillingStatus::Canceled,
        ] {
            let n = rows
                .iter()
                .find(|(t, s, _)| *t == tier && *s == status)
                .map_or(0, |r| r.2);
            // As the database and the API spell them.
            let name = |v: serde_json::Value| v.as_str().unwrap_or_default().to_owned();
            let labels = [
                ("tier", name(serde_json::json!(tier))),
                ("status", name(serde_json::json!(status))),
            ];
            metrics::gauge!("clawdeploy_billing_accounts", &labels).set(n as f64);
        }
    }
    Ok(())
}

/// Grace periods that ended: the account goes to the free tier and its
/// instance is resized down, live. Returns how many.
pub async fn end_grace(app: &AppRef) -> Result<usize> {
    let mut tx = app.db.begin().await?;
    let ended: Vec<Uuid> = sqlx::query_scalar(
        "UPDATE billing_accounts SET tier = 'free', status = 'canceled', grace_until = NULL, updated_at = now()
          WHERE status = 'grace' AND grace_until < now()
          RETURNING user_id",
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut changes = Vec::new();
    for user in &ended {
        if let Some(instance) = live_instance_of(&mut tx, *user).await? {
            changes.push(set_tier_in(app, &mut tx, instance, Tier::Free, "billing").await?);
        }
        audit(
            &mut *tx,
            "billing",
            "billing.grace_ended",
            &user.to_string(),
            serde_json::json!({}),
        )
        .await;
    }
    tx.commit().await?;
    for changed in changes {
        crate::routes::broadcast(app, changed.routes, None).await;
        if let Some(node) = changed.node {
            crate::agents::desired::bump_and_push(app, &node).await?;
        }
    }
    Ok(ended.len())
}
