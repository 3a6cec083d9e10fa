//! Moving an instance to another tier: the instance's tier and its
//! container's CPU and memory limits change in one transaction, and the
//! node's agent applies the new limits with `docker update`: the same
//! container, no restart.

use uuid::Uuid;

use crate::app::AppRef;
use crate::audit::audit;
use crate::error::{Error, Result};
use crate::model::{InstanceStatus, Tier};

/// Sets the instance's tier; returns the tier it had. A no-op (and no
/// push) when it already has it.
pub async fn set_tier(app: &AppRef, instance_id: Uuid, tier: Tier, actor: &str) -> Result<Tier> {
    let mut tx = app.db.begin().await?;
    let row: Option<(InstanceStatus, Tier, Option<Uuid>, Option<String>)> = sqlx::query_as(
        "SELECT i.status, i.tier, c.id, c.node_id
           FROM instances i LEFT JOIN containers c ON c.id = i.container_id
          WHERE i.id = $1 FOR UPDATE OF i",
    )
    .bind(instance_id)
    .fetch_optional(&mut *tx)
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
        return Ok(from);
    }
    let plan = tier.plan();
    sqlx::query("UPDATE instances SET tier = $2 WHERE id = $1")
        .bind(instance_id)
        .bind(tier)
        .execute(&mut *tx)
        .await?;
    if let Some(container) = container {
        sqlx::query(
            "UPDATE containers SET cpu_millis = $2, memory_bytes = $3, updated_at = now() WHERE id = $1",
        )
        .bind(container)
        .bind(i32::try_from(plan.cpu_millis).unwrap_or(i32::MAX))
        .bind(plan.memory_bytes())
        .execute(&mut *tx)
        .await?;
    }
    audit(
        &mut *tx,
        actor,
        "instance.tier",
        &instance_id.to_string(),
        serde_json::json!({"from": from, "to": tier}),
    )
    .await;
    tx.commit().await?;
    tracing::info!(%instance_id, ?from, to = ?tier, "tier changed; resizing the container in place");
    if let Some(node) = node {
        crate::agents::desired::bump_and_push(app, &node).await?;
    }
    Ok(from)
}
