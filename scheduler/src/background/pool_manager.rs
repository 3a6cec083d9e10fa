//! The pool manager keeps `min_idle ≤ idle + warming ≤ max_idle` warm
//! containers of the current generation spread over healthy nodes, marks
//! silent nodes unreachable, replaces containers that never warmed, retries
//! unconfirmed claims and rolls the pool to a new image or generation.
//! Exactly one scheduler runs it: the one holding a PostgreSQL advisory lock
//! on a dedicated connection. It runs when activated (claim, container
//! idle, node hello) and at least once a second.
//!
//! Claims come first: while signups are claiming (on this scheduler, or any
//! container is still being assigned fleet-wide) a pass creates nothing
//! while idle containers remain and at most `REFILL_WHILE_CLAIMING` once
//! none does (`refill_cap`), and a pass a claim woke waits until
//! the claims in flight have answered. Creating a container costs the node
//! far more CPU and disk than a warm claim; done during a burst it would
//! make every claim of the burst slower.

use std::collections::HashSet;
use std::time::Duration;

use sqlx::{Connection, PgConnection, Postgres, Transaction};
use uuid::Uuid;

use super::driver::Task;
use crate::agents::desired;
use crate::app::tasks::Activator;
use crate::app::{App, AppRef};
use crate::audit::audit;
use crate::error::{Error, Result};
use crate::fleet::capacity::{insert_container, schedulable_nodes, POOL_MEMORY_BYTES};
use crate::fleet::demand;
use crate::fleet::placement::{self, NodeLoad, Step};
use crate::fleet::settings::{self, PoolSettings};
use crate::lifecycle::{release, retry};
use crate::model::NodeState;

/// How many containers one pass may create. While claims are in flight
/// and idle containers remain, none: the claims have warm containers to
/// take, and a create (Docker, runc, a booting container: about as much
/// CPU as a tenth of a 100-signup burst on 2 cores) would only slow them.
/// With the pool spent, `REFILL_WHILE_CLAIMING`, so a steady stream of
/// signups still moves it.
fn refill_cap(claiming: bool, idle: i64) -> i64 {
    match (claiming, idle > 0) {
        (false, _) => i64::MAX,
        (true, true) => 0,
        (true, false) => REFILL_WHILE_CLAIMING,
    }
}

/// Arbitrary but fixed: the advisory lock that elects the pool manager.
const POOL_LOCK_KEY: i64 = 0x0C1A_D3E9;

/// Containers a pass may create while claims are in flight: the pool keeps
/// moving under a steady stream of signups, slowly.
const REFILL_WHILE_CLAIMING: i64 = 1;

/// The pool manager as a background task. Its state: the advisory lock's
/// connection while this scheduler leads, its passes (for housekeeping)
/// and since when the database has answered it without a break.
#[derive(Default)]
pub struct PoolManager {
    /// The lock lives as long as this dedicated connection (taken out of
    /// the pool so it is never shared); losing the connection loses the
    /// lock.
    lock: Option<PgConnection>,
    passes: u64,
    /// Nodes are judged by heartbeats only a TTL after this: heartbeats
    /// could not be recorded while the database was away (or before this
    /// scheduler led), and a silent database is not a silent node.
    answering_since: Option<tokio::time::Instant>,
}

impl Task<App> for PoolManager {
    const NAME: &'static str = "pool_manager";

    fn period(&self) -> Duration {
        Duration::from_secs(1)
    }

    fn activator(app: &App) -> Option<&Activator> {
        Some(&app.tasks.pool_manager)
    }

    /// Coalesces a burst of claims into one refill (one push per node
    /// instead of one per claim), and lets the claims in flight answer
    /// first (the period still bounds the wait).
    async fn settle(&mut self, app: &AppRef) {
        tokio::time::sleep(Duration::from_millis(25)).await;
        if app.claims.busy() {
            tokio::select! {
                _ = app.claims.quiet() => {}
                _ = tokio::time::sleep(self.period()) => {}
            }
        }
    }

    async fn run_once(&mut self, app: &AppRef) -> Result<()> {
        match self.lock.as_mut() {
            None => self.lock = try_lock(app).await,
            Some(conn) => {
                if conn.ping().await.is_err() {
                    tracing::warn!("lost the pool manager lock's connection");
                    metrics::gauge!("clawdeploy_pool_manager_leader").set(0.0);
                    self.lock = None;
                }
            }
        }
        if self.lock.is_none() {
            self.answering_since = None;
            return Ok(());
        }
        let since = *self
            .answering_since
            .get_or_insert_with(tokio::time::Instant::now);
        let judge_nodes = since.elapsed() >= app.cfg.heartbeat_ttl;
        let reconciled = reconcile(app, judge_nodes).await;
        if let Err(Error::Database(db)) = &reconciled {
            if crate::error::database_unavailable(db) {
                self.answering_since = None;
            }
        }
        self.passes += 1;
        if self.passes % HOUSEKEEPING_EVERY == 1 {
            super::janitor::housekeep(app).await;
        }
        reconciled
    }

    async fn stop(self) {
        if let Some(conn) = self.lock {
            let _ = conn.close().await;
        }
    }
}

