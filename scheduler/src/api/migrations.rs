//! The operator's migrations and backups under `/admin`: move an instance,
//! with its state, to another node, follow the move step by step, take a
//! backup now, restore one.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use uuid::Uuid;

use super::extract::{ApiJson, Operator};
use super::views::{BackupView, ErrorBody, MigrationView};
use crate::app::AppRef;
use crate::backup;
use crate::error::{Error, Result};
use crate::migration::{self, start::MigrateRequest};
use crate::model::{BackupKind, MigrationKind};

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
            from_backup: None,
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

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RestoreBody {
    backup_id: Uuid,
    /// Omitted: the instance's own node when it has room, else placement.
    target_node: Option<String>,
}

/// Restores a stored backup into a new container (a migration of kind
/// `restore` that starts at the import); the current container is
/// destroyed once the restored one proved the config live.
#[utoipa::path(post, path = "/admin/instances/{id}/restore", tag = "operator", request_body = RestoreBody, security(("bearer" = [])),
    params(("id" = String, Path, description = "Instance id")),
    responses(
        (status = 202, description = "Started: follow it at /admin/migrations/{id}", body = MigrationView),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "No or wrong operator token", body = ErrorBody),
        (status = 404, description = "No such instance or stored backup", body = ErrorBody),
        (status = 409, description = "Already migrating, backing up or not ready", body = ErrorBody),
        (status = 503, description = "No archive store configured, or no node has room", body = ErrorBody),
    ))]
pub async fn restore(
    _: Operator,
    State(app): State<AppRef>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<RestoreBody>,
) -> Result<(StatusCode, axum::Json<MigrationView>)> {
    let instance_id: Uuid = id.parse().map_err(|_| Error::NotFound("instance"))?;
    let m = migration::start::start(
        &app,
        MigrateRequest {
            instance_id,
            target_node: body.target_node,
            kind: MigrationKind::Restore,
            actor: "operator".into(),
            from_backup: Some(body.backup_id),
        },
    )
    .await?;
    Ok((StatusCode::ACCEPTED, axum::Json(m.into())))
}

/// Takes a backup now (beside the daily schedule).
#[utoipa::path(post, path = "/admin/instances/{id}/backups", tag = "operator", security(("bearer" = [])),
    params(("id" = String, Path, description = "Instance id")),
    responses(
        (status = 202, description = "Started: the container stops while its state uploads", body = BackupView),
        (status = 401, description = "No or wrong operator token", body = ErrorBody),
        (status = 404, description = "No such instance", body = ErrorBody),
        (status = 409, description = "A backup or migration is under way, or the instance is not ready", body = ErrorBody),
        (status = 503, description = "No archive store configured", body = ErrorBody),
    ))]
pub async fn take_backup(
    _: Operator,
    State(app): State<AppRef>,
    Path(id): Path<String>,
) -> Result<(StatusCode, axum::Json<BackupView>)> {
    let instance_id: Uuid = id.parse().map_err(|_| Error::NotFound("instance"))?;
    let b = backup::take(&app, instance_id, BackupKind::Manual).await?;
    Ok((StatusCode::ACCEPTED, axum::Json(b.into())))
}
