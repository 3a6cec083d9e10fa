//! Builds a node's full desired state from the database and pushes it on the
//! node's open session. Every push reads the latest committed state, so
//! pushes may race freely: the agent keeps the highest generation.

use std::collections::HashMap;

use clawdeploy_proto::{
    scheduler_message, ArchiveExport, ArchiveImport, DesiredContainer, DesiredState,
    ProviderEndpoint, Resources, SchedulerMessage, TenantConfig,
};
use uuid::Uuid;

use crate::app::sessions::Outgoing;
use crate::app::{App, AppRef};
use crate::crypto::{aad, envelope};
use crate::error::{Error, Result};
use crate::events::{self, Event};
use crate::model::Generation;

/// States whose containers should be running on their node.
pub const RUNNING_STATES: &str = "('creating', 'warming', 'idle', 'assigning', 'assigned')";

/// A container the node should hold, with its tenant if it has one.
#[derive(sqlx::FromRow)]
struct ContainerRow {
    id: Uuid,
    image: String,
    gateway_token_enc: Vec<u8>,
    cpu_millis: i32,
    memory_bytes: i64,
    pids: i32,
    instance_id: Option<Uuid>,
    config_version: Option<i64>,
    default_model: Option<String>,
    stopped: bool,
    /// A migration exporting this container's state: its id and archive key.
    export_id: Option<Uuid>,
    export_key: Option<String>,
    /// A migration filling this container from an archive.
    import_id: Option<Uuid>,
    import_key: Option<String>,
    import_sha256: Option<String>,
    import_bytes: Option<i64>,
}

/// Reads the node's desired state in one snapshot; `on_snapshot` runs just
/// before the snapshot is taken (the first read).
pub async fn load(app: &App, node_id: &str, on_snapshot: impl FnOnce()) -> Result<DesiredState> {
    let mut tx = app.agents_db.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *tx)
        .await?;
    on_snapshot();
    let generation: Generation = sqlx::query_scalar("SELECT generation FROM nodes WHERE id = $1")
        .bind(node_id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(Error::NotFound("node"))?;
    let rows: Vec<ContainerRow> = sqlx::query_as(&format!(
        // A migration's source is stopped while it runs (and exports first),
        // a backup's while it exports;
        // its target carries the instance's config and the archive to
        // start from. One live migration per instance: at most one row each.
        "SELECT c.id, c.image, c.gateway_token_enc, c.cpu_millis, c.memory_bytes, c.pids,
                COALESCE(i.id, ti.id) AS instance_id,
                COALESCE(i.config_version, ti.config_version) AS config_version,
                COALESCE(i.default_model, ti.default_model) AS default_model,
                (c.state = 'suspended' OR mo.id IS NOT NULL OR bk.id IS NOT NULL) AS stopped,
                COALESCE(CASE WHEN mo.state = 'exporting' THEN mo.id END, bk.id) AS export_id,
                COALESCE(CASE WHEN mo.state = 'exporting' THEN mo.archive_key END, bk.archive_key) AS export_key,
                mi.id AS import_id, mi.archive_key AS import_key,
                mi.archive_sha256 AS import_sha256, mi.archive_bytes AS import_bytes
           FROM containers c
           LEFT JOIN instances i ON i.container_id = c.id AND i.status IN ('pending', 'ready', 'suspended', 'deleting')
           LEFT JOIN migrations mo ON mo.source_container = c.id AND mo.state IN ('exporting', 'importing')
           LEFT JOIN migrations mi ON mi.target_container = c.id AND mi.state = 'importing'
           LEFT JOIN instances ti ON ti.id = mi.instance_id
           LEFT JOIN backups bk ON bk.container_id = c.id AND bk.state = 'taking'
          WHERE c.node_id = $1
            AND (c.state IN {RUNNING_STATES} OR c.state = 'suspended'
                 OR (c.state = 'migrating' AND mi.id IS NOT NULL))
          ORDER BY c.created_at"
    ))
    .bind(node_id)
    .fetch_all(&mut *tx)
    .await?;
    let instance_ids: Vec<Uuid> = rows.iter().filter_map(|r| r.instance_id).collect();
    // Behind the metering proxy only the providers' names are needed: no
    // key is opened here.
    let proxied = app.cfg.llm_proxy_url.is_some();
    let secret_rows: Vec<(Uuid, String, Option<Vec<u8>>)> = sqlx::query_as(
        "SELECT instance_id, name, CASE WHEN $2 THEN NULL ELSE ciphertext END
           FROM secrets WHERE instance_id = ANY($1)",
    )
    .bind(&instance_ids)
    .bind(proxied)
    .fetch_all(&mut *tx)
    .await?;
    let deks = if proxied {
        HashMap::new()
    } else {
        envelope::load(&app.secrets, &mut tx, &instance_ids).await?
    };
    tx.commit().await?;

    let mut keys: HashMap<Uuid, HashMap<String, String>> = HashMap::new();
    for (instance_id, name, sealed) in secret_rows {
        let value = match sealed {
            Some(sealed) => {
                let dek = deks.get(&instance_id).ok_or_else(|| {
                    Error::Internal(format!("instance {instance_id} has keys but no data key"))
                })?;
                dek.open_string(&aad::secret(instance_id, &name), &sealed)?
            }
            None => String::new(),
        };
        keys.entry(instance_id).or_default().insert(name, value);
    }
    // The columns are never negative (CHECKs and constants).
    let unsigned = |v: i64| u64::try_from(v).unwrap_or(0);
    let mut containers = Vec::with_capacity(rows.len());
    for r in rows {
        let (export, import) = transfers_of(app, &r).await?;
        let gateway_token = app
            .secrets
            .open_string(&aad::gateway_token(r.id), &r.gateway_token_enc)?;
        let own = r
            .instance_id
            .and_then(|iid| keys.remove(&iid))
            .unwrap_or_default();
        let (provider_keys, providers) = match (&app.cfg.llm_proxy_url, r.instance_id) {
            (Some(url), Some(iid)) => (
                HashMap::new(),
                proxied_providers(app, url, iid, &gateway_token, own.into_keys()),
            ),
            _ => (own, HashMap::new()),
        };
        containers.push(DesiredContainer {
            container_id: r.id.to_string(),
            image: r.image,
            gateway_token,
            resources: Some(Resources {
                cpu_millis: u32::try_from(r.cpu_millis).unwrap_or(0),
                memory_bytes: unsigned(r.memory_bytes),
                pids: u32::try_from(r.pids).unwrap_or(0),
            }),
            tenant: r.instance_id.map(|iid| TenantConfig {
                instance_id: iid.to_string(),
                config_version: unsigned(r.config_version.unwrap_or(1)),
                provider_keys,
                default_model: r.default_model.unwrap_or_default(),
                providers,
            }),
            // A suspended tenant keeps its container and volume.
            stopped: r.stopped,
            export,
            import,
        });
    }
    Ok(DesiredState {
        generation: generation.wire(),
        containers,
    })
}

