//! The operator's HTTP API under `/admin`: join tokens for new nodes, the
//! node list, drain, activate and removal, and the pool's settings.
//! Authorised by one bearer token configured at start-up (`--admin-token`);
//! without it the API is switched off.

use std::time::Duration;

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use serde::Deserialize;

use super::extract::{ApiJson, Operator};
use super::views::{
    ContainerCounts, ErrorBody, EvacuationView, JoinTokenView, NodeList, NodeStateView, NodeUsage,
    NodeView, PoolSettingsView, PoolView,
};
use crate::agents::enroll;
use crate::app::AppRef;
use crate::error::{Error, Result};
use crate::fleet::{nodes, settings};
use crate::model::NodeState;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NewJoinToken {
    node_id: String,
    ttl_secs: Option<u64>,
}

#[utoipa::path(post, path = "/admin/join-tokens", tag = "operator", request_body = NewJoinToken, security(("bearer" = [])),
    responses(
        (status = 201, description = "A one-time join token and the CA pin", body = JoinTokenView),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "No or wrong operator token", body = ErrorBody),
        (status = 409, description = "The node id was removed", body = ErrorBody),
        (status = 422, description = "Invalid node id or lifetime", body = ErrorBody),
    ))]
pub async fn create_join_token(
    _: Operator,
    State(app): State<AppRef>,
    ApiJson(body): ApiJson<NewJoinToken>,
) -> Result<(StatusCode, axum::Json<JoinTokenView>)> {
    let ttl = body
        .ttl_secs
        .map(Duration::from_secs)
        .unwrap_or(app.cfg.join_token_ttl);
    let t = enroll::create_token(&app, &body.node_id, ttl, "operator").await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(JoinTokenView {
            token: t.token,
            ca_pin: t.ca_pin,
            node_id: t.node_id,
            expires_at: t.expires_at,
        }),
    ))
}

#[utoipa::path(get, path = "/admin/nodes", tag = "operator", security(("bearer" = [])),
    responses((status = 200, description = "Nodes with state, usage and counts", body = NodeList),
        (status = 401, description = "No or wrong operator token", body = ErrorBody),
    ))]
pub async fn list_nodes(_: Operator, State(app): State<AppRef>) -> Result<axum::Json<NodeList>> {
    let nodes = nodes::list(&app)
        .await?
        .into_iter()
        .map(|n| NodeView {
            connected: app.sessions.sender(&n.id).is_some(),
            free_slots: (i64::from(n.max_containers) - n.containers).max(0),
            evacuation: n.evacuating.then_some(EvacuationView {
                remaining: n.assigned,
                migrating: n.migrating_out,
            }),
            id: n.id,
            ip: n.ip,
            status: n.state.into(),
            state: n.state,
            generation: n.generation,
            last_heartbeat: n.last_heartbeat,
            cert_not_after: n.cert_not_after,
            containers: ContainerCounts {
                total: n.containers,
                idle: n.idle,
                assigned: n.assigned,
            },
            idle: n.idle,
            assigned: n.assigned,
            heartbeat_fresh: n.heartbeat_fresh,
            usage: NodeUsage {
                cpu_busy: f64::from(n.cpu_busy_permille) / 1000.0,
                memory_available_bytes: n.memory_available_bytes,
                disk_available_bytes: n.disk_available_bytes,
                disk_total_bytes: n.disk_total_bytes,
                containers_running: n.containers_running,
            },
        })
        .collect();
    Ok(axum::Json(NodeList { nodes }))
}

/// Removes a node for good: its certificate is refused from its next call
/// on, its open session is closed now, and the pool stops using it.
/// Refused (409) while the node holds tenants, unless `?force=true`, which
/// loses their data.
#[utoipa::path(delete, path = "/admin/nodes/{id}", tag = "operator", security(("bearer" = [])),
    params(("id" = String, Path, description = "Node id"),
        ("force" = Option<bool>, Query, description = "Remove even with tenants on it (their data is lost)")),
    responses((status = 200, description = "Removed: its session ends, its certificate is refused", body = NodeStateView),
        (status = 400, description = "Unknown query parameter", body = ErrorBody),
        (status = 401, description = "No or wrong operator token", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody),
        (status = 409, description = "The node still holds tenants", body = ErrorBody),
    ))]
