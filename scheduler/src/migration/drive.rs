//! Takes each live migration one step further, from what the database says
//! (so a restarted scheduler resumes where the last one was): an imported
//! target that proved the customer's config live gets the route and the
//! source is destroyed; a target that failed, a node that went silent, an
//! instance released meanwhile or a step past its timeout rolls back, and
//! the source runs again with its state untouched.

use chrono::Utc;
use uuid::Uuid;

use super::{live, push_step, Migration};
use crate::app::AppRef;
use crate::audit::audit;
use crate::error::Result;
use crate::lifecycle::complete::{serve_from, Serving};
use crate::model::{InstanceStatus, MigrationKind, MigrationState, NodeState};
use crate::routes;

/// What the driver needs to know about the target and the instance.
#[derive(sqlx::FromRow)]
struct Progress {
    instance_status: InstanceStatus,
    instance_container: Option<Uuid>,
    config_version: i64,
    subdomain: String,
    target_applied: i64,
    target_upstream: String,
    target_message: String,
    target_node_state: NodeState,
    source_node_state: NodeState,
}

/// One pass over every live migration.
pub async fn advance(app: &AppRef) -> Result<()> {
    for m in live(app).await? {
        if let Err(e) = step(app, &m).await {
            tracing::warn!(migration = %m.id, error = %e, "migration step failed; retrying");
        }
    }
    Ok(())
}

async fn step(app: &AppRef, m: &Migration) -> Result<()> {
    let p: Progress = sqlx::query_as(
        "SELECT i.status AS instance_status, i.container_id AS instance_container, i.config_version,
                i.subdomain, t.applied_config AS target_applied, t.upstream AS target_upstream,
                t.message AS target_message, tn.state AS target_node_state, sn.state AS source_node_state
           FROM migrations m
           JOIN instances i ON i.id = m.instance_id
           JOIN containers t ON t.id = m.target_container
           JOIN nodes tn ON tn.id = m.target_node
           JOIN nodes sn ON sn.id = m.source_node
          WHERE m.id = $1",
    )
    .bind(m.id)
    .fetch_one(&app.db)
    .await?;
    if p.instance_status != InstanceStatus::Ready
        || p.instance_container != Some(m.source_container)
    {
        return roll_back(app, m, "the instance was released or changed meanwhile").await;
    }
    let timeout =
        chrono::Duration::from_std(app.cfg.migration_step_timeout).unwrap_or(chrono::Duration::MAX);
    let overdue = Utc::now() - m.state_since > timeout;
    match m.state {
        MigrationState::Exporting => {
            if p.source_node_state == NodeState::Unreachable {
                return roll_back(app, m, "the source node stopped answering").await;
            }
            if overdue {
                return roll_back(app, m, "the export did not finish in time").await;
            }
        }
        MigrationState::Importing => {
            if !p.target_message.is_empty() {
                let why = format!("the target failed: {}", p.target_message);
                return roll_back(app, m, &why).await;
            }
            if matches!(
                p.target_node_state,
                NodeState::Unreachable | NodeState::Removed
            ) {
                return roll_back(app, m, "the target node stopped answering").await;
            }
            if p.target_applied >= p.config_version && !p.target_upstream.is_empty() {
                return switch(app, m, &p).await;
            }
            if overdue {
                return roll_back(app, m, "the target did not come up in time").await;
            }
        }
        MigrationState::Done | MigrationState::RolledBack => {}
    }
    Ok(())
}

