//! Edge routes: `<subdomain>.<base_domain>` → container upstream, and the
//! customers' own hostnames (`custom`) next to them. Every change takes a
//! fresh version from one sequence so edges can order changes per host;
//! deltas are broadcast only after their transaction commits.

pub mod custom;

use std::sync::atomic::Ordering;

use clawdeploy_proto::{Route, RouteDelta, RouteSnapshot};
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::app::App;
use crate::error::{Error, Result};
use crate::events::{self, Event};
pub use crate::model::RouteVersion;

/// A route row: live, or a tombstone (`removed`).
#[derive(sqlx::FromRow)]
struct RouteRow {
    hostname: String,
    upstream: String,
    instance_id: Uuid,
    /// `None`: a custom hostname that only answers its ACME challenge.
    container_id: Option<Uuid>,
    version: RouteVersion,
    removed: bool,
    custom: bool,
    /// Non-empty: suspended for this reason (the edge answers itself).
    paused: String,
}

impl RouteRow {
    fn route(&self, tls: &custom::TlsOf) -> Route {
        let mut r = Route {
            hostname: self.hostname.clone(),
            upstream: self.upstream.clone(),
            instance_id: self.instance_id.to_string(),
            container_id: self.container_id.map(|c| c.to_string()).unwrap_or_default(),
            paused: self.paused.clone(),
            ..Route::default()
        };
        if self.custom {
            tls.fill(&mut r);
        }
        r
    }

    fn delta(self, tls: &custom::TlsOf) -> RouteDelta {
        RouteDelta {
            version: self.version.wire(),
            upsert: (!self.removed).then(|| self.route(tls)),
            removed_hostname: if self.removed {
                self.hostname
            } else {
                String::new()
            },
            published_unix_ms: 0,
        }
    }
}

/// Deltas for `rows`, with the certificates and challenges their custom
/// hostnames carry.
async fn deltas_of(app: &App, rows: Vec<RouteRow>) -> Result<Vec<RouteDelta>> {
    let tls = custom::TlsOf::load(app, &rows).await?;
    Ok(rows.into_iter().map(|r| r.delta(&tls)).collect())
}

const ROUTE_COLUMNS: &str =
    "hostname, upstream, instance_id, container_id, version, removed_at IS NOT NULL AS removed, custom, paused";

/// How long a route change waits for the edges to apply it.
const EDGE_ACK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Upserts an instance's own route inside the caller's transaction, and
/// brings its custom hostnames along (they follow it to a new container).
/// The caller broadcasts the returned deltas after committing; the first
/// is the instance's own.
pub async fn upsert(
    app: &App,
    tx: &mut Transaction<'_, Postgres>,
    mut route: Route,
) -> Result<Vec<RouteDelta>> {
    let instance_id: Uuid = route.instance_id.parse().map_err(Error::internal)?;
    let container_id: Uuid = route.container_id.parse().map_err(Error::internal)?;
    let (version, paused) = upsert_row(
        tx,
        &route.hostname,
        instance_id,
        Some(container_id),
        &route.upstream,
        None,
    )
    .await?;
    route.paused = paused;
    let mut deltas = vec![RouteDelta {
        version: version.wire(),
        upsert: Some(route),
        removed_hostname: String::new(),
        published_unix_ms: 0,
    }];
    deltas.extend(custom::sync_instance(app, tx, instance_id).await?);
    Ok(deltas)
}

