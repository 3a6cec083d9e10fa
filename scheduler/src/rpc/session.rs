//! One agent's session, as the scheduler keeps it: the hello that registers
//! the node, heartbeats with usage and container reports, and what they
//! change (containers warm or fail, claims complete, routes follow moved
//! containers, destroyed containers are swept). No tonic types: the gRPC
//! stream around it is `rpc::agent`.

use std::collections::{HashMap, HashSet};

use clawdeploy_proto::{
    agent_message, AgentMessage, ContainerPhase, ContainerStatus, Heartbeat, Hello,
};
use uuid::Uuid;

use crate::agents::desired;
use crate::app::sessions::Outbound;
use crate::app::AppRef;
use crate::audit::audit;
use crate::backup;
use crate::error::{Error, Result};
use crate::lifecycle::complete;
use crate::migration;
use crate::model::{ContainerState, Generation, NodeState};
use crate::routes;

/// The longest a destroyed container stays `destroying` in the database
/// when the agent's reported set does not change.
const SWEEP_AT_LEAST_EVERY: std::time::Duration = std::time::Duration::from_secs(30);
/// An agent behind its node's generation gets it again only when that
/// generation did not go out this recently.
const RESEND_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

/// A reported figure as the `integer` column holds it.
fn clamp_i32(v: u64) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

/// A reported figure as the `bigint` column holds it.
fn clamp_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A healthy container with an address and no export to record: what
/// `observe_healthy` applies in bulk.
fn is_plain_healthy(s: &ContainerStatus) -> bool {
    s.phase == ContainerPhase::Healthy as i32 && !s.upstream.is_empty() && s.export.is_none()
}

/// What a container report said, as far as the scheduler acts on it.
#[derive(Clone, PartialEq, Eq)]
struct Seen {
    phase: i32,
    config_version: u64,
    upstream: String,
    /// The archive id of the last export reported.
    export: Option<String>,
}

impl From<&ContainerStatus> for Seen {
    fn from(s: &ContainerStatus) -> Self {
        Seen {
            phase: s.phase,
            config_version: s.config_version,
            upstream: s.upstream.clone(),
            export: s.export.as_ref().map(|e| e.archive_id.clone()),
        }
    }
}

/// What one session has already applied, so heartbeats only cost database
/// work when something changed.
pub struct AgentSession {
    app: AppRef,
    node_id: String,
    seen: HashMap<String, Seen>,
    /// The containers the last destroyed-sweep saw reported, and when.
    swept: Option<(Vec<Uuid>, std::time::Instant)>,
    tx: Outbound,
    /// Set once a valid hello registered this session as the node's; until
    /// then the stream cannot receive desired state nor report.
    session_id: Option<u64>,
}

impl AgentSession {
    /// A session for the node the caller's certificate names; `tx` reaches
    /// the agent.
    pub fn new(app: AppRef, node_id: String, tx: Outbound) -> Self {
        AgentSession {
            app,
            node_id,
            seen: HashMap::new(),
            swept: None,
            tx,
            session_id: None,
        }
    }

    /// The session ends: it stops being the node's way in (if a newer one
    /// has not replaced it already).
    pub fn end(&self) {
        if let Some(id) = self.session_id {
            self.app.sessions.unregister(&self.node_id, id);
        }
        metrics::gauge!("clawdeploy_agent_sessions").set(self.app.sessions.connected() as f64);
    }

    /// Applies one message from the agent. `Error::Forbidden` ends the
    /// session; any other error is logged and the session goes on.
    pub async fn handle(&mut self, msg: AgentMessage) -> Result<()> {
        match msg.msg {
            Some(agent_message::Msg::Hello(hello)) => self.hello(hello).await,
            Some(agent_message::Msg::Heartbeat(_)) if self.session_id.is_none() => Err(
                Error::Forbidden("an agent session starts with a hello".into()),
            ),
            Some(agent_message::Msg::Heartbeat(hb)) => self.heartbeat(hb).await,
            None => Err(Error::BadRequest("empty agent message".into())),
        }
    }

