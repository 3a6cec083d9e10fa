//! Billing's HTTP face: the public plan list, the account's billing state,
//! Stripe's webhook, and the operator's tier change (a comped account, a
//! support fix; the webhooks take the same path).

use axum::extract::{Path, State};
use serde::Deserialize;
use uuid::Uuid;

use super::extract::{ApiJson, AuthUser, Operator};
use super::views::{
    BillingView, CheckoutView, CreditsView, ErrorBody, PlanList, PlanView, PortalView,
    TierChangeView, TopUpView, WebhookAck,
};
use crate::app::AppRef;
use crate::billing::{plans::PLANS, tier, webhook};
use crate::error::{Error, Result};
use crate::model::Tier;

/// The plans, with their Stripe price ids where configured.
#[utoipa::path(get, path = "/api/billing/plans", tag = "billing",
    responses((status = 200, description = "Every plan: price and resources", body = PlanList)))]
pub async fn plans(State(app): State<AppRef>) -> axum::Json<PlanList> {
    let price_id = |t: Tier| match t {
        Tier::Free => None,
        Tier::Pro => app.cfg.stripe_price_pro.clone(),
        Tier::Team => app.cfg.stripe_price_team.clone(),
    };
    axum::Json(PlanList {
        plans: PLANS
            .iter()
            .map(|p| PlanView {
                tier: p.tier,
                price_id: price_id(p.tier),
                monthly_price_cents: p.monthly_price_cents,
                cpu_millis: p.cpu_millis,
                memory_mb: p.memory_mb,
                storage_gb: p.storage_gb,
                custom_domains: p.custom_domains,
                model_requests_per_second: p
                    .model_limits(app.cfg.free_messages_per_month)
                    .requests_per_sec,
                model_burst: p.model_limits(app.cfg.free_messages_per_month).burst,
                model_messages_per_month: p
                    .model_limits(app.cfg.free_messages_per_month)
                    .messages_per_month,
            })
            .collect(),
    })
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TierChange {
    tier: Tier,
}

/// Moves an instance to another tier; its container is resized in place
/// (no restart).
#[utoipa::path(put, path = "/admin/instances/{id}/tier", tag = "operator", request_body = TierChange, security(("bearer" = [])),
    params(("id" = String, Path, description = "Instance id")),
    responses(
        (status = 200, description = "The tier now and before", body = TierChangeView),
        (status = 400, description = "Malformed JSON or an unknown tier", body = ErrorBody),
        (status = 401, description = "No or wrong operator token", body = ErrorBody),
        (status = 404, description = "No such instance", body = ErrorBody),
        (status = 409, description = "The instance is released or failed", body = ErrorBody),
    ))]
pub async fn set_tier(
    _: Operator,
    State(app): State<AppRef>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<TierChange>,
) -> Result<axum::Json<TierChangeView>> {
    let instance_id: Uuid = id.parse().map_err(|_| Error::NotFound("instance"))?;
    let previous = tier::set_tier(&app, instance_id, body.tier, "operator").await?;
    Ok(axum::Json(TierChangeView {
        id: instance_id,
        tier: body.tier,
        previous,
    }))
}

/// Stripe's webhook: the raw body with its `Stripe-Signature`.
#[utoipa::path(post, path = "/api/billing/webhook", tag = "billing",
    params(("Stripe-Signature" = String, Header, description = "t=<unix time>,v1=<HMAC-SHA256 hex>")),
    request_body(content = String, description = "The event, exactly as Stripe sent it", content_type = "application/json"),
    responses(
        (status = 200, description = "Received: applied once, or acknowledged (duplicate, stale, unknown; a signed event billing cannot read is kept for an operator)", body = WebhookAck),
        (status = 400, description = "Bad signature, stale timestamp or malformed signature header", body = ErrorBody),
        (status = 503, description = "Billing is not configured", body = ErrorBody),
    ))]