/// Each provider an instance has a key for, and each the platform resells,
/// as an entry on the metering proxy under the instance's proxy token
/// (derived from the container's gateway token: a new container, a new
/// token; a released instance, none).
fn proxied_providers(
    app: &App,
    proxy_url: &str,
    instance_id: Uuid,
    gateway_token: &str,
    own: impl Iterator<Item = String>,
) -> HashMap<String, ProviderEndpoint> {
    let token = clawdeploy_common::proxy_token::derive(&instance_id.to_string(), gateway_token);
    let base = proxy_url.trim_end_matches('/');
    own.chain(app.cfg.resold_providers.iter().cloned())
        .map(|name| {
            let endpoint = ProviderEndpoint {
                base_url: format!("{base}/p/{name}/v1"),
                api_key: token.clone(),
            };
            (name, endpoint)
        })
        .collect()
}

/// The export and import a container's migration asks of its agent, with
/// fresh presigned URLs.
async fn transfers_of(
    app: &App,
    r: &ContainerRow,
) -> Result<(Option<ArchiveExport>, Option<ArchiveImport>)> {
    let Some(archives) = &app.archives else {
        return Ok((None, None));
    };
    let export = match (r.export_id, &r.export_key) {
        (Some(id), Some(key)) => Some(ArchiveExport {
            archive_id: id.to_string(),
            put_url: archives.upload_url(key).await?,
        }),
        _ => None,
    };
    let import = match (r.import_id, &r.import_key, &r.import_sha256, r.import_bytes) {
        (Some(id), Some(key), Some(sha256), Some(bytes)) => Some(ArchiveImport {
            archive_id: id.to_string(),
            get_url: archives.download_url(key).await?,
            sha256: sha256.clone(),
            bytes: u64::try_from(bytes).unwrap_or(0),
        }),
        _ => None,
    };
    Ok((export, import))
}

