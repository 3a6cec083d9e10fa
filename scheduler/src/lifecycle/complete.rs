//! The end of a claim: the agent saw the tenant's config live in the claimed
//! container, so the container is assigned, the instance ready and its route
//! published. `complete_many` does that for every container one agent report
//! confirms, in one statement; `complete` does it for one container in a
//! transaction that also brings the instance's custom domains along (an
//! instance claimed anew after a failed claim may already have some).

use std::sync::Arc;

use clawdeploy_proto::{Route, RouteDelta};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use crate::app::claims::{InstanceNews, Settled};
use crate::app::App;
use crate::audit::audit;
use crate::error::{Error, Result};
use crate::model::{ContainerState, InstanceStatus, RouteVersion};
use crate::outbox;
use crate::routes;

/// An instance one completion made ready.
struct Readied {
    instance_id: Uuid,
    container_id: Uuid,
    subdomain: String,
    created_at: chrono::DateTime<chrono::Utc>,
    /// The waiting signup's answer, when the completion knows all of it.
    settled: Option<Arc<Settled>>,
}

/// After the commit: the edges get the routes, then waiting signups (here
/// and on the other schedulers) learn of it, and the assignment is
/// measured and logged.
async fn announce(app: &App, node_id: &str, readied: &[Readied], deltas: Vec<RouteDelta>) {
    // The edges get the routes before the waiting signups hear: a waiter
    // then waits for changes already on their way.
    let versions = deltas.iter().map(|d| d.version).collect();
    routes::broadcast_local(app, deltas);
    for r in readied {
        let _ = app.instance_ready.send(InstanceNews {
            instance_id: r.instance_id,
            settled: r.settled.clone(),
        });
    }
    if !readied.is_empty() {
        app.tasks.mail.activate();
    }
    let ids: Vec<Uuid> = readied.iter().map(|r| r.instance_id).collect();
    routes::announce_to_peers(app, &app.agents_db, versions, &ids).await;
    let now = chrono::Utc::now();
    for r in readied {
        let took = (now - r.created_at).num_microseconds().unwrap_or(0) as f64 / 1e6;
        metrics::histogram!("clawdeploy_assignment_duration_seconds").record(took);
        metrics::counter!("clawdeploy_assignments_total", "result" => "ready").increment(1);
        tracing::info!(instance_id = %r.instance_id, subdomain = r.subdomain, container_id = %r.container_id, node_id, took_ms = took * 1e3, "instance ready");
    }
}

