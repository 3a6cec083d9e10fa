//! Moving an instance's container, with its state, to another node: the
//! record of each move (`migrations` rows), how one starts (`start`) and the
//! driver that takes each live one a step further (`drive`).
//!
//! A migration is declarative like everything else the agents do: while it
//! is `exporting`, the source's desired state says "stopped, export to this
//! URL"; while `importing`, the target's says "create from this archive".
//! The database holds every step, so a scheduler killed in the middle picks
//! the migration up where it was.

pub mod drive;
pub mod evacuate;
pub mod start;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::app::App;
use crate::archives::ExportReport;
use crate::error::{Error, Result};
use crate::model::{MigrationKind, MigrationState};

/// One step of a migration and when it began.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Step {
    pub state: MigrationState,
    pub at: DateTime<Utc>,
}

/// A `migrations` row.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct Migration {
    pub id: Uuid,
    pub instance_id: Uuid,
    pub kind: MigrationKind,
    pub state: MigrationState,
    pub source_node: String,
    pub source_container: Uuid,
    pub target_node: String,
    pub target_container: Uuid,
    pub archive_key: String,
    pub archive_sha256: Option<String>,
    pub archive_bytes: Option<i64>,
    pub error: String,
    pub requested_by: String,
    pub created_at: DateTime<Utc>,
    pub state_since: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub steps: sqlx::types::Json<Vec<Step>>,
}

const COLUMNS: &str = "id, instance_id, kind, state, source_node, source_container, target_node,
    target_container, archive_key, archive_sha256, archive_bytes, error, requested_by, created_at,
    state_since, finished_at, steps";

/// SQL that appends the step `$state` (a literal) to `steps`, stamped now.
fn push_step(state: &str) -> String {
    format!("steps = steps || jsonb_build_array(jsonb_build_object('state', '{state}', 'at', now())), state_since = now()")
}

pub async fn get(app: &App, id: Uuid) -> Result<Migration> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM migrations WHERE id = $1"))
        .bind(id)
        .fetch_optional(&app.db)
        .await?
        .ok_or(Error::NotFound("migration"))
}

/// Migrations not yet done or rolled back, oldest first.
pub async fn live(app: &App) -> Result<Vec<Migration>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM migrations WHERE state IN ('exporting', 'importing') ORDER BY created_at"
    ))
    .fetch_all(&app.db)
    .await?)
}

/// Records what `node_id` reports of an export of `container_id`: the
/// migration moves on to importing (and the target's node is told), or
/// rolls back. Reports that match no exporting migration are ignored (a
/// repeat, or one from before a rollback).
pub async fn record_export(
    app: &crate::app::AppRef,
    node_id: &str,
    container_id: Uuid,
    report: &ExportReport,
) -> Result<()> {
    let Ok(id) = report.archive_id.parse::<Uuid>() else {
        return Ok(());
    };
    if !report.error.is_empty() {
        let m: Option<Migration> = sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM migrations
              WHERE id = $1 AND source_container = $2 AND source_node = $3 AND state = 'exporting'"
        ))
        .bind(id)
        .bind(container_id)
        .bind(node_id)
        .fetch_optional(&app.db)
        .await?;
        if let Some(m) = m {
            drive::roll_back(app, &m, &format!("export failed: {}", report.error)).await?;
        }
        return Ok(());
    }
    let target: Option<String> = sqlx::query_scalar(&format!(
        "UPDATE migrations SET archive_sha256 = $4, archive_bytes = $5, state = 'importing', {}
          WHERE id = $1 AND source_container = $2 AND source_node = $3 AND state = 'exporting'
          RETURNING target_node",
        push_step("importing")
    ))
    .bind(id)
    .bind(container_id)
    .bind(node_id)
    .bind(&report.sha256)
    .bind(i64::try_from(report.bytes).unwrap_or(i64::MAX))
    .fetch_optional(&app.db)
    .await?;
    if let Some(target) = target {
        tracing::info!(migration = %id, bytes = report.bytes, target, "state exported; importing on the target");
        metrics::counter!("clawdeploy_archive_bytes_total", "purpose" => "migration")
            .increment(report.bytes);
        crate::agents::desired::bump_and_push(app, &target).await?;
    }
    Ok(())
}
