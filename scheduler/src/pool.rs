//! The pool manager keeps `min_idle ≤ idle + warming ≤ max_idle` warm
//! containers spread over healthy nodes. Exactly one scheduler runs it: the
//! one holding a PostgreSQL advisory lock on a dedicated connection. It runs
//! on every wake (claim, container idle, node hello) and on a timer.

use std::collections::HashSet;
use std::time::Duration;

use sqlx::{Connection, PgConnection, Postgres, Transaction};
use tokio::sync::watch;
use uuid::Uuid;

use crate::app::{App, AppRef};
use crate::crypto::random_token;
use crate::desired;
use crate::error::{Error, Result};

/// Arbitrary but fixed: the advisory lock that elects the pool manager.
const POOL_LOCK_KEY: i64 = 0x0C1A_D3E9;

/// Resources a pool container starts with: the free tier (0.5 CPU, 512 MB).
pub const POOL_CPU_MILLIS: i32 = 500;
pub const POOL_MEMORY_BYTES: i64 = 512 * 1024 * 1024;
pub const POOL_PIDS: i32 = 256;

pub async fn run(app: AppRef, mut shutdown: watch::Receiver<bool>) {
    // The lock lives as long as this dedicated connection (taken out of the
    // pool so it is never shared); losing the connection loses the lock.
    let mut lock: Option<PgConnection> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = app.pool_wake.notified() => {
                // Coalesce a burst of claims into one refill (one push per
                // node instead of one per claim).
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            _ = tick.tick() => {}
            _ = shutdown.changed() => break,
        }
        match lock.as_mut() {
            None => lock = try_lock(&app).await,
            Some(conn) => {
                if conn.ping().await.is_err() {
                    tracing::warn!("lost the pool manager lock's connection");
                    metrics::gauge!("clawdeploy_pool_manager_leader").set(0.0);
                    lock = None;
                }
            }
        }
        if lock.is_none() {
            continue;
        }
        if let Err(e) = reconcile(&app).await {
            tracing::warn!(error = %e, "pool reconcile failed");
        }
    }
    if let Some(conn) = lock {
        let _ = conn.close().await;
    }
}

async fn try_lock(app: &App) -> Option<PgConnection> {
    let mut conn = app.db.acquire().await.ok()?.detach();
    let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(POOL_LOCK_KEY)
        .fetch_one(&mut conn)
        .await
        .ok()?;
    if got {
        tracing::info!("this scheduler now runs the pool manager");
        metrics::gauge!("clawdeploy_pool_manager_leader").set(1.0);
        Some(conn)
    } else {
        None
    }
}

#[derive(Debug)]
struct NodeLoad {
    id: String,
    max: i64,
    pool: i64,
    total: i64,
}

async fn schedulable_nodes(app: &App, tx: &mut Transaction<'_, Postgres>) -> Result<Vec<NodeLoad>> {
    let rows: Vec<(String, i32, i64, i64)> = sqlx::query_as(
        // No row locks: claims bump node generations concurrently, and one
        // pool manager places containers. A rare on-demand claim racing a
        // refill may put one container more on a node than planned.
        "SELECT n.id, n.max_containers, c.pool, c.total
           FROM nodes n
           CROSS JOIN LATERAL (
                SELECT count(*) FILTER (WHERE state IN ('creating', 'warming', 'idle')) AS pool,
                       count(*) FILTER (WHERE state IN ('creating', 'warming', 'idle', 'assigning', 'assigned', 'suspended', 'destroying')) AS total
                  FROM containers WHERE node_id = n.id) c
          WHERE n.state = 'active' AND n.last_heartbeat > now() - make_interval(secs => $1)
          ORDER BY n.id",
    )
    .bind(app.cfg.heartbeat_ttl.as_secs_f64())
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, max, pool, total)| NodeLoad {
            id,
            max: i64::from(max),
            pool,
            total,
        })
        .collect())
}

/// Picks the node for one more container: fewest pool containers, then
/// fewest containers overall, among nodes with room.
fn pick(nodes: &mut [NodeLoad]) -> Option<&mut NodeLoad> {
    nodes
        .iter_mut()
        .filter(|n| n.total < n.max)
        .min_by_key(|n| (n.pool, n.total))
}

