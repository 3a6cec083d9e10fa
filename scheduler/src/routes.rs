//! Edge routes: `<subdomain>.<base_domain>` → container upstream. Every change
//! takes a fresh version from one sequence so edges can order changes per
//! host; deltas are broadcast only after their transaction commits.

use clawdeploy_proto::{Route, RouteDelta, RouteSnapshot};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use std::sync::atomic::Ordering;

use crate::app::App;
use crate::error::Result;
use crate::events::{self, Event};

/// Upserts a route inside the caller's transaction; the caller broadcasts
/// the returned delta after committing.
pub async fn upsert(tx: &mut Transaction<'_, Postgres>, route: Route) -> Result<RouteDelta> {
    let instance_id: Uuid = route
        .instance_id
        .parse()
        .map_err(crate::error::Error::internal)?;
    let container_id: Uuid = route
        .container_id
        .parse()
        .map_err(crate::error::Error::internal)?;
    let version: i64 = sqlx::query_scalar(
        "INSERT INTO routes (hostname, instance_id, container_id, upstream, version)
         VALUES ($1, $2, $3, $4, nextval('route_version'))
         ON CONFLICT (hostname) DO UPDATE
            SET instance_id = EXCLUDED.instance_id, container_id = EXCLUDED.container_id,
                upstream = EXCLUDED.upstream, version = EXCLUDED.version
         RETURNING version",
    )
    .bind(&route.hostname)
    .bind(instance_id)
    .bind(container_id)
    .bind(&route.upstream)
    .fetch_one(&mut **tx)
    .await?;
    Ok(RouteDelta {
        version: version as u64,
        upsert: Some(route),
        removed_hostname: String::new(),
    })
}

/// Points the routes of `container_id` at its new address (Docker gave a
/// restarted container another one) and broadcasts the change. A no-op when
/// the address is unchanged.
pub async fn repoint(app: &App, container_id: Uuid, upstream: &str) -> Result<()> {
    let rows: Vec<(String, Uuid, i64)> = sqlx::query_as(
        "UPDATE routes SET upstream = $2, version = nextval('route_version')
          WHERE container_id = $1 AND upstream <> $2
          RETURNING hostname, instance_id, version",
    )
    .bind(container_id)
    .bind(upstream)
    .fetch_all(&app.db)
    .await?;
    for (hostname, _, _) in &rows {
        tracing::info!(hostname, %container_id, upstream, "route follows the container to its new address");
    }
    let deltas: Vec<RouteDelta> = rows
        .into_iter()
        .map(|(hostname, instance_id, version)| RouteDelta {
            version: version as u64,
            upsert: Some(Route {
                hostname,
                upstream: upstream.to_owned(),
                instance_id: instance_id.to_string(),
                container_id: container_id.to_string(),
            }),
            removed_hostname: String::new(),
        })
        .collect();
    broadcast(app, deltas, None).await;
    Ok(())
}

/// Sends committed deltas to this scheduler's edge watchers and announces
/// them (and the instance that became ready with them) to the others.
pub async fn broadcast(app: &App, deltas: Vec<RouteDelta>, ready: Option<Uuid>) {
    let mut events = Vec::new();
    if !deltas.is_empty() {
        events.push(Event::Routes(deltas.iter().map(|d| d.version).collect()));
    }
    events.extend(ready.map(Event::Ready));
    broadcast_local(app, deltas);
    events::publish(app, &events).await;
}

/// Sends committed deltas to this scheduler's edge watchers only.
pub fn broadcast_local(app: &App, deltas: impl IntoIterator<Item = RouteDelta>) {
    for d in deltas {
        metrics::counter!("clawdeploy_route_changes_total").increment(1);
        app.route_watermark.fetch_max(d.version, Ordering::Relaxed);
        // No receivers is fine: edges get a snapshot when they connect.
        let _ = app.route_events.send(d);
    }
}

pub async fn snapshot(app: &App) -> Result<RouteSnapshot> {
    let rows: Vec<(String, String, Uuid, Uuid, i64)> =
        sqlx::query_as("SELECT hostname, upstream, instance_id, container_id, version FROM routes ORDER BY hostname")
            .fetch_all(&app.db)
            .await?;
    let version = rows.iter().map(|r| r.4).max().unwrap_or(0) as u64;
    let routes = rows
        .into_iter()
        .map(|(hostname, upstream, iid, cid, _)| Route {
            hostname,
            upstream,
            instance_id: iid.to_string(),
            container_id: cid.to_string(),
        })
        .collect();
    Ok(RouteSnapshot { version, routes })
}
