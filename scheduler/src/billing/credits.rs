//! AI credits and model usage as the account sees them. The metering proxy
//! (`llm-proxy/`) writes them: balances move into its leases and back,
//! usage lands in `llm_usage_monthly` in batches. The balance shown is
//! what no proxy has spent: the balance plus every lease's unspent part.

use sqlx::PgPool;
use uuid::Uuid;

use crate::error::Result;
use crate::model::Tier;

/// An instance's usage this month (UTC) and its account's credits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub messages_this_month: i64,
    /// Input and output tokens.
    pub tokens_this_month: i64,
    /// What AI credits paid this month (BYOK requests cost nothing).
    pub charged_this_month_micros: i64,
    pub credit_balance_micros: i64,
    /// Credits leased to proxies for requests in flight or about to be.
    pub leased_micros: i64,
}

#[derive(sqlx::FromRow)]
struct Row {
    messages: i64,
    tokens: i64,
    charged: i64,
    balance: i64,
    leased: i64,
}

/// The usage of `instance_id` this month and the credits of `user_id`.
pub async fn usage(db: &PgPool, user_id: Uuid, instance_id: Option<Uuid>) -> Result<Usage> {
    let r: Row = sqlx::query_as(
        "SELECT
           COALESCE((SELECT sum(messages) FROM llm_usage_monthly
                      WHERE instance_id = $2 AND month = date_trunc('month', now() AT TIME ZONE 'UTC')::date), 0)::bigint AS messages,
           COALESCE((SELECT sum(input_tokens + output_tokens) FROM llm_usage_monthly
                      WHERE instance_id = $2 AND month = date_trunc('month', now() AT TIME ZONE 'UTC')::date), 0)::bigint AS tokens,
           COALESCE((SELECT sum(charged_micros) FROM llm_usage_monthly
                      WHERE user_id = $1 AND month = date_trunc('month', now() AT TIME ZONE 'UTC')::date), 0)::bigint AS charged,
           COALESCE((SELECT balance_micros FROM credit_balances WHERE user_id = $1), 0)
             + COALESCE((SELECT sum(amount_micros - spent_micros) FROM credit_leases WHERE user_id = $1), 0)::bigint AS balance,
           COALESCE((SELECT sum(amount_micros - spent_micros) FROM credit_leases WHERE user_id = $1), 0)::bigint AS leased",
    )
    .bind(user_id)
    .bind(instance_id)
    .fetch_one(db)
    .await?;
    Ok(Usage {
        messages_this_month: r.messages,
        tokens_this_month: r.tokens,
        charged_this_month_micros: r.charged,
        credit_balance_micros: r.balance,
        leased_micros: r.leased,
    })
}

/// The month's message limit of a tier (`None`: unlimited), from its plan.
pub fn message_limit(tier: Tier, free_messages: u32) -> Option<u32> {
    tier.plan().model_limits(free_messages).messages_per_month
}

/// The least and most one purchase may be, in cents ($5 – $500).
pub const MIN_PURCHASE_CENTS: i64 = 500;
pub const MAX_PURCHASE_CENTS: i64 = 50_000;

/// Micro-dollars in a cent.
const MICROS_PER_CENT: i64 = 10_000;

fn check_amount(amount_cents: i64) -> Result<()> {
    if (MIN_PURCHASE_CENTS..=MAX_PURCHASE_CENTS).contains(&amount_cents) {
        Ok(())
    } else {
        Err(crate::error::Error::Invalid {
            field: "amountCents",
            message: format!(
                "must be {MIN_PURCHASE_CENTS} to {MAX_PURCHASE_CENTS} (US cents: $5 to $500)"
            ),
        })
    }
}