/// Inserts or replaces the route of `hostname` with a fresh version.
/// `custom` carries a custom hostname's TLS fingerprint. The route is
/// paused when its instance is suspended; returns the version and that
/// reason (empty: not paused).
async fn upsert_row(
    tx: &mut Transaction<'_, Postgres>,
    hostname: &str,
    instance_id: Uuid,
    container_id: Option<Uuid>,
    upstream: &str,
    custom: Option<&str>,
) -> Result<(RouteVersion, String)> {
    Ok(sqlx::query_as(
        "INSERT INTO routes (hostname, instance_id, container_id, upstream, version, custom, tls_fingerprint, paused)
         VALUES ($1, $2, $3, $4, nextval('route_version'), $5, $6,
                 COALESCE((SELECT suspended_reason FROM instances WHERE id = $2 AND status = 'suspended'), ''))
         ON CONFLICT (hostname) DO UPDATE
            SET instance_id = EXCLUDED.instance_id, container_id = EXCLUDED.container_id,
                upstream = EXCLUDED.upstream, version = EXCLUDED.version,
                custom = EXCLUDED.custom, tls_fingerprint = EXCLUDED.tls_fingerprint,
                paused = EXCLUDED.paused, removed_at = NULL
         RETURNING version, paused",
    )
    .bind(hostname)
    .bind(instance_id)
    .bind(container_id)
    .bind(upstream)
    .bind(custom.is_some())
    .bind(custom.unwrap_or_default())
    .fetch_one(&mut **tx)
    .await?)
}

/// Pauses (`reason` non-empty) or resumes (empty) every live route of an
/// instance, inside the caller's transaction; the caller broadcasts the
/// deltas after committing.
pub async fn set_paused(
    app: &App,
    tx: &mut Transaction<'_, Postgres>,
    instance_id: Uuid,
    reason: &str,
) -> Result<Vec<RouteDelta>> {
    let rows: Vec<RouteRow> = sqlx::query_as(&format!(
        "UPDATE routes SET paused = $2, version = nextval('route_version')
          WHERE instance_id = $1 AND removed_at IS NULL AND paused <> $2
          RETURNING {ROUTE_COLUMNS}"
    ))
    .bind(instance_id)
    .bind(reason)
    .fetch_all(&mut **tx)
    .await?;
    deltas_of(app, rows).await
}

/// Points the routes of `container_id` at its new address (Docker gave a
/// restarted container another one) and broadcasts the change. A no-op when
/// the address is unchanged.
pub async fn repoint(app: &App, container_id: Uuid, upstream: &str) -> Result<()> {
    repoint_many(app, &[(container_id, upstream)]).await
}

/// `repoint` for several containers at once (one agent report's), in one
/// statement and one announcement.
pub async fn repoint_many(app: &App, moved: &[(Uuid, &str)]) -> Result<()> {
    if moved.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = moved.iter().map(|(id, _)| *id).collect();
    let upstreams: Vec<&str> = moved.iter().map(|(_, up)| *up).collect();
    let rows: Vec<RouteRow> = sqlx::query_as(&format!(
        "UPDATE routes SET upstream = m.addr, version = nextval('route_version')
           FROM unnest($1::uuid[], $2::text[]) AS m(cid, addr)
          WHERE routes.container_id = m.cid AND routes.upstream <> m.addr
            AND routes.removed_at IS NULL
          RETURNING {ROUTE_COLUMNS}"
    ))
    .bind(&ids)
    .bind(&upstreams)
    .fetch_all(&app.agents_db)
    .await?;
    for r in &rows {
        tracing::info!(hostname = r.hostname, container_id = ?r.container_id, upstream = r.upstream, "route follows the container to its new address");
    }
    let deltas = deltas_of(app, rows).await?;
    broadcast_many(app, &app.agents_db, deltas, &[]).await;
    Ok(())
}

/// Sends committed deltas to this scheduler's edge watchers and announces
/// them (and the instance that became ready with them) to the others.
pub async fn broadcast(app: &App, deltas: Vec<RouteDelta>, ready: Option<Uuid>) {
    broadcast_many(app, &app.db, deltas, ready.as_slice()).await
}

/// `broadcast` for the routes and instances of several completions, in one
/// announcement, made over `db`.
pub async fn broadcast_many(app: &App, db: &PgPool, deltas: Vec<RouteDelta>, ready: &[Uuid]) {
    let versions = deltas.iter().map(|d| d.version).collect();
    broadcast_local(app, deltas);
    announce_to_peers(app, db, versions, ready).await;
}

