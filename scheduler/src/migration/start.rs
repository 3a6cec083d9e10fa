//! Starting a migration: the instance must be ready, the target active with
//! room; the target container is booked (`migrating`, the same gateway
//! token and limits) and the source's node is told to stop it and export.
//! A restore is the same move with the archive already stored (a backup):
//! it starts at `importing`, and may land on the source's own node.

use uuid::Uuid;

use super::{get, Migration};
use crate::app::AppRef;
use crate::archives::{Archives, Purpose};
use crate::audit::audit;
use crate::crypto::aad;
use crate::error::{Error, Result};
use crate::fleet::{capacity, placement, settings};
use crate::model::{InstanceStatus, MigrationKind, MigrationState};

/// What an operator (or the evacuation of a node) asks for.
#[derive(Clone, Debug)]
pub struct MigrateRequest {
    pub instance_id: Uuid,
    /// `None`: placement picks a node other than the source.
    pub target_node: Option<String>,
    pub kind: MigrationKind,
    pub actor: String,
    /// A restore: the stored backup to start the new container from.
    pub from_backup: Option<Uuid>,
}

/// The container a ready instance runs in now.
#[derive(sqlx::FromRow)]
struct Source {
    id: Uuid,
    node_id: String,
    image: String,
    pool_generation: i32,
    gateway_token_enc: Vec<u8>,
    cpu_millis: i32,
    memory_bytes: i64,
    pids: i32,
}

fn conflict(code: &'static str, message: impl Into<String>) -> Error {
    Error::Conflict {
        code,
        message: message.into(),
    }
}