pub async fn webhook(
    State(app): State<AppRef>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<axum::Json<WebhookAck>> {
    let signature = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let payload = std::str::from_utf8(&body)
        .map_err(|_| Error::BadRequest("the event is not UTF-8".into()))?;
    let outcome = webhook::receive(&app, payload, signature).await?;
    Ok(axum::Json(WebhookAck {
        received: true,
        outcome: outcome.as_str(),
    }))
}

/// The caller's billing state.
#[utoipa::path(get, path = "/api/billing", tag = "billing", security(("bearer" = [])),
    responses(
        (status = 200, description = "Tier, subscription status, period end, grace deadline", body = BillingView),
        (status = 401, description = "No valid token", body = ErrorBody),
    ))]
pub async fn me(State(app): State<AppRef>, user: AuthUser) -> Result<axum::Json<BillingView>> {
    let crate::billing::BillingState {
        tier,
        status,
        current_period_end,
        grace_until,
    } = crate::billing::state_of(&app.db, user.id).await?;
    Ok(axum::Json(BillingView {
        tier,
        status,
        current_period_end,
        grace_until,
    }))
}

fn stripe(app: &AppRef) -> Result<&crate::payments::StripeProvider> {
    app.stripe.as_ref().ok_or_else(|| Error::Disabled {
        code: "billing_disabled",
        message: "billing is not configured (--stripe-secret-key)".into(),
    })
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CheckoutBody {
    tier: Tier,
    success_url: String,
    cancel_url: String,
}

/// A Stripe Checkout page subscribing the caller to a paid tier.
#[utoipa::path(post, path = "/api/billing/checkout", tag = "billing", request_body = CheckoutBody, security(("bearer" = [])),
    params(("Idempotency-Key" = Option<String>, Header, description = "Repeats make the same Checkout Session")),
    responses(
        (status = 200, description = "Where to send the customer", body = CheckoutView),
        (status = 400, description = "Malformed JSON or an unknown tier", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "The account's email address is not verified yet (email_unverified)", body = ErrorBody),
        (status = 422, description = "A redirect URL off our origin, or a tier without a price", body = ErrorBody),
        (status = 503, description = "Billing is off, or Stripe did not answer", body = ErrorBody),
    ))]
pub async fn checkout(
    State(app): State<AppRef>,
    user: AuthUser,
    headers: axum::http::HeaderMap,
    ApiJson(body): ApiJson<CheckoutBody>,
) -> Result<axum::Json<CheckoutView>> {
    let provider = stripe(&app)?;
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.is_empty() && k.len() <= 200);
    let url = crate::billing::checkout::checkout(
        &app.db,
        &app.cfg,
        provider,
        user.id,
        body.tier,
        &body.success_url,
        &body.cancel_url,
        key,
    )
    .await?;
    Ok(axum::Json(CheckoutView { checkout_url: url }))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortalBody {
    return_url: String,
}

/// Stripe's customer portal (cards, invoices, cancellation).
#[utoipa::path(post, path = "/api/billing/portal", tag = "billing", request_body = PortalBody, security(("bearer" = [])),
    responses(
        (status = 200, description = "Where to send the customer", body = PortalView),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 409, description = "The account never paid", body = ErrorBody),
        (status = 422, description = "A return URL off our origin", body = ErrorBody),
        (status = 503, description = "Billing is off, or Stripe did not answer", body = ErrorBody),
    ))]
pub async fn portal(
    State(app): State<AppRef>,
    user: AuthUser,
    ApiJson(body): ApiJson<PortalBody>,
) -> Result<axum::Json<PortalView>> {
    let provider = stripe(&app)?;
    let url =
        crate::billing::checkout::portal(&app.db, &app.cfg, provider, user.id, &body.return_url)
            .await?;
    Ok(axum::Json(PortalView { portal_url: url }))
}

/// The account's AI credits: the balance (what no request has spent yet),
/// what proxies hold of it for requests, and this month's spending.
#[utoipa::path(get, path = "/api/credits", tag = "billing", security(("bearer" = [])),
    responses(
        (status = 200, description = "The account's AI credits", body = CreditsView),
        (status = 401, description = "No valid token", body = ErrorBody),
    ))]