/// Tells the other schedulers of committed route changes (they send them
/// to their own edges) and of instances that became ready with them.
pub async fn announce_to_peers(app: &App, db: &PgPool, versions: Vec<u64>, ready: &[Uuid]) {
    let mut events = Vec::new();
    if !versions.is_empty() {
        events.push(Event::Routes(versions));
    }
    events.extend(ready.iter().copied().map(Event::Ready));
    events::publish_over(app, db, &events).await;
}

/// Sends committed deltas to this scheduler's edge watchers only.
pub fn broadcast_local(app: &App, deltas: impl IntoIterator<Item = RouteDelta>) {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    for mut d in deltas {
        // Edges measure their update lag from this stamp.
        d.published_unix_ms = now_ms;
        metrics::counter!("clawdeploy_route_changes_total").increment(1);
        app.route_watermark.fetch_max(d.version, Ordering::Relaxed);
        app.route_feed.send(d);
    }
}

pub async fn snapshot(app: &App) -> Result<RouteSnapshot> {
    let rows: Vec<RouteRow> = sqlx::query_as(&format!(
        "SELECT {ROUTE_COLUMNS} FROM routes WHERE removed_at IS NULL ORDER BY hostname"
    ))
    .fetch_all(&app.db)
    .await?;
    // Tombstones count: an edge at this version has seen every removal.
    let version: RouteVersion = sqlx::query_scalar("SELECT COALESCE(max(version), 0) FROM routes")
        .fetch_one(&app.db)
        .await?;
    let tls = custom::TlsOf::load(app, &rows).await?;
    Ok(RouteSnapshot {
        version: version.wire(),
        routes: rows.iter().map(|r| r.route(&tls)).collect(),
    })
}

/// Removes the instance's routes inside the caller's transaction, leaving
/// versioned tombstones; the caller broadcasts the returned deltas after
/// committing.
pub async fn remove_for_instance(
    tx: &mut Transaction<'_, Postgres>,
    instance_id: Uuid,
) -> Result<Vec<RouteDelta>> {
    let rows: Vec<RouteRow> = sqlx::query_as(&format!(
        "UPDATE routes SET removed_at = now(), version = nextval('route_version')
          WHERE instance_id = $1 AND removed_at IS NULL
          RETURNING {ROUTE_COLUMNS}"
    ))
    .bind(instance_id)
    .fetch_all(&mut **tx)
    .await?;
    // Removals carry no certificate.
    let none = custom::TlsOf::default();
    Ok(rows.into_iter().map(|r| r.delta(&none)).collect())
}

/// The committed route changes `filter` selects (over `arg`), as deltas in
/// version order: tombstones become removals.
pub async fn deltas_where<T>(app: &App, filter: &str, arg: T) -> Result<Vec<RouteDelta>>
where
    T: for<'q> sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send,
{
    let rows: Vec<RouteRow> = sqlx::query_as(&format!(
        "SELECT {ROUTE_COLUMNS} FROM routes {filter} ORDER BY version"
    ))
    .bind(arg)
    .fetch_all(&app.db)
    .await?;
    deltas_of(app, rows).await
}

/// The change to wait for the edges on after broadcasting `deltas`: the
/// last sent (they go out in order, and an edge that has the last has them
/// all), which need not be the highest version.
pub fn last_sent(deltas: &[RouteDelta]) -> Option<RouteVersion> {
    deltas.last().map(|d| RouteVersion::from_wire(d.version))
}

/// Waits (bounded) until every edge watching this scheduler has applied
/// `version`, so the customer's next request sees the change.
pub async fn wait_edges(app: &App, instance_id: Uuid, version: RouteVersion) {
    let started = std::time::Instant::now();
    let version = version.wire();
    if !app.route_feed.wait_all(version, EDGE_ACK_WAIT).await {
        tracing::warn!(%instance_id, version, "an edge did not confirm the route change in time");
    }
    metrics::histogram!("clawdeploy_route_propagation_seconds")
        .record(started.elapsed().as_secs_f64());
}
