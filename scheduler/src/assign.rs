//! Assignment: a customer claims a warm pool container. One transaction
//! claims the oldest healthy idle container (`FOR UPDATE SKIP LOCKED`),
//! creates the instance and stores its secrets; the node gets its new desired
//! state; the agent writes the config, proves it live with an authenticated
//! probe and reports; `complete` then marks the container assigned and
//! publishes the route.

use std::collections::BTreeMap;
use std::time::Instant;

use clawdeploy_proto::Route;
use uuid::Uuid;

use crate::app::{App, AppRef};
use crate::error::{Error, Result};
use crate::{desired, pool, routes};

pub struct ClaimRequest {
    pub user_id: Uuid,
    pub subdomain: String,
    pub provider_keys: BTreeMap<String, String>,
    pub default_model: String,
}

pub struct Claimed {
    pub instance_id: Uuid,
    pub container_id: Uuid,
    pub node_id: String,
    pub gateway_token: String,
}

/// Claims a container and hands the node its new desired state. Returns once
/// the claim is committed; use `wait_ready` for the agent's confirmation.
pub async fn claim(app: &AppRef, req: ClaimRequest) -> Result<Claimed> {
    let started = Instant::now();
    let instance_id = Uuid::new_v4();
    let mut tx = app.db.begin().await?;
    sqlx::query(
        "INSERT INTO instances (id, user_id, subdomain, status, config_version, default_model)
         VALUES ($1, $2, $3, 'pending', 1, $4)",
    )
    .bind(instance_id)
    .bind(req.user_id)
    .bind(&req.subdomain)
    .bind(&req.default_model)
    .execute(&mut *tx)
    .await
    .map_err(|e| match &e {
        sqlx::Error::Database(db) if db.constraint() == Some("instances_one_per_user") => {
            Error::Conflict {
                code: "instance_exists",
                message: "this account already has an instance".into(),
            }
        }
        _ => Error::on_unique(
            e,
            "instances_subdomain_live",
            "subdomain_taken",
            "that subdomain is taken",
        ),
    })?;

    let claimed: Option<(Uuid, String, Vec<u8>)> = sqlx::query_as(
        "SELECT c.id, c.node_id, c.gateway_token_enc FROM containers c
           JOIN nodes n ON n.id = c.node_id
          WHERE c.state = 'idle' AND n.state = 'active'
            AND n.last_heartbeat > now() - make_interval(secs => $1)
          ORDER BY c.created_at
          LIMIT 1
          FOR UPDATE OF c SKIP LOCKED",
    )
    .bind(app.cfg.heartbeat_ttl.as_secs_f64())
    .fetch_optional(&mut *tx)
    .await?;
    let (container_id, node_id, token_enc, fallback) = match claimed {
        Some((id, node, token)) => (id, node, token, false),
        None => {
            // Empty pool: create a container on demand for this customer.
            let (id, node, token) = pool::create_on_demand(app, &mut tx).await?;
            (id, node, token, true)
        }
    };
    sqlx::query("UPDATE containers SET state = 'assigning', claimed_at = now(), updated_at = now() WHERE id = $1")
        .bind(container_id)
        .execute(&mut *tx)
        .await?;
    sqlx::query("UPDATE instances SET container_id = $2 WHERE id = $1")
        .bind(instance_id)
        .bind(container_id)
        .execute(&mut *tx)
        .await?;
    for (name, value) in &req.provider_keys {
        let sealed = app
            .secrets
            .seal(&App::secret_aad(instance_id, name), value.as_bytes())?;
        sqlx::query("INSERT INTO secrets (instance_id, name, ciphertext) VALUES ($1, $2, $3)")
            .bind(instance_id)
            .bind(name)
            .bind(sealed)
            .execute(&mut *tx)
            .await?;
    }
    crate::audit(
        &mut *tx,
        &format!("user:{}", req.user_id),
        "instance.claim",
        &instance_id.to_string(),
        serde_json::json!({"subdomain": req.subdomain, "container": container_id, "node": node_id, "onDemand": fallback}),
    )
    .await;
    tx.commit().await?;
    if fallback {
        metrics::counter!("clawdeploy_claim_fallbacks_total").increment(1);
    }
    metrics::histogram!("clawdeploy_claim_commit_seconds").record(started.elapsed().as_secs_f64());
    app.pool_wake.notify_one();
    desired::bump_and_push(app, &node_id).await?;
    let gateway_token = app
        .secrets
        .open_string(&App::gateway_token_aad(container_id), &token_enc)?;
    Ok(Claimed {
        instance_id,
        container_id,
        node_id,
        gateway_token,
    })
}

