//! The operator's view of nodes and changes to them: the list with usage and
//! counts, drain and activate, and removal for good.

use chrono::{DateTime, Utc};
use serde_json::json;

use crate::app::App;
use crate::audit::audit;
use crate::error::{Error, Result};
use crate::model::NodeState;

/// A node with its container counts and last reported usage.
#[derive(Debug, sqlx::FromRow)]
pub struct NodeSummary {
    pub id: String,
    pub state: NodeState,
    /// Its public address, or the private one it registered when no
    /// public address is known.
    pub ip: String,
    pub generation: i64,
    pub last_heartbeat: Option<DateTime<Utc>>,
    pub cert_not_after: Option<DateTime<Utc>>,
    pub containers: i64,
    pub idle: i64,
    pub assigned: i64,
    /// Some scheduler heard it within the heartbeat TTL.
    pub heartbeat_fresh: bool,
    pub cpu_busy_permille: i32,
    pub memory_available_bytes: i64,
    pub disk_available_bytes: i64,
    pub disk_total_bytes: i64,
    pub containers_running: i32,
    pub max_containers: i32,
    /// Its tenants are being migrated off.
    pub evacuating: bool,
    /// Tenants migrating off it now.
    pub migrating_out: i64,
}

pub async fn list(app: &App) -> Result<Vec<NodeSummary>> {
    Ok(sqlx::query_as(
        "SELECT n.id, n.state, COALESCE(NULLIF(n.public_address, ''), n.private_address) AS ip,
                n.generation, n.last_heartbeat, n.cert_not_after,
                c.containers, c.idle, c.assigned,
                COALESCE(n.last_heartbeat > now() - make_interval(secs => $1), false) AS heartbeat_fresh,
                n.cpu_busy_permille, n.memory_available_bytes, n.disk_available_bytes,
                n.disk_total_bytes, n.containers_running, n.max_containers, n.evacuating,
                (SELECT count(*) FROM migrations m
                  WHERE m.source_node = n.id AND m.state IN ('exporting', 'importing')) AS migrating_out
           FROM nodes n
           CROSS JOIN LATERAL (
                SELECT count(*) FILTER (WHERE state NOT IN ('destroyed', 'failed')) AS containers,
                       count(*) FILTER (WHERE state = 'idle') AS idle,
                       count(*) FILTER (WHERE state = 'assigned') AS assigned
                  FROM containers WHERE node_id = n.id) c
          ORDER BY n.id",
    )
    .bind(app.cfg.heartbeat_ttl.as_secs_f64())
    .fetch_all(&app.db)
    .await?)
}

/// Removes a node for good: its certificate is refused from its next call
/// on, its open session is closed now, and the pool stops using it. A node
/// that still holds tenants (running or suspended) is refused unless
/// `force`: their data would be lost with the node.
pub async fn remove(app: &App, node_id: &str, force: bool) -> Result<()> {
    let tenants: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM containers WHERE node_id = $1 AND state IN ('assigning', 'assigned', 'suspended', 'migrating')",
    )
    .bind(node_id)
    .fetch_one(&app.db)
    .await?;
    if tenants > 0 && !force {
        return Err(Error::Conflict {
            code: "node_has_tenants",
            message: format!(
                "node {node_id} still holds {tenants} tenant container(s): evacuate it first \
                 (POST /admin/nodes/{node_id}/drain {{\"evacuate\": true}}), or remove it with \
                 ?force=true and lose their data"
            ),
        });
    }
    let updated = sqlx::query("UPDATE nodes SET state = 'removed' WHERE id = $1")
        .bind(node_id)
        .execute(&app.db)
        .await?;
    if updated.rows_affected() == 0 {
        return Err(Error::NotFound("node"));
    }
    // Unused join tokens for the node die with it.
    sqlx::query("UPDATE join_tokens SET used_at = now() WHERE node_id = $1 AND used_at IS NULL")
        .bind(node_id)
        .execute(&app.db)
        .await?;
    app.sessions
        .close(node_id, format!("node {node_id} has been removed"));
    audit(
        &app.db,
        "operator",
        "node.remove",
        node_id,
        json!({"force": force, "tenants": tenants}),
    )
    .await;
    app.tasks.pool_manager.activate();
    tracing::warn!(node_id, "node removed by operator");
    Ok(())
}

/// Drains a node (no new containers; its idle ones stop counting, its
/// tenants stay) or makes it active again. A removed node stays removed.
/// `evacuate` (with draining) also migrates its tenants off; activating a
/// node stops an evacuation (migrations already running finish).
pub async fn set_state(app: &App, node_id: &str, state: NodeState, evacuate: bool) -> Result<()> {
    let from: Option<NodeState> = sqlx::query_scalar(
        "UPDATE nodes n SET state = $2, evacuating = $3
           FROM (SELECT id, state FROM nodes WHERE id = $1 FOR UPDATE) old
          WHERE n.id = old.id AND old.state IN ('active', 'draining', 'unreachable')
          RETURNING old.state",
    )
    .bind(node_id)
    .bind(state)
    .bind(evacuate && state == NodeState::Draining)
    .fetch_optional(&app.db)
    .await?;
    let Some(from) = from else {
        let exists: Option<NodeState> = sqlx::query_scalar("SELECT state FROM nodes WHERE id = $1")
            .bind(node_id)
            .fetch_optional(&app.db)
            .await?;
        return Err(match exists {
            None => Error::NotFound("node"),
            Some(_) => Error::Conflict {
                code: "node_removed",
                message: "a removed node cannot change state".into(),
            },
        });
    };
    audit(
        &app.db,
        "operator",
        "node.state",
        node_id,
        json!({"from": from, "to": state, "evacuate": evacuate}),
    )
    .await;
    app.tasks.pool_manager.activate();
    app.tasks.migrations.activate();
    tracing::info!(
        node_id,
        evacuate,
        from = from.as_str(),
        to = state.as_str(),
        "node state changed by operator"
    );
    Ok(())
}
