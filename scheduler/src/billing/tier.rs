//! Moving an instance to another tier: the instance's tier and its
//! container's CPU and memory limits change in one transaction, and the
//! node's agent applies the new limits with `docker update`: the same
//! container, no restart.

use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use crate::app::{App, AppRef};
use crate::audit::audit;
use crate::error::{Error, Result};
use crate::model::{InstanceStatus, Tier};

/// What a tier change did: the tier before, and the node whose desired
/// state changed (to push after the commit).
pub struct Changed {
    pub from: Tier,
    pub node: Option<String>,
    /// Custom domains the change switched off or on, for the edges.
    pub routes: Vec<clawdeploy_proto::RouteDelta>,
}

/// Sets the instance's tier inside the caller's transaction. A no-op when
/// it already has it.
pub async fn set_tier_in(
    app: &App,
    tx: &mut Transaction<'_, Postgres>,
    instance_id: Uuid,
    tier: Tier,
    actor: &str,
) -> Result<Changed> {
    let row: Option<(InstanceStatus, Tier, Option<Uuid>, Option<String>)> = sqlx::query_as(
        "SELECT i.status, i.tier, c.id, c.node_id
           FROM instances i LEFT JOIN containers c ON c.id = i.container_id
          WHERE i.id = $1 FOR UPDATE OF i",
    )
    .bind(instance_id)
    .fetch_optional(&mut **tx)
    .await?;
    let (status, from, container, node) = row.ok_or(Error::NotFound("instance"))?;
    if matches!(
        status,
        InstanceStatus::Deleting | InstanceStatus::Deleted | InstanceStatus::Failed
    ) {
        return Err(Error::Conflict {
            code: "instance_not_live",
            message: format!("a {status:?} instance keeps its tier"),
        });
    }
    if from == tier {
        return Ok(Changed {
            from,
            node: None,
            routes: Vec::new(),
        });
    }
    let plan = tier.plan();
    sqlx::query("UPDATE instances SET tier = $2 WHERE id = $1")
        .bind(instance_id)
        .bind(tier)
        .execute(&mut **tx)
        .await?;
    if let Some(container) = container {
        sqlx::query(
            "UPDATE containers SET cpu_millis = $2, memory_bytes = $3, updated_at = now() WHERE id = $1",
        )
        .bind(container)
        .bind(i32::try_from(plan.cpu_millis).unwrap_or(i32::MAX))
        .bind(plan.memory_bytes())
        .execute(&mut **tx)
        .await?;
    }
    audit(
        &mut **tx,
        actor,
        "instance.tier",
        &instance_id.to_string(),
        serde_json::json!({"from": from, "to": tier}),
    )
    .await;
    let routes =
        crate::routes::custom::plan_changed(app, tx, instance_id, plan.custom_domains).await?;
    tracing::info!(%instance_id, ?from, to = ?tier, "tier changed; resizing the container in place");
    Ok(Changed { from, node, routes })
}

/// The account's live instance, if it has one.
pub async fn live_instance_of(
    tx: &mut Transaction<'_, Postgres>,
    user_id: Uuid,
) -> Result<Option<Uuid>> {
    Ok(sqlx::query_scalar(
        "SELECT id FROM instances
          WHERE user_id = $1 AND status IN ('queued', 'pending', 'ready', 'suspended')
          ORDER BY created_at DESC LIMIT 1",
    )
    .bind(user_id)
    .fetch_optional(&mut **tx)
    .await?)
}

/// Sets the instance's tier in a transaction of its own and pushes the
/// node; returns the tier it had.
pub async fn set_tier(app: &AppRef, instance_id: Uuid, tier: Tier, actor: &str) -> Result<Tier> {
    let mut tx = app.db.begin().await?;
    let changed = set_tier_in(app, &mut tx, instance_id, tier, actor).await?;
    tx.commit().await?;
    crate::routes::broadcast(app, changed.routes, None).await;
    if let Some(node) = &changed.node {
        crate::agents::desired::bump_and_push(app, node).await?;
    }
    Ok(changed.from)
}
