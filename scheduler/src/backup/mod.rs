//! Backups of instances' state volumes in the archive store. Taking one is
//! declarative like a migration's export: while a `backups` row is `taking`,
//! the container's desired state says "stopped, export here"; the agent's
//! report stores it (or fails it) and the container runs again. The gateway
//! keeps its state in plain files it may be writing at any moment, so a
//! backup stops it for as long as the export takes (a fraction of a second
//! for a small state) rather than copying files under a running process.
//! The schedule, retention and timeouts are `schedule`.

pub mod schedule;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::app::AppRef;
use crate::archives::{Archives, ExportReport, Purpose};
use crate::audit::audit;
use crate::error::{Error, Result};
use crate::model::{BackupKind, BackupState};

/// A `backups` row.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct Backup {
    pub id: Uuid,
    pub instance_id: Uuid,
    pub container_id: Uuid,
    pub node_id: String,
    pub kind: BackupKind,
    pub state: BackupState,
    pub archive_key: String,
    pub archive_sha256: Option<String>,
    pub archive_bytes: Option<i64>,
    pub error: String,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

const COLUMNS: &str = "id, instance_id, container_id, node_id, kind, state, archive_key,
    archive_sha256, archive_bytes, error, created_at, finished_at";

/// Starts a backup of the instance's container: a running tenant (ready)
/// or a released one's stopped container (its grace period).
pub async fn take(app: &AppRef, instance_id: Uuid, kind: BackupKind) -> Result<Backup> {
    crate::archives::required(app.archives.as_ref())?;
    let mut tx = app.db.begin().await?;
    let found: Option<(Uuid, String, bool)> = sqlx::query_as(
        "SELECT c.id, c.node_id, EXISTS (SELECT 1 FROM migrations m WHERE m.instance_id = i.id
                                          AND m.state IN ('exporting', 'importing'))
           FROM instances i JOIN containers c ON c.id = i.container_id
          WHERE i.id = $1 AND ((i.status = 'ready' AND c.state = 'assigned')
                            OR (i.status = 'deleting' AND c.state = 'suspended'))
          FOR UPDATE OF i",
    )
    .bind(instance_id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((container_id, node_id, migrating)) = found else {
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM instances WHERE id = $1)")
                .bind(instance_id)
                .fetch_one(&mut *tx)
                .await?;
        return Err(if exists {
            Error::Conflict {
                code: "instance_not_ready",
                message: "only a ready or released instance with its container is backed up".into(),
            }
        } else {
            Error::NotFound("instance")
        });
    };
    if migrating {
        return Err(Error::Conflict {
            code: "migration_in_progress",
            message: "the instance is being migrated".into(),
        });
    }
    let id = Uuid::new_v4();
    let backup: Backup = sqlx::query_as(&format!(
        "INSERT INTO backups (id, instance_id, container_id, node_id, kind, state, archive_key)
         VALUES ($1, $2, $3, $4, $5, 'taking', $6) RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(instance_id)
    .bind(container_id)
    .bind(&node_id)
    .bind(kind)
    .bind(Archives::key(instance_id, Purpose::Backup))
    .fetch_one(&mut *tx)
    .await
    .map_err(|e| {
        Error::on_unique(
            e,
            "backups_one_taking",
            "backup_in_progress",
            "a backup of this instance is being taken",
        )
    })?;
    audit(
        &mut *tx,
        "scheduler",
        "instance.backup",
        &instance_id.to_string(),
        serde_json::json!({"backup": id, "kind": kind}),
    )
    .await;
    tx.commit().await?;
    // As for a migration: the edge answers at once while it is stopped.
    crate::routes::repoint(app, container_id, "").await?;
    crate::agents::desired::bump_and_push(app, &node_id).await?;
    tracing::info!(backup = %id, instance = %instance_id, node_id, kind = ?kind, "backup started");
    Ok(backup)
}

/// Records an agent's export report if it is for a backup being taken:
/// stored or failed, and the container runs again (or stays stopped, if it
/// was suspended).
pub async fn record_export(
    app: &AppRef,
    node_id: &str,
    container_id: Uuid,
    report: &ExportReport,
) -> Result<()> {
    let Ok(id) = report.archive_id.parse::<Uuid>() else {
        return Ok(());
    };
    let ok = report.error.is_empty();
    let done: Option<Uuid> = sqlx::query_scalar(
        "UPDATE backups SET state = CASE WHEN $4 THEN 'stored' ELSE 'failed' END,
                archive_sha256 = NULLIF($5, ''), archive_bytes = $6, error = $7, finished_at = now()
          WHERE id = $1 AND container_id = $2 AND node_id = $3 AND state = 'taking'
          RETURNING instance_id",
    )
    .bind(id)
    .bind(container_id)
    .bind(node_id)
    .bind(ok)
    .bind(&report.sha256)
    .bind(ok.then(|| i64::try_from(report.bytes).unwrap_or(i64::MAX)))
    .bind(&report.error)
    .fetch_optional(&app.db)
    .await?;
    let Some(instance) = done else {
        return Ok(());
    };
    if ok {
        metrics::counter!("clawdeploy_backups_total", "result" => "stored").increment(1);
        metrics::counter!("clawdeploy_archive_bytes_total", "purpose" => "backup")
            .increment(report.bytes);
        tracing::info!(backup = %id, %instance, bytes = report.bytes, "backup stored");
    } else {
        metrics::counter!("clawdeploy_backups_total", "result" => "failed").increment(1);
        tracing::warn!(backup = %id, %instance, error = report.error, "backup failed");
    }
    crate::agents::desired::bump_and_push(app, node_id).await
}

/// The instance's backups, newest first (expired ones are gone from the
/// store and not listed).
pub async fn list_for(app: &AppRef, instance_id: Uuid) -> Result<Vec<Backup>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM backups WHERE instance_id = $1 AND state <> 'expired'
          ORDER BY created_at DESC"
    ))
    .bind(instance_id)
    .fetch_all(&app.db)
    .await?)
}

/// One stored backup of the instance.
pub async fn stored(app: &AppRef, instance_id: Uuid, id: Uuid) -> Result<Backup> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM backups WHERE id = $1 AND instance_id = $2 AND state = 'stored'"
    ))
    .bind(id)
    .bind(instance_id)
    .fetch_optional(&app.db)
    .await?
    .ok_or(Error::NotFound("stored backup of this instance"))
}
