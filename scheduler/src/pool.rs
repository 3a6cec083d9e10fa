//! The pool manager keeps `min_idle ≤ idle + warming ≤ max_idle` warm
//! containers of the current generation spread over healthy nodes, marks
//! silent nodes unreachable, replaces containers that never warmed, retries
//! unconfirmed claims and rolls the pool to a new image or generation.
//! Exactly one scheduler runs it: the one holding a PostgreSQL advisory lock
//! on a dedicated connection. It runs on every wake (claim, container idle,
//! node hello) and at least once a second.

use std::collections::HashSet;
use std::time::Duration;

use sqlx::{Connection, PgConnection, Postgres, Transaction};
use tokio::sync::watch;
use uuid::Uuid;

use crate::app::{App, AppRef};
use crate::crypto::random_token;
use crate::demand;
use crate::error::{Error, Result};
use crate::placement::{self, NodeLoad, Step};
use crate::settings::{self, PoolSettings};
use crate::{assign, desired};

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
    let mut passes: u64 = 0;
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
        passes += 1;
        if passes % 300 == 1 {
            crate::idempotency::purge_expired(&app).await;
            crate::auth::purge_login_failures(&app).await;
        }
    }
    if let Some(conn) = lock {
        let _ = conn.close().await;
    }
}

async fn try_lock(app: &App) -> Option<PgConnection> {
    let mut conn = match app.db.acquire().await {
        Ok(c) => c.detach(),
        Err(e) => {
            tracing::warn!(error = %e, "no database connection for the pool manager lock");
            return None;
        }
    };
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

type NodeRow = (String, i32, i64, i64, i32, i64, i64);

/// Nodes an on-demand claim considers: the ones whose heartbeats report
/// the most room, counted exactly. Counting every node's containers on
/// every claim would make claims cost O(fleet).
const ON_DEMAND_CANDIDATES: i64 = 16;

/// Active nodes with a fresh heartbeat, with their load: all of them, or
/// the `candidates` with the most room by their last heartbeat. `pool`
/// counts only containers of the current generation: stale ones are on
/// their way out.
async fn schedulable_nodes<'e>(
    app: &App,
    db: impl sqlx::PgExecutor<'e>,
    s: &PoolSettings,
    candidates: Option<i64>,
) -> Result<Vec<NodeLoad>> {
    let rows: Vec<NodeRow> = sqlx::query_as(
        // No row locks: claims bump node generations concurrently, and one
        // pool manager places containers. A rare on-demand claim racing a
        // refill may put one container more on a node than planned.
        "WITH live AS (
            SELECT id FROM nodes
             WHERE state = 'active' AND last_heartbeat > now() - make_interval(secs => $1)
             ORDER BY containers_running::float8 / GREATEST(max_containers, 1), memory_available_bytes DESC
             LIMIT $4)
         SELECT n.id, n.max_containers, n.memory_bytes, n.memory_available_bytes, n.cpu_busy_permille,
                count(c.id) FILTER (WHERE c.state IN ('creating', 'warming', 'idle')
                                      AND c.image = $2 AND c.pool_generation = $3),
                count(c.id)
           FROM nodes n
           JOIN live USING (id)
           LEFT JOIN containers c ON c.node_id = n.id
                AND c.state IN ('creating', 'warming', 'idle', 'assigning', 'assigned', 'suspended', 'destroying')
          GROUP BY n.id
          ORDER BY n.id",
    )
    .bind(app.cfg.heartbeat_ttl.as_secs_f64())
    .bind(&s.image)
    .bind(s.generation)
    .bind(candidates)
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(id, max, mem_total, mem_avail, cpu, pool, total)| NodeLoad {
                id,
                max: i64::from(max),
                pool,
                total,
                memory_available: mem_avail,
                memory_total: mem_total,
                cpu_busy_permille: i64::from(cpu),
            },
        )
        .collect())
}

async fn insert_container(
    app: &App,
    tx: &mut Transaction<'_, Postgres>,
    s: &PoolSettings,
    node_id: &str,
) -> Result<(Uuid, Vec<u8>)> {
    let id = Uuid::new_v4();
    let token = app
        .secrets
        .seal(&App::gateway_token_aad(id), random_token(32).as_bytes())?;
    sqlx::query(
        "INSERT INTO containers (id, node_id, image, pool_generation, gateway_token_enc, state, cpu_millis, memory_bytes, pids)
         VALUES ($1, $2, $3, $4, $5, 'creating', $6, $7, $8)",
    )
    .bind(id)
    .bind(node_id)
    .bind(&s.image)
    .bind(s.generation)
    .bind(&token)
    .bind(POOL_CPU_MILLIS)
    .bind(POOL_MEMORY_BYTES)
    .bind(POOL_PIDS)
    .execute(&mut **tx)
    .await?;
    Ok((id, token))
}

