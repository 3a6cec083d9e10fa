//! Billing's HTTP face: the public plan list, and the operator's tier
//! change (a comped account, a support fix; Stripe's webhooks will use the
//! same path).

use axum::extract::{Path, State};
use serde::Deserialize;
use uuid::Uuid;

use super::extract::{ApiJson, Operator};
use super::views::{ErrorBody, PlanList, PlanView, TierChangeView};
use crate::app::AppRef;
use crate::billing::{plans::PLANS, tier};
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