    async fn hello(&mut self, hello: Hello) -> Result<()> {
        // The certificate decides who this is; a hello claiming otherwise is
        // a misconfigured (or hostile) agent.
        if !hello.node_id.is_empty() && hello.node_id != self.node_id {
            return Err(Error::Forbidden(format!(
                "hello names node {:?} but the certificate is for node {:?}",
                hello.node_id, self.node_id
            )));
        }
        let cap = hello.capacity.unwrap_or_default();
        let state: NodeState = sqlx::query_scalar(
            "INSERT INTO nodes (id, name, private_address, cpu_millis, memory_bytes, max_containers, state, last_heartbeat)
             VALUES ($1, $1, $2, $3, $4, $5, 'active', now())
             ON CONFLICT (id) DO UPDATE
                SET private_address = EXCLUDED.private_address, cpu_millis = EXCLUDED.cpu_millis,
                    memory_bytes = EXCLUDED.memory_bytes, max_containers = EXCLUDED.max_containers,
                    last_heartbeat = now(),
                    state = CASE WHEN nodes.state = 'unreachable' THEN 'active' ELSE nodes.state END
             RETURNING state",
        )
        .bind(&self.node_id)
        .bind(&hello.private_address)
        .bind(clamp_i32(cap.cpu_millis.into()))
        .bind(clamp_i64(cap.memory_bytes))
        .bind(clamp_i32(cap.max_containers.max(1).into()))
        .fetch_one(&self.app.agents_db)
        .await?;
        self.refuse_if_removed(state)?;
        // A node (back) with room may take queued signups.
        self.app.tasks.signup_queue.activate();
        audit(&self.app.agents_db, &format!("node:{}", self.node_id), "node.hello", &self.node_id, serde_json::json!({"agentVersion": hello.agent_version, "appliedGeneration": hello.applied_generation})).await;
        if self.session_id.is_none() {
            self.session_id = Some(self.app.sessions.register(&self.node_id, self.tx.clone()));
            metrics::gauge!("clawdeploy_agent_sessions").set(self.app.sessions.connected() as f64);
        }
        self.seen.clear();
        self.swept = None;
        desired::bump_past_and_push(
            &self.app,
            &self.node_id,
            Generation::from_wire(hello.applied_generation),
        )
        .await?;
        self.app.tasks.pool_manager.activate();
        Ok(())
    }

    /// A removed node's session ends at its next message.
    fn refuse_if_removed(&self, state: NodeState) -> Result<()> {
        if state == NodeState::Removed {
            return Err(Error::Forbidden(format!(
                "node {} has been removed",
                self.node_id
            )));
        }
        Ok(())
    }

    async fn heartbeat(&mut self, hb: Heartbeat) -> Result<()> {
        let usage = hb.usage.unwrap_or_default();
        let (generation, state): (Generation, NodeState) = sqlx::query_as(
            "UPDATE nodes SET last_heartbeat = now(), state = CASE WHEN state = 'unreachable' THEN 'active' ELSE state END,
                    cpu_busy_permille = $2, memory_available_bytes = $3, disk_available_bytes = $4,
                    disk_total_bytes = $5, containers_running = $6
              WHERE id = $1 RETURNING generation, state",
        )
        .bind(&self.node_id)
        .bind(clamp_i32(usage.cpu_busy_permille.min(1000).into()))
        .bind(clamp_i64(usage.memory_available_bytes))
        .bind(clamp_i64(usage.disk_available_bytes))
        .bind(clamp_i64(usage.disk_total_bytes))
        .bind(clamp_i32(usage.containers_running.into()))
        .fetch_one(&self.app.agents_db)
        .await?;
        self.refuse_if_removed(state)?;
        let changed: Vec<&ContainerStatus> = hb
            .containers
            .iter()
            .filter(|s| self.seen.get(&s.container_id) != Some(&Seen::from(*s)))
            .collect();
        // Healthy containers (pool containers warm, claims confirmed: nearly
        // every report of a burst) are applied together, a few statements
        // for the whole report; the others one by one, concurrently (they
        // touch different rows).
        let (healthy, others): (Vec<&ContainerStatus>, Vec<&ContainerStatus>) =
            changed.into_iter().partition(|s| is_plain_healthy(s));
        let mut results: Vec<(&ContainerStatus, Result<bool>)> =
            Vec::with_capacity(healthy.len() + others.len());
        match self.observe_healthy(&healthy).await {
            Ok((missing, bumped)) => results.extend(healthy.iter().map(|s| {
                let r = if missing.contains(&s.container_id) {
                    Err(Error::NotFound("container on this node"))
                } else {
                    Ok(bumped)
                };
                (*s, r)
            })),
            Err(e) => {
                tracing::warn!(node_id = self.node_id, containers = healthy.len(), error = %e, "healthy reports not applied");
            }
        }
        for chunk in others.chunks(16) {
            let done = futures::future::join_all(chunk.iter().map(|s| self.observe(s))).await;
            results.extend(chunk.iter().copied().zip(done));
        }
        let mut changed_node = false;
        for (status, result) in results {
            match result {
                Ok(bumped) => {
                    changed_node |= bumped;
                    self.seen
                        .insert(status.container_id.clone(), Seen::from(status));
                }
                Err(e) => {
                    tracing::warn!(node_id = self.node_id, container_id = status.container_id, error = %e, "container report not applied")
                }
            }
        }
        // Containers being destroyed are gone once the agent stops reporting
        // them. Swept when the reported set changes (a removal shows there)
        // and at least every 30 s (one marked destroying that never existed),
        // not on every heartbeat: at a thousand nodes that is 500 statements
        // a second for nothing.
        let mut reported: Vec<Uuid> = hb
            .containers
            .iter()
            .filter_map(|c| c.container_id.parse().ok())
            .collect();
        reported.sort_unstable();
        let due = match &self.swept {
            Some((ids, at)) => *ids != reported || at.elapsed() > SWEEP_AT_LEAST_EVERY,
            None => true,
        };
        if due || changed_node {
            sqlx::query("UPDATE containers SET state = 'destroyed', updated_at = now() WHERE node_id = $1 AND state = 'destroying' AND id <> ALL($2)")
                .bind(&self.node_id)
                .bind(&reported)
                .execute(&self.app.agents_db)
                .await?;
            self.swept = Some((reported, std::time::Instant::now()));
        }
        let applied = Generation::from_wire(hb.applied_generation);
        if changed_node || applied > generation {
            // A ledger ahead of the database (restored from a backup) is
            // overtaken, or the agent would refuse every push.
            desired::bump_past_and_push(&self.app, &self.node_id, applied).await?;
        } else if applied < generation
            && !self
                .app
                .sessions
                .sent_recently(&self.node_id, generation.wire(), RESEND_AFTER)
        {
            // The agent missed a push (or a push raced a bump): resend. Not
            // when that generation went out moments ago: during a burst the
            // agent reports while the newest push is on its way, and a
            // resend would read and send the node's whole state again.
            desired::push(&self.app, &self.node_id).await?;
        }
        Ok(())
    }

