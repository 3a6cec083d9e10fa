//! The node agent in depth, against real Docker, PostgreSQL and mTLS:
//! joining with tokens and rotating certificates under a live session,
//! crash consistency at each step of a claim, life without the scheduler,
//! orphans and crashed tenants, lifecycle operations and tenant isolation.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use clawdeploy_e2e::{wait_for, Cluster, ClusterOptions, ADMIN_TOKEN};
use reqwest::Method;
use serde_json::{json, Value};

fn email(tag: &str) -> String {
    format!("{tag}-{}@example.com", uuid::Uuid::new_v4().simple())
}

/// The container (id, Docker id) behind a subdomain.
async fn container_of(c: &Cluster, subdomain: &str) -> Result<(String, String)> {
    Ok(sqlx::query_as(
        "SELECT c.id::text, c.docker_id FROM instances i JOIN containers c ON c.id = i.container_id
          WHERE i.subdomain = $1",
    )
    .bind(subdomain)
    .fetch_one(&c.db)
    .await?)
}

fn started_at(c: &Cluster, docker_id: &str) -> Result<String> {
    Ok(c.docker_inspect(docker_id)?["State"]["StartedAt"]
        .as_str()
        .unwrap_or_default()
        .to_owned())
}

/// Every running container of the cluster with its start time, sorted: equal
/// before and after means nothing was restarted.
fn start_times(c: &Cluster) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = c
        .docker_running()
        .into_iter()
        .map(|id| {
            let at = started_at(c, &id).unwrap_or_default();
            (id, at)
        })
        .collect();
    v.sort();
    v
}

fn log_of(c: &Cluster, name: &str) -> String {
    std::fs::read_to_string(c.dir.join("logs").join(format!("{name}.log"))).unwrap_or_default()
}

/// Moves a container and its instance to new states (what the tier and
/// suspension APIs will do) and tells the agent.
async fn set_states(
    c: &Cluster,
    node: &str,
    container: &str,
    container_state: &str,
    instance_status: &str,
) -> Result<()> {
    sqlx::query("UPDATE containers SET state = $2 WHERE id = $1::uuid")
        .bind(container)
        .bind(container_state)
        .execute(&c.db)
        .await?;
    sqlx::query("UPDATE instances SET status = $2 WHERE container_id = $1::uuid")
        .bind(container)
        .bind(instance_status)
        .execute(&c.db)
        .await?;
    bump(c, node).await
}

/// Tells the node's agent its desired state changed: the next heartbeat
/// sees the agent behind and the scheduler pushes the new state.
async fn bump(c: &Cluster, node: &str) -> Result<()> {
    sqlx::query("UPDATE nodes SET generation = generation + 1 WHERE id = $1")
        .bind(node)
        .execute(&c.db)
        .await?;
    Ok(())
}

async fn models_through_edge(c: &Cluster, host: &str, gw: &str) -> Result<(u16, String)> {
    c.edge_get(host, "/v1/models", Some(gw)).await
}

// ------------------------------------------------------------------ join ---

mod crash;
mod isolation;
mod join;
mod lifecycle;