/// Waits until the instance is ready, up to the configured claim wait.
/// Returns whether it became ready in time.
pub async fn wait_ready(app: &App, instance_id: Uuid) -> Result<bool> {
    let mut ready = app.instance_ready.subscribe();
    let deadline = tokio::time::Instant::now() + app.cfg.claim_wait;
    loop {
        // The database is the truth (another scheduler may hold the agent's
        // session); the broadcast only makes the common case fast.
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM instances WHERE id = $1")
                .bind(instance_id)
                .fetch_optional(&app.db)
                .await?;
        if status.as_deref() == Some("ready") {
            return Ok(true);
        }
        let recheck = tokio::time::Instant::now() + std::time::Duration::from_millis(250);
        loop {
            tokio::select! {
                got = ready.recv() => match got {
                    Ok(id) if id == instance_id => return Ok(true),
                    Ok(_) => continue,
                    Err(_) => break,
                },
                _ = tokio::time::sleep_until(recheck.min(deadline)) => break,
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(false);
        }
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
    let mut tx = app.db.begin().await?;
    let container: Option<(String, String)> = sqlx::query_as(
        "UPDATE containers SET applied_config = GREATEST(applied_config, $3), updated_at = now()
          WHERE id = $1 AND node_id = $2 RETURNING state, upstream",
    )
    .bind(container_id)
    .bind(node_id)
    .bind(applied_version as i64)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((state, upstream)) = container else {
        return Err(Error::NotFound("container on this node"));
    };
    let instance: Option<(Uuid, String, i64, String, chrono::DateTime<chrono::Utc>)> =
        sqlx::query_as(
            "SELECT id, subdomain, config_version, status, created_at FROM instances
          WHERE container_id = $1 AND status IN ('pending', 'ready') FOR UPDATE",
        )
        .bind(container_id)
        .fetch_optional(&mut *tx)
        .await?;
    let Some((instance_id, subdomain, version, status, created_at)) = instance else {
        return Ok(());
    };
    if status != "pending"
        || (applied_version as i64) < version
        || state != "assigning"
        || upstream.is_empty()
    {
        return Ok(());
    }
    sqlx::query("UPDATE containers SET state = 'assigned', updated_at = now() WHERE id = $1")
        .bind(container_id)
        .execute(&mut *tx)
        .await?;
    sqlx::query("UPDATE instances SET status = 'ready', ready_at = now() WHERE id = $1")
        .bind(instance_id)
        .execute(&mut *tx)
        .await?;
    let delta = routes::upsert(
        &mut tx,
        Route {
            hostname: app.cfg.host_of(&subdomain),
            upstream,
            instance_id: instance_id.to_string(),
            container_id: container_id.to_string(),
        },
    )
    .await?;
    crate::audit(
        &mut *tx,
        &format!("node:{node_id}"),
        "instance.ready",
        &instance_id.to_string(),
        serde_json::json!({"container": container_id}),
    )
    .await;
    tx.commit().await?;
    routes::broadcast(app, [delta]);
    let _ = app.instance_ready.send(instance_id);
    let took = (chrono::Utc::now() - created_at)
        .num_microseconds()
        .unwrap_or(0) as f64
        / 1e6;
    metrics::histogram!("clawdeploy_assignment_duration_seconds").record(took);
    metrics::counter!("clawdeploy_assignments_total", "result" => "ready").increment(1);
    tracing::info!(%instance_id, subdomain, %container_id, node_id, took_ms = took * 1e3, "instance ready");
    Ok(())
}