pub async fn start(app: &AppRef, req: MigrateRequest) -> Result<Migration> {
    crate::archives::required(app.archives.as_ref())?;
    let mut tx = app.db.begin().await?;
    let src: Option<Source> = sqlx::query_as(
        "SELECT c.id, c.node_id, c.image, c.pool_generation, c.gateway_token_enc,
                c.cpu_millis, c.memory_bytes, c.pids
           FROM instances i JOIN containers c ON c.id = i.container_id AND c.state = 'assigned'
          WHERE i.id = $1 AND i.status = 'ready'
          FOR UPDATE OF i",
    )
    .bind(req.instance_id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(Source {
        id: source,
        node_id: source_node,
        image,
        pool_generation: generation,
        gateway_token_enc: token,
        cpu_millis: cpu,
        memory_bytes: memory,
        pids,
    }) = src
    else {
        let status: Option<InstanceStatus> =
            sqlx::query_scalar("SELECT status FROM instances WHERE id = $1")
                .bind(req.instance_id)
                .fetch_optional(&mut *tx)
                .await?;
        return Err(match status {
            None => Error::NotFound("instance"),
            Some(status) => conflict(
                "instance_not_ready",
                format!(
                    "only a ready instance with a running container moves (this one is {status:?})"
                ),
            ),
        });
    };
    let backing_up: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM backups WHERE container_id = $1 AND state = 'taking')",
    )
    .bind(source)
    .fetch_one(&mut *tx)
    .await?;
    if backing_up {
        return Err(conflict(
            "backup_in_progress",
            "a backup of this instance is being taken; try again in a moment",
        ));
    }
    let restore = match req.from_backup {
        Some(id) => Some(crate::backup::stored(app, req.instance_id, id).await?),
        None => None,
    };
    let pool = settings::load(&mut *tx).await?;
    let mut nodes = capacity::schedulable_nodes(app, &mut *tx, &pool, None).await?;
    let in_place = restore.is_some()
        && req.target_node.is_none()
        && nodes.iter().any(|n| n.id == source_node && n.fits(memory));
    let target = match &req.target_node {
        _ if in_place => source_node.clone(),
        Some(t) if *t == source_node && restore.is_none() => {
            return Err(conflict(
                "same_node",
                format!("the instance already runs on {t}"),
            ))
        }
        Some(t) => {
            let node = nodes.iter().find(|n| n.id == *t).ok_or_else(|| {
                conflict(
                    "node_not_schedulable",
                    format!("node {t} is not active with a fresh heartbeat"),
                )
            })?;
            if !node.fits(memory) {
                return Err(conflict(
                    "node_full",
                    format!("node {t} has no room for this instance"),
                ));
            }
            t.clone()
        }
        None => {
            if restore.is_none() {
                nodes.retain(|n| n.id != source_node);
            }
            placement::pick(&mut nodes, memory)
                .map(|n| n.id.clone())
                .ok_or_else(|| Error::NoCapacity("no other node has room".into()))?
        }
    };

    // The counts above were read without locks: hold the slot for real.
    capacity::reserve_slot(&mut tx, &target)
        .await
        .map_err(|e| match e {
            Error::NoCapacity(m) => conflict("node_full", m),
            e => e,
        })?;
    // The target container: the same gateway token (sealed for its own id),
    // image and limits, booked on the target until the switch.
    let target_container = Uuid::new_v4();
    let plain = app.secrets.open(&aad::gateway_token(source), &token)?;
    let sealed = app
        .secrets
        .seal(&aad::gateway_token(target_container), &plain)?;
    sqlx::query(
        "INSERT INTO containers (id, node_id, image, pool_generation, gateway_token_enc, state, cpu_millis, memory_bytes, pids)
         VALUES ($1, $2, $3, $4, $5, 'migrating', $6, $7, $8)",
    )
    .bind(target_container)
    .bind(&target)
    .bind(&image)
    .bind(generation)
    .bind(&sealed)
    .bind(cpu)
    .bind(memory)
    .bind(pids)
    .execute(&mut *tx)
    .await?;
    let id = Uuid::new_v4();
    // A restore's archive is stored already: it starts at the import.
    let (state, key, sha256, bytes) = match &restore {
        Some(b) => (
            MigrationState::Importing,
            b.archive_key.clone(),
            b.archive_sha256.clone(),
            b.archive_bytes,
        ),
        None => (
            MigrationState::Exporting,
            Archives::key(req.instance_id, Purpose::Migration),
            None,
            None,
        ),
    };
    sqlx::query(
        "INSERT INTO migrations (id, instance_id, kind, state, source_node, source_container,
                                 target_node, target_container, archive_key, archive_sha256,
                                 archive_bytes, requested_by, steps)
         VALUES ($1, $2, $3, $10, $4, $5, $6, $7, $8, $11, $12, $9,
                 jsonb_build_array(jsonb_build_object('state', $10::text, 'at', now())))",
    )
    .bind(id)
    .bind(req.instance_id)
    .bind(req.kind)
    .bind(&source_node)
    .bind(source)
    .bind(&target)
    .bind(target_container)
    .bind(&key)
    .bind(&req.actor)
    .bind(state)
    .bind(sha256)
    .bind(bytes)
    .execute(&mut *tx)
    .await
    .map_err(|e| {
        Error::on_unique(
            e,
            "migrations_one_live",
            "migration_in_progress",
            "this instance is already being migrated",
        )
    })?;
    audit(
        &mut *tx,
        &req.actor,
        "instance.migrate",
        &req.instance_id.to_string(),
        serde_json::json!({"migration": id, "from": source_node, "to": target, "kind": req.kind,
                           "backup": req.from_backup}),
    )
    .await;
    tx.commit().await?;
    tracing::info!(migration = %id, instance = %req.instance_id, from = source_node, to = target, "migration started: stopping the source to export its state");
    // The route pauses before the source stops: the edge answers at once
    // rather than dialling an address that is about to vanish.
    crate::routes::repoint(app, source, "").await?;
    crate::agents::desired::bump_and_push(app, &source_node).await?;
    if target != source_node && restore.is_some() {
        crate::agents::desired::bump_and_push(app, &target).await?;
    }
    app.tasks.migrations.activate();
    get(app, id).await
}