/// Empty pool: a container created for one customer inside the claim's
/// transaction, on another node than `avoid` when one has room. The caller
/// marks it `assigning` and bumps the node.
pub async fn create_on_demand(
    app: &App,
    tx: &mut Transaction<'_, Postgres>,
    avoid: Option<&str>,
) -> Result<(Uuid, String, Vec<u8>)> {
    let s = settings::load(&mut **tx).await?;
    let mut nodes = schedulable_nodes(app, &mut **tx, &s, Some(ON_DEMAND_CANDIDATES)).await?;
    let node = match avoid {
        Some(avoid) => placement::pick_avoiding(&mut nodes, POOL_MEMORY_BYTES, avoid),
        None => placement::pick(&mut nodes, POOL_MEMORY_BYTES),
    }
    .ok_or_else(|| Error::NoCapacity("no schedulable node has room".into()))?;
    let node_id = node.id.clone();
    let (id, token) = insert_container(app, tx, &s, &node_id).await?;
    tracing::info!(container_id = %id, node_id, "pool empty: creating a container on demand");
    Ok((id, node_id, token))
}

/// Marks nodes silent for the TTL unreachable (their idle containers stop
/// counting; their tenants are left alone) and exports nodes by state.
async fn mark_unreachable(app: &App) -> Result<()> {
    let lost: Vec<String> = sqlx::query_scalar(
        "UPDATE nodes SET state = 'unreachable'
          WHERE state = 'active' AND (last_heartbeat IS NULL OR last_heartbeat < now() - make_interval(secs => $1))
          RETURNING id",
    )
    .bind(app.cfg.heartbeat_ttl.as_secs_f64())
    .fetch_all(&app.db)
    .await?;
    for node in &lost {
        tracing::warn!(
            node_id = node,
            "node missed heartbeats: unreachable; its idle containers no longer count"
        );
        crate::audit(
            &app.db,
            "scheduler",
            "node.unreachable",
            node,
            serde_json::json!({"ttlSecs": app.cfg.heartbeat_ttl.as_secs_f64()}),
        )
        .await;
    }
    let by_state: Vec<(String, i64)> =
        sqlx::query_as("SELECT state, count(*) FROM nodes GROUP BY state")
            .fetch_all(&app.db)
            .await?;
    for state in ["active", "draining", "unreachable", "removed"] {
        let n = by_state
            .iter()
            .find(|(s, _)| s == state)
            .map_or(0, |(_, n)| *n);
        metrics::gauge!("clawdeploy_nodes", "state" => state).set(n as f64);
    }
    Ok(())
}

/// Pool containers that never became healthy are replaced.
async fn replace_stuck(app: &App) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "UPDATE containers SET state = 'destroying', message = 'did not become healthy in time', updated_at = now()
          WHERE state IN ('creating', 'warming') AND created_at < now() - make_interval(secs => $1)
            AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.container_id = containers.id)
          RETURNING node_id",
    )
    .bind(app.cfg.warm_timeout.as_secs_f64())
    .fetch_all(&app.db)
    .await?)
}

/// The warm pool on schedulable nodes: (idle, warming, stale warm, stale
/// idle), where stale means not of the current image and generation.
async fn pool_counts(app: &App, s: &PoolSettings) -> Result<(i64, i64, i64, i64)> {
    Ok(sqlx::query_as(
        "SELECT count(*) FILTER (WHERE c.state = 'idle'),
                count(*) FILTER (WHERE c.state IN ('creating', 'warming')),
                count(*) FILTER (WHERE NOT (c.image = $2 AND c.pool_generation = $3)),
                count(*) FILTER (WHERE c.state = 'idle' AND NOT (c.image = $2 AND c.pool_generation = $3))
           FROM containers c JOIN nodes n ON n.id = c.node_id
          WHERE c.state IN ('creating', 'warming', 'idle')
            AND n.state = 'active' AND n.last_heartbeat > now() - make_interval(secs => $1)",
    )
    .bind(app.cfg.heartbeat_ttl.as_secs_f64())
    .bind(&s.image)
    .bind(s.generation)
    .fetch_one(&app.db)
    .await?)
}