pub async fn credits(State(app): State<AppRef>, user: AuthUser) -> Result<axum::Json<CreditsView>> {
    let u = crate::billing::credits::usage(&app.db, user.id, None).await?;
    Ok(axum::Json(CreditsView {
        balance_micros: u.credit_balance_micros,
        held_micros: u.leased_micros,
        spent_this_month_micros: u.charged_this_month_micros,
    }))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CreditsCheckoutBody {
    /// US cents, 500 to 50,000.
    amount_cents: i64,
    success_url: String,
    cancel_url: String,
}

fn idempotency_key(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.is_empty() && k.len() <= 200)
}

/// A Stripe Checkout page (payment mode) buying AI credits; they arrive
/// with its webhook, once.
#[utoipa::path(post, path = "/api/credits/checkout", tag = "billing", request_body = CreditsCheckoutBody, security(("bearer" = [])),
    params(("Idempotency-Key" = Option<String>, Header, description = "Repeats make the same Checkout Session")),
    responses(
        (status = 200, description = "Where to send the customer", body = CheckoutView),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "The account's email address is not verified yet (email_unverified)", body = ErrorBody),
        (status = 422, description = "An amount outside $5 – $500, or a redirect URL off our origin", body = ErrorBody),
        (status = 503, description = "Billing is off, or Stripe did not answer", body = ErrorBody),
    ))]
pub async fn credits_checkout(
    State(app): State<AppRef>,
    user: AuthUser,
    headers: axum::http::HeaderMap,
    ApiJson(body): ApiJson<CreditsCheckoutBody>,
) -> Result<axum::Json<CheckoutView>> {
    let provider = stripe(&app)?;
    let url = crate::billing::credits::checkout(
        &app.db,
        &app.cfg,
        provider,
        user.id,
        body.amount_cents,
        &body.success_url,
        &body.cancel_url,
        idempotency_key(&headers),
    )
    .await?;
    Ok(axum::Json(CheckoutView { checkout_url: url }))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TopUpBody {
    /// US cents, 500 to 50,000.
    amount_cents: i64,
}

/// Charges the card saved by the last credits purchase, off-session.
#[utoipa::path(post, path = "/api/credits/top-up", tag = "billing", request_body = TopUpBody, security(("bearer" = [])),
    params(("Idempotency-Key" = Option<String>, Header, description = "Repeats charge once")),
    responses(
        (status = 200, description = "Charged (the credits follow with the webhook), or the bank asks for authentication", body = TopUpView),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 402, description = "The card was declined (card_declined)", body = ErrorBody),
        (status = 409, description = "No card saved yet (no_saved_card)", body = ErrorBody),
        (status = 422, description = "An amount outside $5 – $500", body = ErrorBody),
        (status = 503, description = "Billing is off, or Stripe did not answer", body = ErrorBody),
    ))]
pub async fn credits_top_up(
    State(app): State<AppRef>,
    user: AuthUser,
    headers: axum::http::HeaderMap,
    ApiJson(body): ApiJson<TopUpBody>,
) -> Result<axum::Json<TopUpView>> {
    use crate::payments::Charged;
    let provider = stripe(&app)?;
    let charged = crate::billing::credits::top_up(
        &app.db,
        provider,
        user.id,
        body.amount_cents,
        idempotency_key(&headers),
    )
    .await?;
    match charged {
        Charged::Accepted { payment_intent } => Ok(axum::Json(TopUpView {
            requires_action: false,
            client_secret: None,
            payment_intent,
        })),
        Charged::RequiresAction {
            payment_intent,
            client_secret,
        } => Ok(axum::Json(TopUpView {
            requires_action: true,
            client_secret: Some(client_secret),
            payment_intent,
        })),
        Charged::Declined { reason } => Err(Error::PaymentDeclined(reason)),
    }
}
