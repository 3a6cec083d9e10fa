//! Evacuation: a draining node marked `evacuating` has its ready tenants
//! migrated off, at most `evacuate_concurrency` at a time across the fleet
//! per node, each to wherever placement finds room.

use uuid::Uuid;

use super::start::{start, MigrateRequest};
use crate::app::AppRef;
use crate::error::{Error, Result};
use crate::model::MigrationKind;

/// Starts migrations off every evacuating node, up to the bound each.
pub async fn advance(app: &AppRef) -> Result<()> {
    let nodes: Vec<(String, i64)> = sqlx::query_as(
        "SELECT n.id, (SELECT count(*) FROM migrations m
                        WHERE m.source_node = n.id AND m.state IN ('exporting', 'importing'))
           FROM nodes n WHERE n.evacuating AND n.state = 'draining'",
    )
    .fetch_all(&app.db)
    .await?;
    let bound = i64::from(app.cfg.evacuate_concurrency.max(1));
    for (node, running) in nodes {
        let room = bound - running;
        if room <= 0 {
            continue;
        }
        // Ready tenants not already moving (nor just rolled back twice:
        // the operator sees those in the migration's error).
        let next: Vec<Uuid> = sqlx::query_scalar(
            "SELECT i.id FROM instances i JOIN containers c ON c.id = i.container_id
              WHERE c.node_id = $1 AND c.state = 'assigned' AND i.status = 'ready'
                AND NOT EXISTS (SELECT 1 FROM migrations m WHERE m.instance_id = i.id
                                 AND m.state IN ('exporting', 'importing'))
                AND (SELECT count(*) FROM migrations m WHERE m.instance_id = i.id
                      AND m.kind = 'evacuate' AND m.state = 'rolled_back'
                      AND m.source_node = $1) < 2
              ORDER BY i.created_at LIMIT $2",
        )
        .bind(&node)
        .bind(room)
        .fetch_all(&app.db)
        .await?;
        for instance_id in next {
            let req = MigrateRequest {
                instance_id,
                target_node: None,
                kind: MigrationKind::Evacuate,
                actor: format!("evacuate:{node}"),
                from_backup: None,
            };
            match start(app, req).await {
                Ok(m) => {
                    tracing::info!(node, migration = %m.id, instance = %instance_id, "evacuating a tenant")
                }
                // Full fleet: tried again on the next pass.
                Err(Error::NoCapacity(_)) => {
                    tracing::warn!(node, "no node has room for an evacuated tenant; waiting");
                    break;
                }
                Err(e) => {
                    tracing::warn!(node, instance = %instance_id, error = %e, "evacuation step failed")
                }
            }
        }
    }
    Ok(())
}
