//! Scheduler in depth: claims under concurrency, the empty pool, idempotent
//! signups, unconfirmed claims, node loss, draining, pool rolls and two
//! schedulers, each on a real system (PostgreSQL, Docker, mTLS, edge).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clawdeploy_e2e::{wait_for, Cluster, ClusterOptions, ADMIN_TOKEN};
use serde_json::{json, Value};

fn host(sub: &str) -> String {
    format!("{sub}.clawdeploy.localhost")
}

/// GET a customer API path with the account token.
async fn get_json(c: &Cluster, path: &str, token: &str) -> Result<Value> {
    Ok(c.client
        .get(c.api(path))
        .bearer_auth(token)
        .send()
        .await?
        .json()
        .await?)
}

/// Polls the status URL until the instance is ready; returns its view.
async fn wait_ready(c: &Cluster, token: &str, status_url: &str, within: Duration) -> Result<Value> {
    let mut last = Value::Null;
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        last = get_json(c, status_url, token).await?;
        match last["instance"]["status"].as_str() {
            Some("ready") => return Ok(last),
            Some("failed") => anyhow::bail!("instance failed: {last}"),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    anyhow::bail!("instance not ready within {within:?}: {last}")
}

/// The container and node an instance is on now.
async fn placement_of(c: &Cluster, subdomain: &str) -> Result<(String, String)> {
    Ok(sqlx::query_as(
        "SELECT c.id::text, c.node_id FROM instances i JOIN containers c ON c.id = i.container_id
          WHERE i.subdomain = $1",
    )
    .bind(subdomain)
    .fetch_one(&c.db)
    .await?)
}

async fn audit_count(c: &Cluster, action: &str) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE action = $1")
            .bind(action)
            .fetch_one(&c.db)
            .await?,
    )
}

/// `/v1/models` through the edge with the gateway token, retried briefly
/// (a route published on one scheduler reaches an edge on the other in
/// milliseconds, not atomically with the answer).
async fn models_ok(c: &Cluster, sub: &str, gw: &str) -> Result<()> {
    wait_for(
        Duration::from_secs(10),
        "the gateway answers through the edge",
        || async {
            let (status, _) = c.edge_get(&host(sub), "/v1/models", Some(gw)).await?;
            Ok(status == 200)
        },
    )
    .await
}

mod claims;
mod fleet;
mod unconfirmed;