/// A Checkout page (payment mode) buying `amount_cents` of credits; the
/// credits arrive with its webhook.
#[allow(clippy::too_many_arguments)]
pub async fn checkout<P: crate::payments::PaymentProvider>(
    db: &PgPool,
    cfg: &crate::app::Config,
    provider: &P,
    account: Uuid,
    amount_cents: i64,
    success_url: &str,
    cancel_url: &str,
    idempotency_key: Option<&str>,
) -> Result<String> {
    check_amount(amount_cents)?;
    crate::accounts::verify::require_verified(db, account).await?;
    super::checkout::check_redirect(cfg, "successUrl", success_url)?;
    super::checkout::check_redirect(cfg, "cancelUrl", cancel_url)?;
    let customer = super::checkout::customer_of(db, provider, account).await?;
    provider
        .create_credits_checkout(crate::payments::NewCreditsCheckout {
            account,
            customer: &customer,
            amount_cents,
            success_url,
            cancel_url,
            idempotency_key: idempotency_key
                .map(|k| format!("credits-checkout-{account}-{k}"))
                .unwrap_or_else(|| format!("credits-checkout-{}", Uuid::new_v4())),
        })
        .await
}

/// Charges the card the account's last credits purchase saved,
/// off-session. The balance moves when `payment_intent.succeeded` comes.
pub async fn top_up<P: crate::payments::PaymentProvider>(
    db: &PgPool,
    provider: &P,
    account: Uuid,
    amount_cents: i64,
    idempotency_key: Option<&str>,
) -> Result<crate::payments::Charged> {
    check_amount(amount_cents)?;
    let saved: Option<(Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT customer_id, credits_payment_method FROM billing_accounts WHERE user_id = $1",
    )
    .bind(account)
    .fetch_optional(db)
    .await?;
    let Some((Some(customer), Some(payment_method))) = saved else {
        return Err(crate::error::Error::Conflict {
            code: "no_saved_card",
            message: "no card is saved for credits yet: buy credits once through Checkout".into(),
        });
    };
    let charged = provider
        .charge_off_session(crate::payments::OffSessionCharge {
            account,
            customer: &customer,
            payment_method: &payment_method,
            amount_cents,
            idempotency_key: idempotency_key
                .map(|k| format!("credits-top-up-{account}-{k}"))
                .unwrap_or_else(|| format!("credits-top-up-{}", Uuid::new_v4())),
        })
        .await?;
    tracing::info!(%account, amount_cents, ?charged, "credits top-up");
    Ok(charged)
}

/// What a purchase webhook names.
pub struct Purchase<'a> {
    pub account: Uuid,
    pub payment_intent: &'a str,
    pub amount_cents: i64,
    pub kind: &'static str,
    /// The card it was paid with, kept for top-ups.
    pub payment_method: Option<&'a str>,
}

/// Adds a purchase's credits, once per PaymentIntent (inside the webhook's
/// transaction). False: it was applied already.
pub async fn credit(tx: &mut sqlx::PgConnection, p: Purchase<'_>) -> Result<bool> {
    let micros = p.amount_cents.saturating_mul(MICROS_PER_CENT);
    let fresh: Option<String> = sqlx::query_scalar(
        "INSERT INTO credit_purchases (payment_intent_id, user_id, amount_micros, kind)
         SELECT $1, $2, $3, $4 WHERE EXISTS (SELECT 1 FROM users WHERE id = $2)
         ON CONFLICT (payment_intent_id) DO NOTHING RETURNING payment_intent_id",
    )
    .bind(p.payment_intent)
    .bind(p.account)
    .bind(micros)
    .bind(p.kind)
    .fetch_optional(&mut *tx)
    .await?;
    if fresh.is_some() {
        sqlx::query(
            "INSERT INTO credit_balances (user_id, balance_micros, last_purchase_micros) VALUES ($1, $2, $2)
             ON CONFLICT (user_id) DO UPDATE
                SET balance_micros = credit_balances.balance_micros + EXCLUDED.balance_micros,
                    last_purchase_micros = EXCLUDED.last_purchase_micros,
                    low_warned_at = NULL, updated_at = now()",
        )
        .bind(p.account)
        .bind(micros)
        .execute(&mut *tx)
        .await?;
    }
    if let Some(pm) = p.payment_method {
        sqlx::query("UPDATE billing_accounts SET credits_payment_method = $2 WHERE user_id = $1")
            .bind(p.account)
            .bind(pm)
            .execute(&mut *tx)
            .await?;
    }
    Ok(fresh.is_some())
}