pub async fn remove_node(
    _: Operator,
    State(app): State<AppRef>,
    Path(node_id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<axum::Json<NodeStateView>> {
    let mut force = false;
    for pair in query
        .iter()
        .flat_map(|q| q.split('&'))
        .filter(|p| !p.is_empty())
    {
        force = match pair {
            "force=true" => true,
            "force=false" => false,
            _ => {
                return Err(Error::BadRequest(format!(
                    "unknown query parameter {pair:?}: only force=true|false"
                )))
            }
        };
    }
    nodes::remove(&app, &node_id, force).await?;
    Ok(axum::Json(NodeStateView {
        id: node_id,
        state: NodeState::Removed,
    }))
}

/// The pool's settings and what it holds now, per state and generation.
#[utoipa::path(get, path = "/admin/pool", tag = "operator", security(("bearer" = [])),
    responses((status = 200, description = "Pool settings and counts", body = PoolView),
        (status = 401, description = "No or wrong operator token", body = ErrorBody),
    ))]
pub async fn pool(_: Operator, State(app): State<AppRef>) -> Result<axum::Json<PoolView>> {
    Ok(axum::Json(PoolView {
        settings: settings::load(&app.db).await?,
        containers: settings::warm_counts(&app).await?,
    }))
}

/// Changes the pool's settings; a new image or generation rolls the pool.
#[utoipa::path(put, path = "/admin/pool", tag = "operator", request_body = settings::PoolChange, security(("bearer" = [])),
    responses((status = 200, description = "The new settings (a new image or generation rolls the pool)", body = PoolSettingsView),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "No or wrong operator token", body = ErrorBody),
        (status = 422, description = "Invalid settings", body = ErrorBody),
    ))]
pub async fn set_pool(
    _: Operator,
    State(app): State<AppRef>,
    ApiJson(change): ApiJson<settings::PoolChange>,
) -> Result<axum::Json<PoolSettingsView>> {
    let settings = settings::update(&app, "operator", change).await?;
    Ok(axum::Json(PoolSettingsView { settings }))
}

/// `POST /admin/nodes/{id}/drain`: no new containers on the node and its
/// idle ones stop counting; its tenants stay, or with `{"evacuate": true}`
/// migrate off it.
#[utoipa::path(post, path = "/admin/nodes/{id}/drain", tag = "operator", security(("bearer" = [])),
    params(("id" = String, Path, description = "Node id")),
    request_body(content = Option<DrainBody>, description = "Optional"),
    responses((status = 200, description = "Draining: nothing new is placed there", body = NodeStateView),
        (status = 400, description = "Malformed body", body = ErrorBody),
        (status = 401, description = "No or wrong operator token", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody),
    ))]
pub async fn drain_node(
    _: Operator,
    State(app): State<AppRef>,
    Path(node_id): Path<String>,
    body: axum::body::Bytes,
) -> Result<axum::Json<NodeStateView>> {
    // The body is optional: no body drains only.
    let DrainBody { evacuate } = if body.iter().all(u8::is_ascii_whitespace) {
        DrainBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| Error::BadRequest(format!("drain body: {e}")))?
    };
    nodes::set_state(&app, &node_id, NodeState::Draining, evacuate).await?;
    Ok(axum::Json(NodeStateView {
        id: node_id,
        state: NodeState::Draining,
    }))
}

#[derive(Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DrainBody {
    /// Also migrate every tenant off the node, a few at a time
    /// (`--evacuate-concurrency`); progress shows in `GET /admin/nodes`.
    #[serde(default)]
    evacuate: bool,
}

/// `POST /admin/nodes/{id}/activate`: the node takes containers again.
#[utoipa::path(post, path = "/admin/nodes/{id}/activate", tag = "operator", security(("bearer" = [])),
    params(("id" = String, Path, description = "Node id")),
    responses((status = 200, description = "Active again", body = NodeStateView),
        (status = 401, description = "No or wrong operator token", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody),
    ))]
pub async fn activate_node(
    _: Operator,
    State(app): State<AppRef>,
    Path(node_id): Path<String>,
) -> Result<axum::Json<NodeStateView>> {
    nodes::set_state(&app, &node_id, NodeState::Active, false).await?;
    Ok(axum::Json(NodeStateView {
        id: node_id,
        state: NodeState::Active,
    }))
}