/// Passes between two housekeeping runs (about five minutes).
const HOUSEKEEPING_EVERY: u64 = 300;

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
        audit(
            &app.db,
            "scheduler",
            "node.unreachable",
            node,
            serde_json::json!({"ttlSecs": app.cfg.heartbeat_ttl.as_secs_f64()}),
        )
        .await;
    }
    let by_state: Vec<(NodeState, i64)> =
        sqlx::query_as("SELECT state, count(*) FROM nodes GROUP BY state")
            .fetch_all(&app.db)
            .await?;
    for state in NodeState::ALL {
        let n = by_state
            .iter()
            .find(|(s, _)| *s == state)
            .map_or(0, |(_, n)| *n);
        metrics::gauge!("clawdeploy_nodes", "state" => state.as_str()).set(n as f64);
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

/// The warm pool on schedulable nodes; stale means not of the current
/// image and generation.
#[derive(sqlx::FromRow)]
struct PoolCounts {
    idle: i64,
    warming: i64,
    /// Stale containers, warm or warming.
    stale: i64,
    stale_idle: i64,
    /// Containers claimed in the last few seconds and not yet confirmed,
    /// fleet-wide (signups on every scheduler). An older unconfirmed claim
    /// is a stuck one (the claim sweep's business), not a burst.
    assigning: i64,
}

async fn pool_counts(app: &App, s: &PoolSettings) -> Result<PoolCounts> {
    Ok(sqlx::query_as(
        "SELECT count(*) FILTER (WHERE c.state = 'idle') AS idle,
                count(*) FILTER (WHERE c.state IN ('creating', 'warming')) AS warming,
                count(*) FILTER (WHERE NOT (c.image = $2 AND c.pool_generation = $3)) AS stale,
                count(*) FILTER (WHERE c.state = 'idle' AND NOT (c.image = $2 AND c.pool_generation = $3)) AS stale_idle,
                (SELECT count(*) FROM containers WHERE state = 'assigning'
                   AND claimed_at > now() - interval '5 seconds') AS assigning
           FROM containers c JOIN nodes n ON n.id = c.node_id
          WHERE c.state IN ('creating', 'warming', 'idle')
            AND n.state = 'active' AND n.last_heartbeat > now() - make_interval(secs => $1)
            AND (n.disk_total_bytes = 0 OR n.disk_available_bytes >= $4)",
    )
    .bind(app.cfg.heartbeat_ttl.as_secs_f64())
    .bind(&s.image)
    .bind(s.generation)
    .bind(app.cfg.min_disk())
    .fetch_one(&app.db)
    .await?)
}

/// One pass. `judge_nodes`: whether heartbeats may mark nodes unreachable
/// and move unconfirmed claims (not right after the database returned).
async fn reconcile(app: &AppRef, judge_nodes: bool) -> Result<()> {
    if judge_nodes {
        mark_unreachable(app).await?;
    }
    let mut touched: HashSet<String> = replace_stuck(app).await?.into_iter().collect();
    if judge_nodes {
        touched.extend(retry::retry_unconfirmed(app).await?);
    }
    touched.extend(release::sweep_expired(app).await?);

    let s = settings::load(&app.db).await?;
    let signups_per_sec = demand::signup_rate(app).await?;
    let warm_secs = demand::warm_secs(app).await?;
    let target = demand::target(
        i64::from(s.min_idle),
        i64::from(s.max_idle),
        signups_per_sec,
        warm_secs,
    );
    let PoolCounts {
        idle,
        warming,
        stale,
        stale_idle,
        assigning,
    } = pool_counts(app, &s).await?;
    let claiming = app.claims.busy() || assigning > 0;
    let refill_cap = refill_cap(claiming, idle);

    let mut tx = app.db.begin().await?;
    let mut nodes = schedulable_nodes(app, &mut *tx, &s, None).await?;
    let warm_current: i64 = nodes.iter().map(|n| n.pool).sum();
    // While rolling, fresh containers may exceed max_idle by a quarter of
    // the target (at least one) so the roll always moves forward.
    let surge = if stale > 0 { (target / 4).max(1) } else { 0 };
    let cap = i64::from(s.max_idle) + surge;
    let mut created = 0;
    while warm_current + created < target
        && warm_current + stale + created < cap
        && created < refill_cap
    {
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
        match insert_container(app, &mut tx, &s, &node_id).await {
            Ok(_) => {}
            // Claims filled it meanwhile: not this node on this pass.
            Err(Error::NoCapacity(_)) => {
                nodes.retain(|n| n.id != node_id);
                continue;
            }
            Err(e) => return Err(e),
        }
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
    if created == 0 && stale == 0 && !claiming {
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
    metrics::gauge!("clawdeploy_pool_min_idle").set(f64::from(s.min_idle));
    metrics::gauge!("clawdeploy_pool_stale").set(stale as f64);
    metrics::gauge!("clawdeploy_pool_signup_rate").set(signups_per_sec);
    metrics::gauge!("clawdeploy_pool_warm_seconds").set(warm_secs);
    if created > 0 {
        tracing::info!(created, warm_current, target, "pool refill");
    }
    // Each node on its own: one slow session must not delay the others.
    let pushes = touched.iter().map(|node| desired::bump_and_push(app, node));
    for r in futures::future::join_all(pushes).await {
        r?;
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
            match insert_container(app, tx, s, &node_id).await {
                Ok(_) => {}
                Err(Error::NoCapacity(_)) => return Ok(None),
                Err(e) => return Err(e),
            }
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
    fn claims_in_flight_hold_refills_back_while_idle_containers_remain() {
        assert_eq!(refill_cap(false, 0), i64::MAX);
        assert_eq!(refill_cap(false, 50), i64::MAX);
        assert_eq!(refill_cap(true, 50), 0);
        assert_eq!(refill_cap(true, 1), 0);
        assert_eq!(refill_cap(true, 0), REFILL_WHILE_CLAIMING);
    }
}
