//! The backup schedule: each ready instance is backed up once per
//! `--backup-interval-secs` (a few at a time across the fleet), backups past
//! `--backup-retention-secs` leave the store, a backup whose agent never
//! reports fails after the migration step timeout (the container runs
//! again), and the age of the stalest instance's last backup is exported.

use uuid::Uuid;

use super::take;
use crate::app::AppRef;
use crate::error::{Error, Result};
use crate::model::BackupKind;

/// Backups being taken at once across the fleet, at most: each stops a
/// tenant briefly and loads its node's disk and network.
const AT_ONCE: i64 = 4;

/// One pass of the schedule.
pub async fn run_once(app: &AppRef) -> Result<()> {
    time_out(app).await?;
    if app.archives.is_none() {
        return Ok(());
    }
    start_due(app).await?;
    expire(app).await?;
    export_age(app).await
}

/// Backups whose agent did not report in time fail; their containers run.
async fn time_out(app: &AppRef) -> Result<()> {
    let nodes: Vec<String> = sqlx::query_scalar(
        "UPDATE backups SET state = 'failed', error = 'the agent did not report the export in time',
                finished_at = now()
          WHERE state = 'taking' AND created_at < now() - make_interval(secs => $1)
          RETURNING node_id",
    )
    .bind(app.cfg.migration_step_timeout.as_secs_f64())
    .fetch_all(&app.db)
    .await?;
    for node in nodes {
        metrics::counter!("clawdeploy_backups_total", "result" => "failed").increment(1);
        crate::agents::desired::bump_and_push(app, &node).await?;
    }
    Ok(())
}

async fn start_due(app: &AppRef) -> Result<()> {
    let taking: i64 = sqlx::query_scalar("SELECT count(*) FROM backups WHERE state = 'taking'")
        .fetch_one(&app.db)
        .await?;
    let room = AT_ONCE - taking;
    if room <= 0 {
        return Ok(());
    }
    // Due: ready for a whole interval and no backup (stored or under way)
    // within it; the stalest first.
    let due: Vec<Uuid> = sqlx::query_scalar(
        "SELECT i.id FROM instances i
          WHERE i.status = 'ready' AND i.ready_at < now() - make_interval(secs => $1)
            AND NOT EXISTS (SELECT 1 FROM backups b WHERE b.instance_id = i.id
                             AND b.state IN ('taking', 'stored')
                             AND b.created_at > now() - make_interval(secs => $1))
            AND NOT EXISTS (SELECT 1 FROM migrations m WHERE m.instance_id = i.id
                             AND m.state IN ('exporting', 'importing'))
          ORDER BY (SELECT max(created_at) FROM backups b WHERE b.instance_id = i.id) NULLS FIRST
          LIMIT $2",
    )
    .bind(app.cfg.backup_interval.as_secs_f64())
    .bind(room)
    .fetch_all(&app.db)
    .await?;
    for instance in due {
        match take(app, instance, BackupKind::Scheduled).await {
            Ok(_) | Err(Error::Conflict { .. }) => {}
            Err(e) => tracing::warn!(%instance, error = %e, "scheduled backup not started"),
        }
    }
    Ok(())
}

/// Backups past the retention period leave the store.
async fn expire(app: &AppRef) -> Result<()> {
    let Some(archives) = &app.archives else {
        return Ok(());
    };
    let old: Vec<(Uuid, String)> = sqlx::query_as(
        "SELECT id, archive_key FROM backups
          WHERE state IN ('stored', 'failed') AND created_at < now() - make_interval(secs => $1)
          LIMIT 100",
    )
    .bind(app.cfg.backup_retention.as_secs_f64())
    .fetch_all(&app.db)
    .await?;
    for (id, key) in old {
        archives.delete(&key).await?;
        sqlx::query("UPDATE backups SET state = 'expired' WHERE id = $1")
            .bind(id)
            .execute(&app.db)
            .await?;
        tracing::info!(backup = %id, "backup past its retention deleted");
    }
    Ok(())
}

/// The age of the stalest ready instance's newest stored backup (or of the
/// instance itself, when it has none yet).
async fn export_age(app: &AppRef) -> Result<()> {
    let age: Option<f64> = sqlx::query_scalar(
        "SELECT max(extract(epoch FROM now() - COALESCE(
                    (SELECT max(b.created_at) FROM backups b
                      WHERE b.instance_id = i.id AND b.state = 'stored'), i.ready_at)))::float8
           FROM instances i WHERE i.status = 'ready'",
    )
    .fetch_one(&app.db)
    .await?;
    metrics::gauge!("clawdeploy_backup_oldest_age_seconds").set(age.unwrap_or(0.0));
    Ok(())
}