    /// `observe` for every report of a healthy container with no export
    /// (`is_plain_healthy`), together: one statement records them all,
    /// routes follow the containers whose address changed, and the claims
    /// they confirm complete in one more. Returns the ids of reported
    /// containers this node does not have, and whether the node's desired
    /// state changed (a container it should destroy still runs).
    async fn observe_healthy(
        &self,
        reports: &[&ContainerStatus],
    ) -> Result<(HashSet<String>, bool)> {
        if reports.is_empty() {
            return Ok((HashSet::new(), false));
        }
        let mut bumped = false;
        let mut ids = Vec::with_capacity(reports.len());
        let mut missing = HashSet::new();
        let mut valid = Vec::with_capacity(reports.len());
        for s in reports {
            match s.container_id.parse::<Uuid>() {
                Ok(id) => {
                    ids.push(id);
                    valid.push(*s);
                }
                Err(_) => {
                    missing.insert(s.container_id.clone());
                }
            }
        }
        let docker_ids: Vec<&str> = valid.iter().map(|s| s.docker_id.as_str()).collect();
        let upstreams: Vec<&str> = valid.iter().map(|s| s.upstream.as_str()).collect();
        let applied: Vec<i64> = valid.iter().map(|s| clamp_i64(s.config_version)).collect();
        // `observe`'s healthy update and `complete`'s applied version, in
        // one statement for the whole report.
        let states: Vec<(Uuid, ContainerState)> = sqlx::query_as(
            "UPDATE containers c SET state = CASE WHEN c.state IN ('creating', 'warming') THEN 'idle' ELSE c.state END,
                    warm_at = COALESCE(c.warm_at, now()), docker_id = r.docker_id, upstream = r.upstream,
                    message = '', applied_config = GREATEST(c.applied_config, r.applied), updated_at = now()
               FROM unnest($2::uuid[], $3::text[], $4::text[], $5::bigint[]) AS r(id, docker_id, upstream, applied)
              WHERE c.id = r.id AND c.node_id = $1
              RETURNING c.id, c.state",
        )
        .bind(&self.node_id)
        .bind(&ids)
        .bind(&docker_ids)
        .bind(&upstreams)
        .bind(&applied)
        .fetch_all(&self.app.agents_db)
        .await?;
        let found: HashMap<Uuid, ContainerState> = states.into_iter().collect();
        let mut moved = Vec::new();
        let mut confirmed = Vec::new();
        for (id, s) in ids.iter().zip(&valid) {
            let Some(state) = found.get(id) else {
                missing.insert(s.container_id.clone());
                continue;
            };
            match state {
                ContainerState::Idle => self.app.tasks.pool_manager.activate(),
                ContainerState::Migrating => self.app.tasks.migrations.activate(),
                // As in `observe`: the node is told again.
                ContainerState::Destroying => {
                    self.app.tasks.pool_manager.activate();
                    bumped = true;
                }
                _ => {}
            }
            // Routes follow a container to a new address. A report whose
            // address this session already applied to a healthy container
            // has nothing to move; one that was stopped had its routes
            // emptied (`observe`) and gets them back even at the old address.
            let applied = self.seen.get(&s.container_id).is_some_and(|seen| {
                seen.phase == ContainerPhase::Healthy as i32 && seen.upstream == s.upstream
            });
            if !applied {
                moved.push((*id, s.upstream.as_str()));
            }
            if s.config_version > 0 {
                confirmed.push((*id, s.config_version));
            }
        }
        routes::repoint_many(&self.app, &moved).await?;
        complete::complete_many(&self.app, &self.node_id, &confirmed).await?;
        Ok((missing, bumped))
    }

