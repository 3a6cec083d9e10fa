//! Which container a claim takes: the idle pick (one SQL text for the
//! single claim, the warm batches and the retry of an unconfirmed claim),
//! the fallback to a container still warming, and marking the one taken.
//! Each runs inside its caller's transaction and locks what it returns.

use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use crate::app::App;
use crate::error::Result;
use crate::fleet::capacity;

/// The idle container a claim should take, locked: the current pool
/// generation first (stale ones serve while the pool rolls), then the
/// oldest, on a live node with disk to spare, never on node `$2` (`''`:
/// any node). `$1`: the heartbeat TTL in seconds; `$3`: the least disk a
/// node must have free; the argument: how many. One text for `take_idle`,
/// `claim::claim_warm` and the warm batches (`warm.rs`).
macro_rules! idle_pick {
    ($limit:literal) => {
        concat!(
            "SELECT c.id, c.node_id, c.gateway_token_enc FROM containers c
           JOIN nodes n ON n.id = c.node_id
           CROSS JOIN pool_settings s
          WHERE c.state = 'idle' AND n.state = 'active'
            AND n.last_heartbeat > now() - make_interval(secs => $1)
            AND (n.disk_total_bytes = 0 OR n.disk_available_bytes >= $3)
            AND c.node_id <> $2
          ORDER BY (c.image = s.image AND c.pool_generation = s.generation) DESC, c.created_at
          LIMIT ",
            $limit,
            "
          FOR UPDATE OF c SKIP LOCKED"
        )
    };
}
pub(crate) use idle_pick;

/// Locks the idle container a claim should take (`idle_pick`), on any
/// node but `except`.
pub(super) async fn take_idle(
    app: &App,
    tx: &mut Transaction<'_, Postgres>,
    except: Option<&str>,
) -> Result<Option<capacity::Taken>> {
    Ok(sqlx::query_as(idle_pick!("1"))
        .bind(app.cfg.heartbeat_ttl.as_secs_f64())
        .bind(except.unwrap_or_default())
        .bind(app.cfg.min_disk())
        .fetch_optional(&mut **tx)
        .await?)
}

/// Locks the oldest pool container still being created or warming on a
/// live node, for a claim that found no idle one and no room for another.
pub(super) async fn take_warming(
    app: &App,
    tx: &mut Transaction<'_, Postgres>,
) -> Result<Option<capacity::Taken>> {
    Ok(sqlx::query_as(
        "SELECT c.id, c.node_id, c.gateway_token_enc FROM containers c
           JOIN nodes n ON n.id = c.node_id
          WHERE c.state IN ('creating', 'warming') AND n.state = 'active'
            AND n.last_heartbeat > now() - make_interval(secs => $1)
            AND (n.disk_total_bytes = 0 OR n.disk_available_bytes >= $2)
          ORDER BY c.created_at
          LIMIT 1
          FOR UPDATE OF c SKIP LOCKED",
    )
    .bind(app.cfg.heartbeat_ttl.as_secs_f64())
    .bind(app.cfg.min_disk())
    .fetch_optional(&mut **tx)
    .await?)
}

/// Marks a container a claim holds as being assigned.
pub(super) async fn mark_assigning(tx: &mut Transaction<'_, Postgres>, id: Uuid) -> Result<()> {
    sqlx::query("UPDATE containers SET state = 'assigning', claimed_at = now(), updated_at = now() WHERE id = $1")
        .bind(id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}