async fn reconcile(app: &AppRef) -> Result<()> {
    mark_unreachable(app).await?;
    let mut touched: HashSet<String> = replace_stuck(app).await?.into_iter().collect();
    touched.extend(assign::retry_unconfirmed(app).await?);
    touched.extend(crate::release::sweep_expired(app).await?);

    let s = settings::load(&app.db).await?;
    let signups_per_sec = demand::signup_rate(app).await?;
    let warm_secs = demand::warm_secs(app).await?;
    let target = demand::target(
        i64::from(s.min_idle),
        i64::from(s.max_idle),
        signups_per_sec,
        warm_secs,
    );
    let (idle, warming, stale, stale_idle) = pool_counts(app, &s).await?;

    let mut tx = app.db.begin().await?;
    let mut nodes = schedulable_nodes(app, &mut *tx, &s, None).await?;
    let warm_current: i64 = nodes.iter().map(|n| n.pool).sum();
    // While rolling, fresh containers may exceed max_idle by a quarter of
    // the target (at least one) so the roll always moves forward.
    let surge = if stale > 0 { (target / 4).max(1) } else { 0 };
    let cap = i64::from(s.max_idle) + surge;
    let mut created = 0;
    while warm_current + created < target && warm_current + stale + created < cap {
        let Some(node) = placement::pick(&mut nodes, POOL_MEMORY_BYTES) else {
            tracing::warn!(
                warm_current,
                target,
                "pool below target and no node has room"
            );
            break;
        };
        node.place(POOL_MEMORY_BYTES);
        let node_id = node.id.clone();
        insert_container(app, &mut tx, &s, &node_id).await?;
        touched.insert(node_id);
        created += 1;
    }
    // Roll: retire stale idle containers only while the idle pool stays at
    // or above the target, so no signup finds it empty.
    let retire = stale_idle.min(idle - target);
    if retire > 0 {
        let nodes_retired: Vec<String> = sqlx::query_scalar(
            "UPDATE containers SET state = 'destroying', message = 'rolled to a new pool generation', updated_at = now()
              WHERE id IN (SELECT id FROM containers WHERE state = 'idle' AND NOT (image = $1 AND pool_generation = $2)
                            ORDER BY created_at LIMIT $3 FOR UPDATE SKIP LOCKED)
              RETURNING node_id",
        )
        .bind(&s.image)
        .bind(s.generation)
        .bind(retire)
        .fetch_all(&mut *tx)
        .await?;
        tracing::info!(
            retired = nodes_retired.len(),
            generation = s.generation,
            "rolling the pool"
        );
        touched.extend(nodes_retired);
    }
    if created == 0 && stale == 0 {
        if let Some(node) =
            rebalance(app, &mut tx, &s, &mut nodes, warm_current, idle, target).await?
        {
            touched.insert(node);
        }
    }
    tx.commit().await?;
    metrics::gauge!("clawdeploy_pool_idle").set(idle as f64);
    metrics::gauge!("clawdeploy_pool_warming").set((warming + created) as f64);
    metrics::gauge!("clawdeploy_pool_target").set(target as f64);
    metrics::gauge!("clawdeploy_pool_stale").set(stale as f64);
    metrics::gauge!("clawdeploy_pool_signup_rate").set(signups_per_sec);
    metrics::gauge!("clawdeploy_pool_warm_seconds").set(warm_secs);
    if created > 0 {
        tracing::info!(created, warm_current, target, "pool refill");
    }
    for node in touched {
        desired::bump_and_push(app, &node).await?;
    }
    Ok(())
}

async fn rebalance(
    app: &App,
    tx: &mut Transaction<'_, Postgres>,
    s: &PoolSettings,
    nodes: &mut [NodeLoad],
    warm: i64,
    idle: i64,
    target: i64,
) -> Result<Option<String>> {
    let step = placement::rebalance_step(
        nodes,
        warm,
        idle,
        target,
        i64::from(s.max_idle),
        POOL_MEMORY_BYTES,
    );
    match step {
        Some(Step::Grow(i)) => {
            let node_id = nodes[i].id.clone();
            insert_container(app, tx, s, &node_id).await?;
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