    /// Applies one container's observed state. Returns whether the node's
    /// desired state changed (a failed pool container was dropped).
    async fn observe(&self, s: &ContainerStatus) -> Result<bool> {
        let id: Uuid = s
            .container_id
            .parse()
            .map_err(|_| Error::BadRequest("container id is not a uuid".into()))?;
        let phase = ContainerPhase::try_from(s.phase).unwrap_or(ContainerPhase::Unspecified);
        // `node_id = $2` everywhere: an agent only ever speaks for its own node.
        let new_state: Option<ContainerState> = match phase {
            ContainerPhase::Healthy => sqlx::query_scalar(
                "UPDATE containers SET state = CASE WHEN state IN ('creating', 'warming') THEN 'idle' ELSE state END,
                        warm_at = COALESCE(warm_at, now()),
                        docker_id = $3, upstream = $4, message = '', updated_at = now()
                  WHERE id = $1 AND node_id = $2 RETURNING state",
            ),
            ContainerPhase::Creating | ContainerPhase::Starting => sqlx::query_scalar(
                "UPDATE containers SET state = CASE WHEN state = 'creating' THEN 'warming' ELSE state END,
                        docker_id = $3, upstream = $4, updated_at = now()
                  WHERE id = $1 AND node_id = $2 RETURNING state",
            ),
            ContainerPhase::Failed | ContainerPhase::Unhealthy => sqlx::query_scalar(
                "UPDATE containers SET state = CASE WHEN state IN ('creating', 'warming', 'idle') THEN 'destroying' ELSE state END,
                        docker_id = $3, upstream = $4, message = $5, updated_at = now()
                  WHERE id = $1 AND node_id = $2 RETURNING state",
            ),
            ContainerPhase::Stopped => sqlx::query_scalar(
                "UPDATE containers SET docker_id = $3, upstream = $4, updated_at = now()
                  WHERE id = $1 AND node_id = $2 RETURNING state",
            ),
            ContainerPhase::Unspecified => return Ok(false),
        }
        .bind(id)
        .bind(&self.node_id)
        .bind(&s.docker_id)
        .bind(&s.upstream)
        .bind(&s.message)
        .fetch_optional(&self.app.agents_db)
        .await?;
        let Some(state) = new_state else {
            return Err(Error::NotFound("container on this node"));
        };
        let mut bumped = false;
        match state {
            ContainerState::Idle => self.app.tasks.pool_manager.activate(),
            ContainerState::Migrating => self.app.tasks.migrations.activate(),
            ContainerState::Destroying => {
                tracing::warn!(node_id = self.node_id, container_id = %id, message = s.message, "pool container failed; replacing it");
                self.app.tasks.pool_manager.activate();
                bumped = true;
            }
            _ => {}
        }
        if phase == ContainerPhase::Healthy && !s.upstream.is_empty() {
            routes::repoint(&self.app, id, &s.upstream).await?;
        }
        // A stopped container's address goes back to Docker and may soon
        // belong to another tenant: its routes keep no address (the edge
        // answers at once instead of dialling it) until it runs again.
        if phase == ContainerPhase::Stopped {
            routes::repoint(&self.app, id, "").await?;
        }
        if s.config_version > 0 {
            complete::complete(&self.app, &self.node_id, id, s.config_version).await?;
            if state == ContainerState::Migrating {
                self.app.tasks.migrations.activate();
            }
        }
        if let Some(e) = &s.export {
            let report = crate::archives::ExportReport {
                archive_id: e.archive_id.clone(),
                sha256: e.sha256.clone(),
                bytes: e.bytes,
                error: e.error.clone(),
            };
            // The archive id names a migration or a backup; each ignores
            // the other's.
            migration::record_export(&self.app, &self.node_id, id, &report).await?;
            backup::record_export(&self.app, &self.node_id, id, &report).await?;
        }
        Ok(bumped)
    }
}
