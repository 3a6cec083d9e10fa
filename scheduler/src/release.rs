//! `DELETE /api/instances/me`: a customer releases their gateway. The route
//! goes first (the edges 404 the host before the answer leaves), then the
//! container is stopped with its volume kept; the instance stays `deleting`
//! and keeps its subdomain for the grace period (DESIGN.md, "Release").
//! After it, the pool manager destroys the container and its volume; the
//! subdomain stays out of reach of other customers for the cool-down.

use axum::extract::State;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::app::AppRef;
use crate::auth::AuthUser;
use crate::error::{Error, Result};
use crate::routes;

#[utoipa::path(delete, path = "/api/instances/me", tag = "instances", security(("bearer" = [])),
    responses(
        (status = 200, description = "Released: the host 404s now; data kept for the grace period", body = crate::openapi::ReleasedView),
        (status = 401, description = "No valid token", body = crate::openapi::ErrorBody),
        (status = 404, description = "No instance to release", body = crate::openapi::ErrorBody),
    ))]
pub async fn release(State(app): State<AppRef>, user: AuthUser) -> Result<axum::Json<Value>> {
    let mut tx = app.db.begin().await?;
    let row: Option<(Uuid, String, Option<Uuid>, Option<String>)> = sqlx::query_as(
        "SELECT i.id, i.subdomain, i.container_id, c.node_id
           FROM instances i LEFT JOIN containers c ON c.id = i.container_id
          WHERE i.user_id = $1 AND i.status IN ('pending', 'ready', 'suspended')
          ORDER BY i.created_at DESC LIMIT 1
          FOR UPDATE OF i",
    )
    .bind(user.id)
    .fetch_optional(&mut *tx)
    .await?;
    let (instance_id, subdomain, container_id, node_id) = row.ok_or(Error::NotFound("instance"))?;
    let removed = routes::remove_for_instance(&mut tx, instance_id).await?;
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
    crate::audit(
        &mut *tx,
        &format!("user:{}", user.id),
        "instance.released",
        &instance_id.to_string(),
        json!({"subdomain": subdomain, "container": container_id}),
    )
    .await;
    tx.commit().await?;

    let version = removed.iter().map(|d| d.version).max();
    routes::broadcast(&app, removed, None).await;
    if let Some(v) = version {
        routes::wait_edges(&app, instance_id, v).await;
    }
    if let Some(node) = node_id {
        // The route is gone everywhere; now the container may stop.
        crate::desired::bump_and_push(&app, &node).await?;
    }
    tracing::info!(%instance_id, subdomain, "instance released");
    Ok(axum::Json(json!({
        "id": instance_id,
        "subdomain": subdomain,
        "status": "deleting",
    })))
}

/// Destroys what released instances left once their grace period is over:
/// the instance becomes `deleted`, its container `destroying` (the agent
/// removes it and its volume). Run by the pool manager.
pub async fn sweep_expired(app: &AppRef) -> Result<Vec<String>> {
    let mut tx = app.db.begin().await?;
    let rows: Vec<(Uuid, Option<Uuid>)> = sqlx::query_as(
        "UPDATE instances SET status = 'deleted'
          WHERE status = 'deleting' AND released_at < now() - make_interval(secs => $1)
          RETURNING id, container_id",
    )
    .bind(app.cfg.release_grace.as_secs_f64())
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
        crate::audit(
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

/// Whether `subdomain` was released to the cool-down recently (by someone
/// other than `user_id`, who may take their own name back).
pub async fn cooling_down(app: &AppRef, subdomain: &str, user_id: Uuid) -> Result<bool> {
    let hit: Option<i32> = sqlx::query_scalar(
        "SELECT 1 FROM instances
          WHERE subdomain = $1 AND user_id <> $2 AND status = 'deleted'
            AND released_at > now() - make_interval(secs => $3)
          LIMIT 1",
    )
    .bind(subdomain)
    .bind(user_id)
    .bind(app.cfg.subdomain_cooldown.as_secs_f64())
    .fetch_optional(&app.db)
    .await?;
    Ok(hit.is_some())
}
