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

/// The month's message limit of a tier (`None`: unlimited).
pub fn message_limit(tier: Tier, free_messages: u32) -> Option<u32> {
    (tier == Tier::Free).then_some(free_messages)
}
