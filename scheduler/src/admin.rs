//! The operator's HTTP API under `/admin`: join tokens for new nodes, the
//! node list, and node removal. Authorised by one bearer token configured
//! at start-up (`--admin-token`); without it the API is switched off.

use std::time::Duration;

use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::app::AppRef;
use crate::error::{Error, Result};
use crate::http::ApiJson;

/// An operator authenticated by the admin token.
pub struct Operator;

impl FromRequestParts<AppRef> for Operator {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, app: &AppRef) -> Result<Self> {
        let Some(want) = &app.admin_token_hash else {
            return Err(Error::Forbidden(
                "the admin API is off: start the scheduler with --admin-token".into(),
            ));
        };
        let given = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or(Error::Unauthenticated)?;
        let given = Sha256::digest(given.trim().as_bytes());
        // Equal-length digests, compared without an early exit.
        let diff = given
            .iter()
            .zip(want)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff != 0 {
            return Err(Error::Unauthenticated);
        }
        Ok(Operator)
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NewJoinToken {
    node_id: String,
    ttl_secs: Option<u64>,
}

#[utoipa::path(post, path = "/admin/join-tokens", tag = "operator", request_body = NewJoinToken, security(("bearer" = [])),
    responses(
        (status = 201, description = "A one-time join token and the CA pin", body = crate::openapi::AnyObject),
        (status = 400, description = "Malformed JSON", body = crate::openapi::ErrorBody),
        (status = 401, description = "No or wrong operator token", body = crate::openapi::ErrorBody),
        (status = 409, description = "The node id was removed", body = crate::openapi::ErrorBody),
        (status = 422, description = "Invalid node id or lifetime", body = crate::openapi::ErrorBody),
    ))]
pub async fn create_join_token(
    _: Operator,
    State(app): State<AppRef>,
    ApiJson(body): ApiJson<NewJoinToken>,
) -> Result<(StatusCode, axum::Json<crate::enroll::JoinToken>)> {
    let ttl = body
        .ttl_secs
        .map(Duration::from_secs)
        .unwrap_or(app.cfg.join_token_ttl);
    let token = crate::enroll::create_token(&app, &body.node_id, ttl, "operator").await?;
    Ok((StatusCode::CREATED, axum::Json(token)))
}

#[utoipa::path(get, path = "/admin/nodes", tag = "operator", security(("bearer" = [])),
    responses((status = 200, description = "Nodes with state, usage and counts", body = crate::openapi::AnyObject),
        (status = 401, description = "No or wrong operator token", body = crate::openapi::ErrorBody),
    ))]
