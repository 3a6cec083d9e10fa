//! The retry of a claim the agent has not confirmed in time (or on a node
//! whose state disk ran low): the container is destroyed and the instance
//! moves to a fresh one, off the silent node when any other has room;
//! a second miss fails the instance. The pool manager's leader runs it.

use std::collections::HashSet;

use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use super::pick::{mark_assigning, take_idle};
use crate::app::claims::InstanceNews;
use crate::app::{App, AppRef};
use crate::audit::audit;
use crate::error::{Error, Result};
use crate::fleet::capacity;
use crate::model::InstanceStatus;

/// Claims the agent has not confirmed in time, and claims on a node whose
/// state disk ran low (it cannot write their config, nor its ledger; they
/// move at once, without waiting for the timeout): each one's container is
/// destroyed and the instance moves to a fresh container, preferably on
/// another node (once; a second miss fails the instance). The claim timeout
/// runs from the later of the claim and the container first running: a
/// container created on demand may wait in a busy node's create queue, and
/// that node is working, not silent. Such a container gets the warm
/// timeout, unless its node stops heartbeating. Returns the nodes whose
/// desired state changed.
pub async fn retry_unconfirmed(app: &AppRef) -> Result<HashSet<String>> {
    #[derive(sqlx::FromRow)]
    struct Expired {
        instance_id: Uuid,
        container_id: Uuid,
        node_id: String,
        claim_attempts: i32,
    }
    let expired: Vec<Expired> = sqlx::query_as(
        "SELECT i.id AS instance_id, c.id AS container_id, c.node_id, i.claim_attempts FROM containers c
           JOIN instances i ON i.container_id = c.id AND i.status = 'pending'
          WHERE c.state = 'assigning'
            AND ((c.claimed_at < now() - make_interval(secs => $1)
                  AND ((c.warm_at IS NOT NULL AND GREATEST(c.claimed_at, c.warm_at) < now() - make_interval(secs => $1))
                       OR c.claimed_at < now() - make_interval(secs => $2)
                       OR NOT EXISTS (SELECT 1 FROM nodes n WHERE n.id = c.node_id AND n.state = 'active'
                                         AND n.last_heartbeat > now() - make_interval(secs => $3))))
                 OR EXISTS (SELECT 1 FROM nodes n WHERE n.id = c.node_id
                               AND n.disk_total_bytes > 0 AND n.disk_available_bytes < $4))
          ORDER BY c.claimed_at LIMIT 100",
    )
    .bind(app.cfg.claim_timeout.as_secs_f64())
    .bind(app.cfg.warm_timeout.as_secs_f64())
    .bind(app.cfg.heartbeat_ttl.as_secs_f64())
    .bind(app.cfg.min_disk())
    .fetch_all(&app.db)
    .await?;
    let mut touched = HashSet::new();
    for Expired {
        instance_id,
        container_id,
        node_id,
        claim_attempts,
    } in expired
    {
        match retry_one(app, instance_id, container_id, &node_id, claim_attempts).await {
            Ok(Some(new_node)) => {
                touched.insert(node_id);
                touched.extend(new_node);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(%instance_id, %container_id, error = %e, "unconfirmed claim not retried yet")
            }
        }
    }
    Ok(touched)
}

/// One unconfirmed claim, in one transaction. `Ok(None)`: it completed (or
/// was handled) meanwhile; `Ok(Some(node))`: the old container is being
/// destroyed and `node`, if any, has the new one.
async fn retry_one(
    app: &App,
    instance_id: Uuid,
    container_id: Uuid,
    node_id: &str,
    attempts: i32,
) -> Result<Option<Option<String>>> {
    let mut tx = app.db.begin().await?;
    let still: Option<InstanceStatus> = sqlx::query_scalar(
        "SELECT i.status FROM instances i JOIN containers c ON c.id = i.container_id
          WHERE i.id = $1 AND c.id = $2 AND c.state = 'assigning' AND i.status = 'pending'
          FOR UPDATE OF i, c SKIP LOCKED",
    )
    .bind(instance_id)
    .bind(container_id)
    .fetch_optional(&mut *tx)
    .await?;
    if still.is_none() {
        return Ok(None);
    }
    sqlx::query(
        "UPDATE containers SET state = 'destroying', message = 'claim not confirmed in time', updated_at = now() WHERE id = $1",
    )
    .bind(container_id)
    .execute(&mut *tx)
    .await?;
    if attempts >= 2 {
        sqlx::query(
            "UPDATE instances SET status = 'failed', message = 'no node confirmed the instance in time' WHERE id = $1",
        )
        .bind(instance_id)
        .execute(&mut *tx)
        .await?;
        audit(
            &mut *tx,
            "scheduler",
            "instance.failed",
            &instance_id.to_string(),
            serde_json::json!({"container": container_id, "node": node_id, "attempts": attempts}),
        )
        .await;
        tx.commit().await?;
        metrics::counter!("clawdeploy_assignments_total", "result" => "failed").increment(1);
        tracing::error!(%instance_id, %container_id, node_id, "claim unconfirmed twice: instance failed");
        let _ = app.instance_ready.send(InstanceNews::read_it(instance_id));
        return Ok(Some(None));
    }
    let (taken, on_demand) = move_target(app, &mut tx, node_id).await?;
    let (new_id, new_node) = (taken.id, taken.node_id);
    mark_assigning(&mut tx, new_id).await?;
    sqlx::query(
        "UPDATE instances SET container_id = $2, claim_attempts = claim_attempts + 1 WHERE id = $1",
    )
    .bind(instance_id)
    .bind(new_id)
    .execute(&mut *tx)
    .await?;
    audit(
        &mut *tx,
        "scheduler",
        "instance.claim_retry",
        &instance_id.to_string(),
        serde_json::json!({"from": container_id, "fromNode": node_id, "to": new_id, "toNode": new_node, "onDemand": on_demand}),
    )
    .await;
    tx.commit().await?;
    metrics::counter!("clawdeploy_assignments_total", "result" => "retried").increment(1);
    if on_demand {
        metrics::counter!("clawdeploy_claim_fallbacks_total").increment(1);
    }
    tracing::warn!(%instance_id, from = %container_id, from_node = node_id, to = %new_id, to_node = new_node, "claim not confirmed in time: moved to a fresh container");
    app.tasks.pool_manager.activate();
    Ok(Some(Some(new_node)))
}

/// Where an unconfirmed claim moves, and whether that container was
/// created for it: anywhere but the silent node first, idle before on
/// demand (an idle container there would otherwise catch the retry while
/// the other nodes still refill, and the second miss fails the instance);
/// only when no other node has room, the silent node again.
async fn move_target(
    app: &App,
    tx: &mut Transaction<'_, Postgres>,
    silent: &str,
) -> Result<(capacity::Taken, bool)> {
    if let Some(taken) = take_idle(app, tx, Some(silent)).await? {
        return Ok((taken, false));
    }
    match capacity::create_on_demand(app, tx, Some(silent)).await {
        Ok(taken) => return Ok((taken, true)),
        Err(Error::NoCapacity(_)) => {}
        Err(e) => return Err(e),
    }
    match take_idle(app, tx, None).await? {
        Some(taken) => Ok((taken, false)),
        None => Ok((capacity::create_on_demand(app, tx, None).await?, true)),
    }
}