/// The target proved the customer's config live: in one transaction the
/// instance moves to it, the route points at it and the source is marked
/// for destruction; then the edges are told and both nodes pushed.
async fn switch(app: &AppRef, m: &Migration, p: &Progress) -> Result<()> {
    let mut tx = app.db.begin().await?;
    let moved = sqlx::query(&format!(
        "UPDATE migrations SET state = 'done', finished_at = now(), {}
          WHERE id = $1 AND state = 'importing'",
        push_step("done")
    ))
    .bind(m.id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if moved == 0 {
        // Another scheduler got there first.
        return Ok(());
    }
    sqlx::query("UPDATE instances SET container_id = $2 WHERE id = $1")
        .bind(m.instance_id)
        .bind(m.target_container)
        .execute(&mut *tx)
        .await?;
    sqlx::query("UPDATE containers SET state = 'destroying', updated_at = now() WHERE id = $1")
        .bind(m.source_container)
        .execute(&mut *tx)
        .await?;
    let deltas = serve_from(
        app,
        &mut tx,
        Serving {
            instance_id: m.instance_id,
            container_id: m.target_container,
            subdomain: &p.subdomain,
            upstream: p.target_upstream.clone(),
        },
    )
    .await?;
    audit(
        &mut *tx,
        "scheduler",
        "instance.migrated",
        &m.instance_id.to_string(),
        serde_json::json!({"migration": m.id, "from": m.source_node, "to": m.target_node}),
    )
    .await;
    tx.commit().await?;
    let version = routes::last_sent(&deltas);
    routes::broadcast(app, deltas, None).await;
    if let Some(version) = version {
        routes::wait_edges(app, m.instance_id, version).await;
    }
    // Customer-visible downtime: from the source's stop to the switch.
    let downtime = (Utc::now() - m.created_at).to_std().unwrap_or_default();
    metrics::histogram!("clawdeploy_migration_downtime_seconds").record(downtime.as_secs_f64());
    metrics::counter!("clawdeploy_migrations_total", "result" => "done").increment(1);
    tracing::info!(migration = %m.id, instance = %m.instance_id, to = m.target_node,
        downtime_ms = downtime.as_millis() as u64, "migration done; destroying the source");
    crate::agents::desired::bump_and_push(app, &m.target_node).await?;
    crate::agents::desired::bump_and_push(app, &m.source_node).await?;
    forget_archive(app, m).await;
    Ok(())
}

/// Ends the migration before the switch: the target container goes, the
/// source (never touched but stopped) runs again.
pub async fn roll_back(app: &AppRef, m: &Migration, why: &str) -> Result<()> {
    let mut tx = app.db.begin().await?;
    let ended = sqlx::query(&format!(
        "UPDATE migrations SET state = 'rolled_back', error = $2, finished_at = now(), {}
          WHERE id = $1 AND state IN ('exporting', 'importing')",
        push_step("rolled_back")
    ))
    .bind(m.id)
    .bind(why)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if ended == 0 {
        return Ok(());
    }
    sqlx::query(
        "UPDATE containers SET state = 'destroying', updated_at = now() WHERE id = $1 AND state = 'migrating'",
    )
    .bind(m.target_container)
    .execute(&mut *tx)
    .await?;
    audit(
        &mut *tx,
        "scheduler",
        "instance.migration_rolled_back",
        &m.instance_id.to_string(),
        serde_json::json!({"migration": m.id, "reason": why}),
    )
    .await;
    tx.commit().await?;
    metrics::counter!("clawdeploy_migrations_total", "result" => "rolled_back").increment(1);
    tracing::warn!(migration = %m.id, instance = %m.instance_id, reason = why, "migration rolled back; the source runs again");
    crate::agents::desired::bump_and_push(app, &m.source_node).await?;
    crate::agents::desired::bump_and_push(app, &m.target_node).await?;
    forget_archive(app, m).await;
    Ok(())
}

/// A migration's archive only mattered while it ran; a restore's is a
/// backup and stays.
async fn forget_archive(app: &AppRef, m: &Migration) {
    if m.kind == MigrationKind::Restore {
        return;
    }
    if let Some(archives) = &app.archives {
        if let Err(e) = archives.delete(&m.archive_key).await {
            tracing::warn!(migration = %m.id, key = m.archive_key, error = %e, "could not delete the migration archive");
        }
    }
}