pub async fn list_nodes(_: Operator, State(app): State<AppRef>) -> Result<axum::Json<Value>> {
    #[derive(sqlx::FromRow)]
    struct Row {
        id: String,
        state: String,
        generation: i64,
        last_heartbeat: Option<chrono::DateTime<chrono::Utc>>,
        cert_not_after: Option<chrono::DateTime<chrono::Utc>>,
        containers: i64,
        idle: i64,
        assigned: i64,
        heartbeat_fresh: bool,
        cpu_busy_permille: i32,
        memory_available_bytes: i64,
        disk_available_bytes: i64,
        disk_total_bytes: i64,
        containers_running: i32,
    }
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT n.id, n.state, n.generation, n.last_heartbeat, n.cert_not_after,
                c.containers, c.idle, c.assigned,
                COALESCE(n.last_heartbeat > now() - make_interval(secs => $1), false) AS heartbeat_fresh,
                n.cpu_busy_permille, n.memory_available_bytes, n.disk_available_bytes,
                n.disk_total_bytes, n.containers_running
           FROM nodes n
           CROSS JOIN LATERAL (
                SELECT count(*) FILTER (WHERE state NOT IN ('destroyed', 'failed')) AS containers,
                       count(*) FILTER (WHERE state = 'idle') AS idle,
                       count(*) FILTER (WHERE state = 'assigned') AS assigned
                  FROM containers WHERE node_id = n.id) c
          ORDER BY n.id",
    )
    .bind(app.cfg.heartbeat_ttl.as_secs_f64())
    .fetch_all(&app.db)
    .await?;
    let nodes: Vec<Value> = rows
        .into_iter()
        .map(|r| {
            json!({
                "id": r.id, "state": r.state, "generation": r.generation,
                "lastHeartbeat": r.last_heartbeat, "certNotAfter": r.cert_not_after,
                "containers": r.containers, "idle": r.idle, "assigned": r.assigned,
                // A session with this scheduler; with two schedulers the
                // node may hold its session with the other one, which
                // `heartbeatFresh` (any scheduler heard it within the TTL)
                // tells.
                "connected": app.sessions.sender(&r.id).is_some(),
                "heartbeatFresh": r.heartbeat_fresh,
                "usage": {
                    "cpuBusy": f64::from(r.cpu_busy_permille) / 1000.0,
                    "memoryAvailableBytes": r.memory_available_bytes,
                    "diskAvailableBytes": r.disk_available_bytes,
                    "diskTotalBytes": r.disk_total_bytes,
                    "containersRunning": r.containers_running,
                },
            })
        })
        .collect();
    Ok(axum::Json(json!({ "nodes": nodes })))
}

/// Removes a node for good: its certificate is refused from its next call
/// on, its open session is closed now, and the pool stops using it.
#[utoipa::path(delete, path = "/admin/nodes/{id}", tag = "operator", security(("bearer" = [])),
    params(("id" = String, Path, description = "Node id")),
    responses((status = 200, description = "Removed: its session ends, its certificate is refused", body = crate::openapi::AnyObject),
        (status = 401, description = "No or wrong operator token", body = crate::openapi::ErrorBody),
        (status = 404, description = "No such node", body = crate::openapi::ErrorBody),
    ))]
pub async fn remove_node(
    _: Operator,
    State(app): State<AppRef>,
    Path(node_id): Path<String>,
) -> Result<axum::Json<Value>> {
    let updated = sqlx::query("UPDATE nodes SET state = 'removed' WHERE id = $1")
        .bind(&node_id)
        .execute(&app.db)
        .await?;
    if updated.rows_affected() == 0 {
        return Err(Error::NotFound("node"));
    }
    // Unused join tokens for the node die with it.
    sqlx::query("UPDATE join_tokens SET used_at = now() WHERE node_id = $1 AND used_at IS NULL")
        .bind(&node_id)
        .execute(&app.db)
        .await?;
    app.sessions.close(
        &node_id,
        tonic::Status::permission_denied(format!("node {node_id} has been removed")),
    );
    crate::audit(&app.db, "operator", "node.remove", &node_id, json!({})).await;
    app.pool_wake.notify_one();
    tracing::warn!(node_id, "node removed by operator");
    Ok(axum::Json(json!({"id": node_id, "state": "removed"})))
}

/// The pool's settings and what it holds now, per state and generation.
#[utoipa::path(get, path = "/admin/pool", tag = "operator", security(("bearer" = [])),
    responses((status = 200, description = "Pool settings and counts", body = crate::openapi::AnyObject),
        (status = 401, description = "No or wrong operator token", body = crate::openapi::ErrorBody),
    ))]
pub async fn pool(_: Operator, State(app): State<AppRef>) -> Result<axum::Json<Value>> {
    let settings = crate::settings::load(&app.db).await?;
    let rows: Vec<(String, String, i32, i64)> = sqlx::query_as(
        "SELECT state, image, pool_generation, count(*) FROM containers
          WHERE state IN ('creating', 'warming', 'idle') GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
    )
    .fetch_all(&app.db)
    .await?;
    let containers: Vec<Value> = rows
        .into_iter()
        .map(|(state, image, generation, count)| {
            json!({"state": state, "image": image, "generation": generation, "count": count})
        })
        .collect();
    Ok(axum::Json(
        json!({"settings": settings, "containers": containers}),
    ))
}

