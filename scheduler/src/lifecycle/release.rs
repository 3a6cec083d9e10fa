//! A customer releases their gateway (`DELETE /api/instances/me`). The route
//! goes first (the edges 404 the host before the answer leaves), then the
//! container is stopped with its volume kept; the instance stays `deleting`
//! and keeps its subdomain for the grace period (docs/architecture.md,
//! "Release").
//! After it, the pool manager destroys the container and its volume; the
//! subdomain stays out of reach of other customers for the cool-down.

use serde_json::json;
use uuid::Uuid;

use super::instances;
use crate::agents::desired;
use crate::app::AppRef;
use crate::audit::audit;
use crate::error::{Error, Result};
use crate::model::{BackupKind, InstanceStatus};
use crate::routes;

/// A released instance.
#[derive(Debug)]
pub struct Released {
    pub id: Uuid,
    pub subdomain: String,
}

/// Releases the user's live instance: the route goes (and the edges
/// confirm), then the container stops with its volume kept.
pub async fn release(app: &AppRef, user_id: Uuid) -> Result<Released> {
    let mut tx = app.db.begin().await?;
    let instances::Locked {
        id: instance_id,
        subdomain,
        container_id,
        node_id,
        ..
    } = instances::lock_newest(
        &mut tx,
        user_id,
        &[
            InstanceStatus::Queued,
            InstanceStatus::Pending,
            InstanceStatus::Ready,
            InstanceStatus::Suspended,
        ],
    )
    .await?;
    let removed = routes::remove_for_instance(&mut tx, instance_id).await?;
    // Its custom domains go with it: the names are free for their next owner.
    sqlx::query("DELETE FROM domains WHERE instance_id = $1")
        .bind(instance_id)
        .execute(&mut *tx)
        .await?;
    sqlx::query("UPDATE instances SET status = 'deleting', released_at = now() WHERE id = $1")
        .bind(instance_id)
        .execute(&mut *tx)
        .await?;
    if let Some(c) = container_id {
        sqlx::query(
            "UPDATE containers SET state = 'suspended' WHERE id = $1 AND state NOT IN ('destroying', 'destroyed', 'failed')",
        )
        .bind(c)
        .execute(&mut *tx)
        .await?;
    }
    audit(
        &mut *tx,
        &format!("user:{user_id}"),
        "instance.released",
        &instance_id.to_string(),
        json!({"subdomain": subdomain, "container": container_id}),
    )
    .await;
    tx.commit().await?;

    let version = routes::last_sent(&removed);
    routes::broadcast(app, removed, None).await;
    if let Some(v) = version {
        routes::wait_edges(app, instance_id, v).await;
    }
    if let Some(node) = node_id {
        // The route is gone everywhere; now the container may stop.
        desired::bump_and_push(app, &node).await?;
    }
    tracing::info!(%instance_id, subdomain, "instance released");
    Ok(Released {
        id: instance_id,
        subdomain,
    })
}

/// Destroys what released instances left once their grace period is over:
/// the instance becomes `deleted`, its container `destroying` (the agent
/// removes it and its volume). With an archive store, the data is first
/// exported (a `release` backup); an instance is destroyed only once that
/// backup is stored, and one whose export failed is tried again on the next
/// pass. Run by the pool manager.
pub async fn sweep_expired(app: &AppRef) -> Result<Vec<String>> {
    // Held back: due, with a stopped container whose data is not exported
    // yet.
    let unexported: Vec<(Uuid, bool)> = if app.archives.is_some() {
        sqlx::query_as(
            "SELECT i.id, EXISTS (SELECT 1 FROM backups b WHERE b.instance_id = i.id AND b.state = 'taking')
               FROM instances i JOIN containers c ON c.id = i.container_id AND c.state = 'suspended'
              WHERE i.status = 'deleting' AND i.released_at < now() - make_interval(secs => $1)
                AND NOT EXISTS (SELECT 1 FROM backups b WHERE b.instance_id = i.id
                                 AND b.kind = 'release' AND b.state = 'stored')",
        )
        .bind(app.cfg.release_grace.as_secs_f64())
        .fetch_all(&app.db)
        .await?
    } else {
        Vec::new()
    };
    for (instance, taking) in &unexported {
        if !taking {
            match crate::backup::take(app, *instance, BackupKind::Release).await {
                Ok(_) | Err(Error::Conflict { .. }) => {}
                Err(e) => {
                    tracing::warn!(%instance, error = %e, "export before destruction not started; trying again")
                }
            }
        }
    }
    let held: Vec<Uuid> = unexported.iter().map(|(id, _)| *id).collect();
    let mut tx = app.db.begin().await?;
    let rows: Vec<(Uuid, Option<Uuid>)> = sqlx::query_as(
        "UPDATE instances SET status = 'deleted'
          WHERE status = 'deleting' AND released_at < now() - make_interval(secs => $1)
            AND id <> ALL($2)
          RETURNING id, container_id",
    )
    .bind(app.cfg.release_grace.as_secs_f64())
    .bind(&held)
    .fetch_all(&mut *tx)
    .await?;
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let containers: Vec<Uuid> = rows.iter().filter_map(|r| r.1).collect();
    let nodes: Vec<String> = sqlx::query_scalar(
        "UPDATE containers SET state = 'destroying', updated_at = now()
          WHERE id = ANY($1) AND state NOT IN ('destroyed', 'failed')
          RETURNING node_id",
    )
    .bind(&containers)
    .fetch_all(&mut *tx)
    .await?;
    for (instance, container) in &rows {
        audit(
            &mut *tx,
            "scheduler",
            "instance.destroyed",
            &instance.to_string(),
            json!({"container": container, "reason": "grace period over"}),
        )
        .await;
    }
    tx.commit().await?;
    tracing::info!(
        instances = rows.len(),
        "released instances destroyed after their grace period"
    );
    Ok(nodes)
}
