//! Where containers go: the schedulable nodes with their load, a new pool
//! container on one of them, and the on-demand container of a claim that
//! found the pool empty.

use sqlx::{Acquire, Postgres, Transaction};
use uuid::Uuid;

use super::placement::{self, NodeLoad};
use super::settings::{self, PoolSettings};
use crate::app::App;
use crate::crypto::{aad, random_token};
use crate::error::{Error, Result};

/// Resources a pool container starts with: the free tier (0.5 CPU, 512 MB).
pub const POOL_CPU_MILLIS: i32 = 500;
pub const POOL_MEMORY_BYTES: i64 = 512 * 1024 * 1024;
pub const POOL_PIDS: i32 = 256;

/// A node's row with its container counts.
#[derive(sqlx::FromRow)]
struct NodeRow {
    id: String,
    max_containers: i32,
    memory_bytes: i64,
    memory_available_bytes: i64,
    cpu_busy_permille: i32,
    /// Warm containers of the current pool generation.
    pool: i64,
    /// Every container that holds resources.
    total: i64,
}

impl From<NodeRow> for NodeLoad {
    fn from(r: NodeRow) -> Self {
        NodeLoad {
            id: r.id,
            max: i64::from(r.max_containers),
            pool: r.pool,
            total: r.total,
            memory_available: r.memory_available_bytes,
            memory_total: r.memory_bytes,
            cpu_busy_permille: i64::from(r.cpu_busy_permille),
        }
    }
}

/// A container a claim holds (locked or just inserted) in its transaction.
#[derive(Debug, sqlx::FromRow)]
pub struct Taken {
    pub id: Uuid,
    pub node_id: String,
    pub gateway_token_enc: Vec<u8>,
}

/// Nodes an on-demand claim considers: the ones whose heartbeats report
/// the most room, counted exactly. Counting every node's containers on
/// every claim would make claims cost O(fleet).
const ON_DEMAND_CANDIDATES: i64 = 16;

/// Active nodes with a fresh heartbeat and room on their state disk, with
/// their load: all of them, or
/// the `candidates` with the most room by their last heartbeat. `pool`
/// counts only containers of the current generation: stale ones are on
/// their way out.
pub async fn schedulable_nodes<'e>(
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
               AND (disk_total_bytes = 0 OR disk_available_bytes >= $5)
             ORDER BY containers_running::float8 / GREATEST(max_containers, 1), memory_available_bytes DESC
             LIMIT $4)
         SELECT n.id, n.max_containers, n.memory_bytes, n.memory_available_bytes, n.cpu_busy_permille,
                count(c.id) FILTER (WHERE c.state IN ('creating', 'warming', 'idle')
                                      AND c.image = $2 AND c.pool_generation = $3) AS pool,
                count(c.id) AS total
           FROM nodes n
           JOIN live USING (id)
           LEFT JOIN containers c ON c.node_id = n.id
                AND c.state IN ('creating', 'warming', 'idle', 'assigning', 'assigned', 'migrating', 'destroying')
          GROUP BY n.id
          ORDER BY n.id",
    )
    .bind(app.cfg.heartbeat_ttl.as_secs_f64())
    .bind(&s.image)
    .bind(s.generation)
    .bind(candidates)
    .bind(app.cfg.min_disk())
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(NodeLoad::from).collect())
}

/// Holds one of `node_id`'s container slots for the caller's transaction
/// (a released instance's stopped container keeps its volume but no slot:
/// it never runs again):
/// `NoCapacity` when the node is full. The node's row stays locked until
/// the caller commits, so two transactions placing containers on one node
/// never both take its last slot.
pub async fn reserve_slot(tx: &mut Transaction<'_, Postgres>, node_id: &str) -> Result<()> {
    // Lock, then count in a statement of its own: under READ COMMITTED a
    // count in the locking statement would read the snapshot from before
    // the wait, missing what the lock holder inserted.
    let max: i32 = sqlx::query_scalar("SELECT max_containers FROM nodes WHERE id = $1 FOR UPDATE")
        .bind(node_id)
        .fetch_optional(&mut **tx)
        .await?
        .ok_or(Error::NotFound("node"))?;
    let total: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM containers WHERE node_id = $1
            AND state IN ('creating', 'warming', 'idle', 'assigning', 'assigned', 'migrating', 'destroying')",
    )
    .bind(node_id)
    .fetch_one(&mut **tx)
    .await?;
    if total >= i64::from(max) {
        return Err(Error::NoCapacity(format!("node {node_id} is full")));
    }
    Ok(())
}

/// A new pool container (`creating`) on `node_id`, with a fresh sealed
/// gateway token, in the caller's transaction; `NoCapacity` when the node
/// is full (see `reserve_slot`).
pub async fn insert_container(
    app: &App,
    tx: &mut Transaction<'_, Postgres>,
    s: &PoolSettings,
    node_id: &str,
) -> Result<Taken> {
    reserve_slot(tx, node_id).await?;
    let id = Uuid::new_v4();
    let token = app
        .secrets
        .seal(&aad::gateway_token(id), random_token(32).as_bytes())?;
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
    Ok(Taken {
        id,
        node_id: node_id.to_owned(),
        gateway_token_enc: token,
    })
}

/// Empty pool: a container created for one customer inside the claim's
/// transaction, on any node with room but `except`. The caller marks it
/// `assigning` and bumps the node.
pub async fn create_on_demand(
    app: &App,
    tx: &mut Transaction<'_, Postgres>,
    except: Option<&str>,
) -> Result<Taken> {
    let s = settings::load(&mut **tx).await?;
    let mut nodes = schedulable_nodes(app, &mut **tx, &s, Some(ON_DEMAND_CANDIDATES)).await?;
    if let Some(except) = except {
        nodes.retain(|n| n.id != except);
    }
    loop {
        let node = placement::pick(&mut nodes, POOL_MEMORY_BYTES)
            .ok_or_else(|| Error::NoCapacity("no schedulable node has room".into()))?;
        let node_id = node.id.clone();
        // In a savepoint: a full node's row lock goes with its rollback, so
        // this claim never holds one node while waiting for another (the
        // pool manager may hold several).
        let mut attempt = tx.begin().await?;
        match insert_container(app, &mut attempt, &s, &node_id).await {
            Ok(taken) => {
                attempt.commit().await?;
                tracing::info!(container_id = %taken.id, node_id, "pool empty: creating a container on demand");
                return Ok(taken);
            }
            // Filled meanwhile (the counts are read without locks): the next.
            Err(Error::NoCapacity(_)) => {
                attempt.rollback().await?;
                nodes.retain(|n| n.id != node_id);
            }
            Err(e) => return Err(e),
        }
    }
}