async fn insert_container(
    app: &App,
    tx: &mut Transaction<'_, Postgres>,
    node_id: &str,
    state: &str,
) -> Result<(Uuid, Vec<u8>)> {
    let id = Uuid::new_v4();
    let token = app
        .secrets
        .seal(&App::gateway_token_aad(id), random_token(32).as_bytes())?;
    sqlx::query(
        "INSERT INTO containers (id, node_id, image, pool_generation, gateway_token_enc, state, cpu_millis, memory_bytes, pids)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(id)
    .bind(node_id)
    .bind(&app.cfg.image)
    .bind(app.cfg.pool_generation)
    .bind(&token)
    .bind(state)
    .bind(POOL_CPU_MILLIS)
    .bind(POOL_MEMORY_BYTES)
    .bind(POOL_PIDS)
    .execute(&mut **tx)
    .await?;
    Ok((id, token))
}

/// Empty pool: a container created for one customer inside the claim's
/// transaction. The caller marks it `assigning` and bumps the node.
pub async fn create_on_demand(
    app: &App,
    tx: &mut Transaction<'_, Postgres>,
) -> Result<(Uuid, String, Vec<u8>)> {
    let mut nodes = schedulable_nodes(app, tx).await?;
    let node =
        pick(&mut nodes).ok_or_else(|| Error::NoCapacity("no schedulable node has room".into()))?;
    let node_id = node.id.clone();
    let (id, token) = insert_container(app, tx, &node_id, "creating").await?;
    tracing::info!(container_id = %id, node_id, "pool empty: creating a container on demand");
    Ok((id, node_id, token))
}

async fn reconcile(app: &AppRef) -> Result<()> {
    let mut tx = app.db.begin().await?;
    // Silent nodes stop counting; their tenants are left alone.
    let lost: Vec<String> = sqlx::query_scalar(
        "UPDATE nodes SET state = 'unreachable'
          WHERE state = 'active' AND (last_heartbeat IS NULL OR last_heartbeat < now() - make_interval(secs => $1))
          RETURNING id",
    )
    .bind(app.cfg.heartbeat_ttl.as_secs_f64())
    .fetch_all(&mut *tx)
    .await?;
    for node in &lost {
        tracing::warn!(node_id = node, "node missed heartbeats: unreachable");
        crate::audit(
            &mut *tx,
            "scheduler",
            "node.unreachable",
            node,
            serde_json::json!({}),
        )
        .await;
    }
    // Pool containers that never became healthy are replaced.
    let stuck: Vec<String> = sqlx::query_scalar(
        "UPDATE containers SET state = 'destroying', message = 'did not become healthy in time', updated_at = now()
          WHERE state IN ('creating', 'warming') AND created_at < now() - make_interval(secs => $1)
            AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.container_id = containers.id)
          RETURNING node_id",
    )
    .bind(app.cfg.warm_timeout.as_secs_f64())
    .fetch_all(&mut *tx)
    .await?;
    let mut touched: HashSet<String> = stuck.into_iter().collect();

    let mut nodes = schedulable_nodes(app, &mut tx).await?;
    let warm: i64 = nodes.iter().map(|n| n.pool).sum();
    let idle: i64 = sqlx::query_scalar("SELECT count(*) FROM containers WHERE state = 'idle'")
        .fetch_one(&mut *tx)
        .await?;
    metrics::gauge!("clawdeploy_pool_idle").set(idle as f64);
    metrics::gauge!("clawdeploy_pool_warm").set(warm as f64);
    let target = i64::from(app.cfg.min_idle.min(app.cfg.max_idle));
    let mut created = 0;
    while warm + created < target {
        let Some(node) = pick(&mut nodes) else {
            tracing::warn!(warm, target, "pool below target and no node has room");
            break;
        };
        node.pool += 1;
        node.total += 1;
        let node_id = node.id.clone();
        insert_container(app, &mut tx, &node_id, "creating").await?;
        touched.insert(node_id);
        created += 1;
    }
    if created == 0 {
        if let Some(node) = rebalance(app, &mut tx, &mut nodes, warm, idle, target).await? {
            touched.insert(node);
        }
    }
    tx.commit().await?;
    if created > 0 {
        tracing::info!(created, warm, target, "pool refill");
    }
    for node in touched {
        desired::bump_and_push(app, &node).await?;
    }
    Ok(())
}