/// Marks the node's desired state as changed (after the change committed,
/// so that no transaction holds the node row while it works) and pushes it.
/// Any snapshot that sees the new generation also sees the change.
pub async fn bump_and_push(app: &AppRef, node_id: &str) -> Result<()> {
    // A push that has bumped the generation and not yet read the database
    // carries this change (committed before now) under its new generation:
    // neither another bump (every claim of a burst on the node row) nor
    // another push is needed.
    if app.sessions.push_pending(node_id) {
        return Ok(());
    }
    bump_past_and_push(app, node_id, Generation::default()).await
}

/// Tells `node_id` of a committed change in the background, without
/// holding the caller: one task per node bumps and pushes while changes
/// keep coming, and every change committed while a bump and push are under
/// way rides on the next one. A burst of claims on a node so costs a few
/// pushes, the first of them right after the first claim. A push that
/// fails is retried with backoff for a few minutes (the database may have
/// gone away right after the change committed); after that the
/// unconfirmed-claim sweep takes over.
pub fn announce(app: &AppRef, node_id: &str) {
    if !app.sessions.want_push(node_id) {
        return;
    }
    let (app, node_id) = (app.clone(), node_id.to_owned());
    tokio::spawn(async move {
        while app.sessions.take_push(&node_id) {
            push_until_done(&app, &node_id).await;
        }
    });
}

async fn push_until_done(app: &AppRef, node_id: &str) {
    let mut backoff = clawdeploy_common::backoff::Backoff::new(
        std::time::Duration::from_millis(200),
        std::time::Duration::from_secs(10),
    )
    .jittered();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(300);
    loop {
        match bump_and_push(app, node_id).await {
            Ok(()) => return,
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(node_id, error = %e, "node not told yet; retrying");
                backoff.wait().await;
            }
            Err(e) => {
                tracing::warn!(node_id, error = %e, "node not told of a change; the unconfirmed-claim sweep takes over");
                return;
            }
        }
    }
}

/// Like `bump_and_push`, and also moves the generation past `floor` (what the
/// agent reports having applied): an agent whose ledger is ahead of the
/// database (restored from a backup, say) would otherwise refuse every push.
pub async fn bump_past_and_push(app: &AppRef, node_id: &str, floor: Generation) -> Result<()> {
    sqlx::query("UPDATE nodes SET generation = GREATEST(generation, $2) + 1 WHERE id = $1")
        .bind(node_id)
        .bind(floor)
        .execute(&app.agents_db)
        .await?;
    push_inner(app, node_id, true).await
}

/// How long a push waits for room in a session's outbound queue.
const PUSH_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Sends the node its current desired state if it has an open session here;
/// otherwise tells the other schedulers (one of them may hold the session).
/// A node without any session gets it on its next hello.
pub async fn push(app: &AppRef, node_id: &str) -> Result<()> {
    push_inner(app, node_id, false).await
}

/// `push`; `bumped`: the caller has just bumped the node's generation.
async fn push_inner(app: &AppRef, node_id: &str, bumped: bool) -> Result<()> {
    let Some(tx) = app.sessions.sender(node_id) else {
        tracing::debug!(node_id, "no open session here; announcing the change");
        events::publish(app, &[Event::Node(node_id.to_owned())]).await;
        return Ok(());
    };
    // A burst of claims on one node becomes a few pushes, not one each:
    // a push still waiting for a connection covers the changes committed
    // meanwhile, since its snapshot comes after them.
    // (A push that fails or is cancelled before its snapshot leaves the
    // changes it covered to the next heartbeat, which pushes again.)
    let Some(ticket) = app.sessions.begin_push(node_id, bumped) else {
        return Ok(());
    };
    let desired = load(app, node_id, || ticket.reading()).await?;
    drop(ticket);
    let generation = desired.generation;
    let msg = SchedulerMessage {
        msg: Some(scheduler_message::Msg::Desired(desired)),
    };
    // A session whose agent does not read (stopped, or its link silent)
    // must not hold the caller (the pool manager serves every node): the
    // generation is already bumped, so the next heartbeat pushes again.
    match tokio::time::timeout(PUSH_WAIT, tx.send(Outgoing::Message(msg))).await {
        Ok(Ok(())) => {
            app.sessions.record_sent(node_id, generation);
            metrics::counter!("clawdeploy_desired_pushes_total").increment(1);
            tracing::debug!(node_id, generation, "desired state pushed")
        }
        Ok(Err(_)) => tracing::debug!(node_id, "session closed before the push"),
        Err(_) => tracing::warn!(
            node_id,
            generation,
            "agent not reading; the push is left to its next heartbeat"
        ),
    }
    Ok(())
}