/// Changes the pool's settings; a new image or generation rolls the pool.
#[utoipa::path(put, path = "/admin/pool", tag = "operator", request_body = crate::settings::PoolChange, security(("bearer" = [])),
    responses((status = 200, description = "The new settings (a new image or generation rolls the pool)", body = crate::openapi::AnyObject),
        (status = 400, description = "Malformed JSON", body = crate::openapi::ErrorBody),
        (status = 401, description = "No or wrong operator token", body = crate::openapi::ErrorBody),
        (status = 422, description = "Invalid settings", body = crate::openapi::ErrorBody),
    ))]
pub async fn set_pool(
    _: Operator,
    State(app): State<AppRef>,
    ApiJson(change): ApiJson<crate::settings::PoolChange>,
) -> Result<axum::Json<Value>> {
    let next = crate::settings::update(&app, "operator", change).await?;
    Ok(axum::Json(json!({ "settings": next })))
}

/// `POST /admin/nodes/{id}/drain`: no new containers on the node and its
/// idle ones stop counting; its tenants stay.
#[utoipa::path(post, path = "/admin/nodes/{id}/drain", tag = "operator", security(("bearer" = [])),
    params(("id" = String, Path, description = "Node id")),
    responses((status = 200, description = "Draining: nothing new is placed there", body = crate::openapi::AnyObject),
        (status = 401, description = "No or wrong operator token", body = crate::openapi::ErrorBody),
        (status = 404, description = "No such node", body = crate::openapi::ErrorBody),
    ))]
pub async fn drain_node(
    _: Operator,
    State(app): State<AppRef>,
    Path(node_id): Path<String>,
) -> Result<axum::Json<Value>> {
    set_node_state(&app, &node_id, "draining").await
}

/// `POST /admin/nodes/{id}/activate`: the node takes containers again.
#[utoipa::path(post, path = "/admin/nodes/{id}/activate", tag = "operator", security(("bearer" = [])),
    params(("id" = String, Path, description = "Node id")),
    responses((status = 200, description = "Active again", body = crate::openapi::AnyObject),
        (status = 401, description = "No or wrong operator token", body = crate::openapi::ErrorBody),
        (status = 404, description = "No such node", body = crate::openapi::ErrorBody),
    ))]
pub async fn activate_node(
    _: Operator,
    State(app): State<AppRef>,
    Path(node_id): Path<String>,
) -> Result<axum::Json<Value>> {
    set_node_state(&app, &node_id, "active").await
}

async fn set_node_state(app: &AppRef, node_id: &str, state: &str) -> Result<axum::Json<Value>> {
    let from: Option<String> = sqlx::query_scalar(
        "UPDATE nodes n SET state = $2 FROM (SELECT id, state FROM nodes WHERE id = $1 FOR UPDATE) old
          WHERE n.id = old.id AND old.state IN ('active', 'draining', 'unreachable')
          RETURNING old.state",
    )
    .bind(node_id)
    .bind(state)
    .fetch_optional(&app.db)
    .await?;
    let Some(from) = from else {
        let exists: Option<String> = sqlx::query_scalar("SELECT state FROM nodes WHERE id = $1")
            .bind(node_id)
            .fetch_optional(&app.db)
            .await?;
        return Err(match exists {
            None => Error::NotFound("node"),
            Some(_) => Error::Conflict {
                code: "node_removed",
                message: "a removed node cannot change state".into(),
            },
        });
    };
    crate::audit(
        &app.db,
        "operator",
        "node.state",
        node_id,
        json!({"from": from, "to": state}),
    )
    .await;
    app.pool_wake.notify_one();
    tracing::info!(node_id, from, to = state, "node state changed by operator");
    Ok(axum::Json(json!({"id": node_id, "state": state})))
}