/// What one rebalancing step should do, if anything.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Create one more container on this node (a brief overshoot by one).
    Grow(usize),
    /// Retire one idle container from this node.
    Retire(usize),
}

/// Spreads the warm pool: when one node holds at least two more pool
/// containers than another, first add one on the emptier node, then (once
/// the pool is over target with idle to spare) retire one from the fuller
/// node. Also trims a pool above `max_idle`. One step per pass, so the idle
/// count never dips below the target while it converges.
fn rebalance_step(
    nodes: &[NodeLoad],
    warm: i64,
    idle: i64,
    target: i64,
    max_idle: i64,
) -> Option<Step> {
    let fullest = (0..nodes.len()).max_by_key(|&i| (nodes[i].pool, std::cmp::Reverse(i)))?;
    if warm > max_idle && idle > target {
        return Some(Step::Retire(fullest));
    }
    let emptiest = (0..nodes.len())
        .filter(|&i| nodes[i].total < nodes[i].max)
        .min_by_key(|&i| (nodes[i].pool, nodes[i].total))?;
    if nodes[fullest].pool - nodes[emptiest].pool < 2 {
        return None;
    }
    if warm <= target && warm < max_idle {
        Some(Step::Grow(emptiest))
    } else if warm > target && idle > target {
        Some(Step::Retire(fullest))
    } else {
        None
    }
}

async fn rebalance(
    app: &App,
    tx: &mut Transaction<'_, Postgres>,
    nodes: &mut [NodeLoad],
    warm: i64,
    idle: i64,
    target: i64,
) -> Result<Option<String>> {
    match rebalance_step(nodes, warm, idle, target, i64::from(app.cfg.max_idle)) {
        Some(Step::Grow(i)) => {
            let node_id = nodes[i].id.clone();
            insert_container(app, tx, &node_id, "creating").await?;
            tracing::info!(node_id, "rebalancing the pool: one more container here");
            Ok(Some(node_id))
        }
        Some(Step::Retire(i)) => {
            let node_id = nodes[i].id.clone();
            let retired: Option<Uuid> = sqlx::query_scalar(
                "UPDATE containers SET state = 'destroying', message = 'retired by pool rebalancing', updated_at = now()
                  WHERE id = (SELECT id FROM containers WHERE node_id = $1 AND state = 'idle'
                               ORDER BY created_at DESC LIMIT 1 FOR UPDATE SKIP LOCKED)
                  RETURNING id",
            )
            .bind(&node_id)
            .fetch_optional(&mut **tx)
            .await?;
            if let Some(id) = retired {
                tracing::info!(node_id, container_id = %id, "rebalancing the pool: retired an idle container");
            }
            Ok(retired.map(|_| node_id))
        }
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pick_spreads_and_respects_capacity() {
        let mut nodes = vec![
            NodeLoad {
                id: "a".into(),
                max: 3,
                pool: 0,
                total: 0,
            },
            NodeLoad {
                id: "b".into(),
                max: 3,
                pool: 0,
                total: 0,
            },
        ];
        let mut placed = Vec::new();
        while let Some(n) = pick(&mut nodes) {
            n.pool += 1;
            n.total += 1;
            placed.push(n.id.clone());
        }
        assert_eq!(placed, ["a", "b", "a", "b", "a", "b"]);
    }

    #[test]
    fn rebalancing_converges_without_dropping_idle_below_target() {
        // Node a filled the pool alone before b connected.
        let mut nodes = vec![
            NodeLoad {
                id: "a".into(),
                max: 20,
                pool: 5,
                total: 5,
            },
            NodeLoad {
                id: "b".into(),
                max: 20,
                pool: 0,
                total: 0,
            },
        ];
        let mut steps = 0;
        while let Some(step) = rebalance_step(
            &nodes,
            nodes.iter().map(|n| n.pool).sum(),
            nodes.iter().map(|n| n.pool).sum(),
            5,
            20,
        ) {
            match step {
                Step::Grow(i) => nodes[i].pool += 1,
                Step::Retire(i) => nodes[i].pool -= 1,
            }
            let total: i64 = nodes.iter().map(|n| n.pool).sum();
            assert!(total >= 5, "idle dipped below target");
            steps += 1;
            assert!(steps < 20);
        }
        assert_eq!((nodes[0].pool, nodes[1].pool), (3, 2));
    }
}