/// The agent saw tenant config `applied_version` live in `container_id`:
/// finish the claim (container assigned, instance ready, route published).
/// Idempotent: repeated reports change nothing.
pub async fn complete(
    app: &App,
    node_id: &str,
    container_id: Uuid,
    applied_version: u64,
) -> Result<()> {
    // On its own, not in the transaction below: that one ends early (and
    // rolls back) for every instance that is not pending, and a live config
    // change on a ready instance must still be recorded.
    let applied = i64::try_from(applied_version).unwrap_or(i64::MAX);
    let container: Option<(ContainerState, String)> = sqlx::query_as(
        "UPDATE containers SET applied_config = GREATEST(applied_config, $3), updated_at = now()
          WHERE id = $1 AND node_id = $2 RETURNING state, upstream",
    )
    .bind(container_id)
    .bind(node_id)
    .bind(applied)
    .fetch_optional(&app.agents_db)
    .await?;
    let Some((state, upstream)) = container else {
        return Err(Error::NotFound("container on this node"));
    };
    let mut tx = app.agents_db.begin().await?;
    #[derive(sqlx::FromRow)]
    struct Claimed {
        id: Uuid,
        subdomain: String,
        config_version: i64,
        status: InstanceStatus,
        created_at: chrono::DateTime<chrono::Utc>,
    }
    let instance: Option<Claimed> = sqlx::query_as(
        "SELECT id, subdomain, config_version, status, created_at FROM instances
          WHERE container_id = $1 AND status IN ('pending', 'ready') FOR UPDATE",
    )
    .bind(container_id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(instance) = instance else {
        return Ok(());
    };
    if instance.status != InstanceStatus::Pending
        || applied < instance.config_version
        || state != ContainerState::Assigning
        || upstream.is_empty()
    {
        return Ok(());
    }
    sqlx::query("UPDATE instances SET status = 'ready', ready_at = now() WHERE id = $1")
        .bind(instance.id)
        .execute(&mut *tx)
        .await?;
    outbox::gateway_live(&mut tx, &[instance.id]).await?;
    let deltas = serve_from(
        app,
        &mut tx,
        Serving {
            instance_id: instance.id,
            container_id,
            subdomain: &instance.subdomain,
            upstream,
        },
    )
    .await?;
    audit(
        &mut *tx,
        &format!("node:{node_id}"),
        "instance.ready",
        &instance.id.to_string(),
        serde_json::json!({"container": container_id}),
    )
    .await;
    tx.commit().await?;
    let readied = Readied {
        instance_id: instance.id,
        container_id,
        subdomain: instance.subdomain,
        created_at: instance.created_at,
        // The rare path (custom domains): the waiter reads its answer.
        settled: None,
    };
    announce(app, node_id, &[readied], deltas).await;
    Ok(())
}

/// `complete` for every `(container, applied config version)` one report
/// of `node_id` confirms, whose `applied_config` the caller has already
/// recorded: the claims it finishes are finished in one statement (a burst
/// of signups confirmed in one heartbeat was a dozen statements each).
/// Instances with custom domains go through `complete`, one by one, since
/// their hostnames follow them.
pub async fn complete_many(app: &App, node_id: &str, confirmed: &[(Uuid, u64)]) -> Result<()> {
    if confirmed.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = confirmed.iter().map(|(id, _)| *id).collect();
    let versions: Vec<i64> = confirmed
        .iter()
        .map(|(_, v)| i64::try_from(*v).unwrap_or(i64::MAX))
        .collect();
    #[derive(sqlx::FromRow)]
    struct Row {
        instance_id: Uuid,
        container_id: Uuid,
        subdomain: String,
        upstream: String,
        created_at: chrono::DateTime<chrono::Utc>,
        gateway_token_enc: Vec<u8>,
        /// Has custom domains: left to `complete`.
        custom: bool,
        version: Option<RouteVersion>,
    }
    // The same conditions as `complete`: a pending instance whose container
    // is being assigned, has an address and runs at least the instance's
    // config version. Instances are locked in id order (two reports never
    // wait on each other in a cycle).
    let rows: Vec<Row> = sqlx::query_as(concat!(
        "WITH reported AS (
           SELECT * FROM unnest($2::uuid[], $3::bigint[]) AS r(id, applied)
         ), candidate AS (
           SELECT i.id AS instance_id, c.id AS container_id, i.subdomain, c.upstream, i.created_at,
                  c.gateway_token_enc,
                  (EXISTS (SELECT 1 FROM domains d WHERE d.instance_id = i.id)
                   OR EXISTS (SELECT 1 FROM routes x WHERE x.instance_id = i.id AND x.custom
                                 AND x.removed_at IS NULL)) AS custom
             FROM reported r
             JOIN containers c ON c.id = r.id AND c.node_id = $1 AND c.state = 'assigning' AND c.upstream <> ''
             JOIN instances i ON i.container_id = c.id AND i.status = 'pending' AND i.config_version <= r.applied
            ORDER BY i.id
              FOR UPDATE OF i
         ), done AS (
           SELECT * FROM candidate WHERE NOT custom
         ), assigned AS (
           UPDATE containers c SET state = 'assigned', updated_at = now()
             FROM done WHERE c.id = done.container_id
         ), readied AS (
           UPDATE instances i SET status = 'ready', ready_at = now()
             FROM done WHERE i.id = done.instance_id
         ), routed AS (
           INSERT INTO routes (hostname, instance_id, container_id, upstream, version, custom, tls_fingerprint)
           SELECT done.subdomain || '.' || $4, done.instance_id, done.container_id, done.upstream,
                  nextval('route_version'), false, ''
             FROM done
           ON CONFLICT (hostname) DO UPDATE
              SET instance_id = EXCLUDED.instance_id, container_id = EXCLUDED.container_id,
                  upstream = EXCLUDED.upstream, version = EXCLUDED.version,
                  custom = EXCLUDED.custom, tls_fingerprint = EXCLUDED.tls_fingerprint,
                  paused = '', removed_at = NULL
           RETURNING instance_id, version
         ), logged AS (
           INSERT INTO audit_log (actor, action, subject, detail)
           SELECT 'node:' || $1, 'instance.ready', done.instance_id::text,
                  jsonb_build_object('container', done.container_id)
             FROM done
         ), mailed AS (",
        outbox::gateway_live_mail!("SELECT instance_id FROM done"),
        "
         )
         SELECT candidate.*, routed.version
           FROM candidate LEFT JOIN routed ON routed.instance_id = candidate.instance_id",
    ))
    .bind(node_id)
    .bind(&ids)
    .bind(&versions)
    .bind(&app.cfg.base_domain)
    .fetch_all(&app.agents_db)
    .await?;
    let mut readied = Vec::new();
    let mut deltas = Vec::new();
    let mut one_by_one = Vec::new();
    for r in rows {
        if r.custom {
            one_by_one.push(r.container_id);
            continue;
        }
        let version = r.version.ok_or_else(|| {
            Error::Internal(format!("instance {} ready without a route", r.instance_id))
        })?;
        deltas.push(RouteDelta {
            version: version.wire(),
            upsert: Some(Route {
                hostname: app.cfg.host_of(&r.subdomain),
                upstream: r.upstream,
                instance_id: r.instance_id.to_string(),
                container_id: r.container_id.to_string(),
                ..Route::default()
            }),
            removed_hostname: String::new(),
            published_unix_ms: 0,
        });
        readied.push(Readied {
            instance_id: r.instance_id,
            container_id: r.container_id,
            subdomain: r.subdomain,
            created_at: r.created_at,
            settled: Some(Arc::new(Settled {
                status: InstanceStatus::Ready,
                route_version: Some(version),
                container: Some((r.container_id, r.gateway_token_enc)),
            })),
        });
    }
    if !readied.is_empty() {
        announce(app, node_id, &readied, deltas).await;
    }
    for container_id in one_by_one {
        let applied = confirmed
            .iter()
            .find(|(id, _)| *id == container_id)
            .map_or(0, |(_, v)| *v);
        complete(app, node_id, container_id, applied).await?;
    }
    Ok(())
}

/// An instance and the container that now serves it.
pub struct Serving<'a> {
    pub instance_id: Uuid,
    pub container_id: Uuid,
    pub subdomain: &'a str,
    /// Where the edges reach the container.
    pub upstream: String,
}

/// The container starts serving its instance, inside the caller's
/// transaction: it is marked assigned and the instance's route (its custom
/// hostnames along) points at it. A claim's completion and a migration's
/// switch both end here; the caller broadcasts the deltas after it commits.
pub async fn serve_from(
    app: &App,
    tx: &mut Transaction<'_, Postgres>,
    to: Serving<'_>,
) -> Result<Vec<RouteDelta>> {
    sqlx::query(
        "UPDATE containers SET state = 'assigned', claimed_at = COALESCE(claimed_at, now()), updated_at = now()
          WHERE id = $1",
    )
    .bind(to.container_id)
    .execute(&mut **tx)
    .await?;
    routes::upsert(
        app,
        tx,
        Route {
            hostname: app.cfg.host_of(to.subdomain),
            upstream: to.upstream,
            instance_id: to.instance_id.to_string(),
            container_id: to.container_id.to_string(),
            ..Route::default()
        },
    )
    .await
}