/// Takes back what a refund or dispute of a purchase names (`total_cents`
/// so far: Stripe's refunded total, or the disputed amount); never more
/// than once for the same money, never below a zero balance. Returns what
/// was taken, in micro-dollars (`None`: no such purchase).
pub async fn claw_back(
    tx: &mut sqlx::PgConnection,
    payment_intent: &str,
    total_cents: i64,
) -> Result<Option<(Uuid, i64)>> {
    let total = total_cents.saturating_mul(MICROS_PER_CENT);
    let row: Option<(Uuid, i64)> = sqlx::query_as(
        "WITH old AS (
           SELECT user_id, clawed_back_micros, amount_micros FROM credit_purchases
            WHERE payment_intent_id = $1 FOR UPDATE
         )
         UPDATE credit_purchases p
            SET clawed_back_micros = GREATEST(old.clawed_back_micros, LEAST($2, old.amount_micros))
           FROM old WHERE p.payment_intent_id = $1
         RETURNING p.user_id, p.clawed_back_micros - old.clawed_back_micros",
    )
    .bind(payment_intent)
    .bind(total)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((user, delta)) = row else {
        return Ok(None);
    };
    if delta > 0 {
        sqlx::query(
            "UPDATE credit_balances SET balance_micros = balance_micros - LEAST(balance_micros, $2), updated_at = now()
              WHERE user_id = $1",
        )
        .bind(user)
        .bind(delta)
        .execute(&mut *tx)
        .await?;
    }
    Ok(Some((user, delta)))
}

fn as_dollars(micros: i64) -> String {
    format!(
        "${}.{:02}",
        micros / 1_000_000,
        (micros % 1_000_000) / 10_000
    )
}

/// Mails, once each, the free instances that used 90 % of the month's
/// messages, and the accounts that spent 90 % of the credits they bought
/// last (the outbox's dedupe key makes it once: per instance and month,
/// per purchase). Returns how many mails were queued.
pub async fn warn_low(app: &crate::app::AppRef) -> Result<usize> {
    use crate::mail::templates::Purpose;
    let limit = i64::from(app.cfg.free_messages_per_month);
    let mut tx = app.db.begin().await?;
    let near: Vec<(Uuid, Uuid, i32, chrono::NaiveDate)> = sqlx::query_as(
        "SELECT q.user_id, q.instance_id, q.used, q.month FROM message_quota q
          WHERE q.month = date_trunc('month', now() AT TIME ZONE 'UTC')::date
            AND q.used::bigint * 10 >= $1 * 9 AND $1 > 0
            AND NOT EXISTS (SELECT 1 FROM billing_accounts b WHERE b.user_id = q.user_id AND b.tier <> 'free')",
    )
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    let mut queued = 0;
    for (user, instance, used, month) in near {
        let key = format!("messages_near_limit:{instance}:{month}");
        let params = serde_json::json!({"used": used.to_string(), "limit": limit.to_string()});
        if crate::outbox::enqueue_to_account(&mut tx, user, Purpose::MessagesNearLimit, key, params)
            .await?
        {
            queued += 1;
        }
    }
    let low: Vec<(Uuid, String, i64, i64)> = sqlx::query_as(
        "SELECT b.user_id, p.payment_intent_id, b.last_purchase_micros,
                (b.balance_micros + COALESCE((SELECT sum(amount_micros - spent_micros) FROM credit_leases l
                                               WHERE l.user_id = b.user_id), 0))::bigint AS left_micros
           FROM credit_balances b
           JOIN LATERAL (SELECT payment_intent_id FROM credit_purchases c
                          WHERE c.user_id = b.user_id ORDER BY created_at DESC LIMIT 1) p ON true
          WHERE b.last_purchase_micros > 0",
    )
    .fetch_all(&mut *tx)
    .await?;
    for (user, purchase, bought, left) in low {
        if left * 10 > bought {
            continue;
        }
        let key = format!("credits_low:{user}:{purchase}");
        let params =
            serde_json::json!({"left": as_dollars(left.max(0)), "bought": as_dollars(bought)});
        if crate::outbox::enqueue_to_account(&mut tx, user, Purpose::CreditsLow, key, params)
            .await?
        {
            queued += 1;
        }
    }
    tx.commit().await?;
    if queued > 0 {
        app.tasks.mail.activate();
    }
    Ok(queued)
}
