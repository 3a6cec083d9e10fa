//! The signup queue: instances that found every node full wait as `queued`
//! and get a container, in arrival order, as soon as one has room (a node
//! joins or is activated, a released instance's container goes). The first
//! one that still finds no room stops the pass, so nobody overtakes.

use uuid::Uuid;

use super::claim::attach;
use crate::agents::desired;
use crate::app::AppRef;
use crate::error::{Error, Result};

/// Assigns queued instances in order while there is room; returns how many.
pub async fn drain(app: &AppRef) -> Result<usize> {
    let mut assigned = 0;
    loop {
        let mut tx = app.db.begin().await?;
        // The oldest; another scheduler draining at once takes the next.
        let next: Option<Uuid> = sqlx::query_scalar(
            "SELECT id FROM instances WHERE status = 'queued'
              ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED",
        )
        .fetch_optional(&mut *tx)
        .await?;
        let Some(instance_id) = next else { break };
        match attach(app, &mut tx, instance_id).await {
            Ok(a) => {
                tx.commit().await?;
                assigned += 1;
                metrics::counter!("clawdeploy_assignments_total", "result" => "dequeued")
                    .increment(1);
                tracing::info!(%instance_id, node_id = a.node_id, container_id = %a.container_id, "queued signup assigned");
                desired::bump_and_push(app, &a.node_id).await?;
            }
            Err(Error::NoCapacity(_)) => break,
            Err(e) => return Err(e),
        }
    }
    if assigned > 0 {
        app.tasks.pool_manager.activate();
    }
    Ok(assigned)
}

/// Exports the queue's depth and its oldest entry's age.
pub async fn export_gauges(app: &AppRef) -> Result<()> {
    let (depth, oldest): (i64, Option<f64>) = sqlx::query_as(
        "SELECT count(*), extract(epoch FROM now() - min(created_at))::float8
           FROM instances WHERE status = 'queued'",
    )
    .fetch_one(&app.db)
    .await?;
    metrics::gauge!("clawdeploy_signup_queue_depth").set(depth as f64);
    metrics::gauge!("clawdeploy_signup_queue_oldest_age_seconds").set(oldest.unwrap_or(0.0));
    Ok(())
}
