//! The operator's migrations under `/admin`: move an instance, with its
//! state, to another node, and follow the move step by step.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use uuid::Uuid;

use super::extract::{ApiJson, Operator};
use super::views::{ErrorBody, MigrationView};
use crate::app::AppRef;
use crate::error::{Error, Result};
use crate::migration::{self, start::MigrateRequest};
use crate::model::MigrationKind;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MigrateBody {
    instance_id: Uuid,
    /// Omitted: placement picks a node other than the current one.
    target_node: Option<String>,
}

/// Starts moving an instance to another node. The answer comes at once;
/// `GET /admin/migrations/{id}` follows it.
#[utoipa::path(post, path = "/admin/instances/migrate", tag = "operator", request_body = MigrateBody, security(("bearer" = [])),
    responses(
        (status = 202, description = "Started: the source is stopping to export its state", body = MigrationView),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "No or wrong operator token", body = ErrorBody),
        (status = 404, description = "No such instance", body = ErrorBody),
        (status = 409, description = "Already migrating, not ready, or the target cannot take it", body = ErrorBody),
        (status = 503, description = "No archive store configured, or no node has room", body = ErrorBody),
    ))]
pub async fn migrate(
    _: Operator,
    State(app): State<AppRef>,
    ApiJson(body): ApiJson<MigrateBody>,
) -> Result<(StatusCode, axum::Json<MigrationView>)> {
    let m = migration::start::start(
        &app,
        MigrateRequest {
            instance_id: body.instance_id,
            target_node: body.target_node,
            kind: MigrationKind::Migrate,
            actor: "operator".into(),
        },
    )
    .await?;
    Ok((StatusCode::ACCEPTED, axum::Json(m.into())))
}

#[utoipa::path(get, path = "/admin/migrations/{id}", tag = "operator", security(("bearer" = [])),
    params(("id" = String, Path, description = "Migration id")),
    responses((status = 200, description = "The migration with each step's start", body = MigrationView),
        (status = 401, description = "No or wrong operator token", body = ErrorBody),
        (status = 404, description = "No such migration", body = ErrorBody),
    ))]
pub async fn get_migration(
    _: Operator,
    State(app): State<AppRef>,
    Path(id): Path<String>,
) -> Result<axum::Json<MigrationView>> {
    let id: Uuid = id.parse().map_err(|_| Error::NotFound("migration"))?;
    Ok(axum::Json(migration::get(&app, id).await?.into()))
}
