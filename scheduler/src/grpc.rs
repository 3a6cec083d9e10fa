//! The scheduler's gRPC face over mTLS: the agent session (desired state
//! down, heartbeats and reports up) and the edge route watch. Callers are
//! identified by their client certificate only.

use std::collections::HashMap;
use std::pin::Pin;

use clawdeploy_proto::agent_session_server::AgentSession;
use clawdeploy_proto::route_watch_server::RouteWatch;
use clawdeploy_proto::{
    agent_message, route_event, AckRoutesRequest, AckRoutesResponse, AgentMessage, ContainerPhase,
    ContainerStatus, Heartbeat, Hello, RouteEvent, SchedulerMessage, WatchRoutesRequest,
};
use futures::Stream;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use uuid::Uuid;

use crate::app::AppRef;
use crate::error::{Error, Result};
use crate::pki::Identity;
use crate::{assign, desired};

/// The identity named by the caller's verified client certificate. The TLS
/// layer lets callers without a certificate through (they may only `Join`),
/// so every other RPC starts here.
pub(crate) fn caller<T>(req: &Request<T>) -> Result<Identity, Status> {
    let certs = req
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    Identity::from_cert_der(leaf)
        .ok_or_else(|| Status::permission_denied("certificate names no clawdeploy identity"))
}

/// The longest a destroyed container stays `destroying` in the database
/// when the agent's reported set does not change.
const SWEEP_AT_LEAST_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

pub struct AgentService {
    pub app: AppRef,
}

#[tonic::async_trait]
impl AgentSession for AgentService {
    type SessionStream = ReceiverStream<Result<SchedulerMessage, Status>>;

    async fn session(
        &self,
        req: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let Identity::Node(node_id) = caller(&req)? else {
            return Err(Status::permission_denied(
                "only node certificates may open an agent session",
            ));
        };
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(32);
        let app = self.app.clone();
        tokio::spawn(async move {
            tracing::info!(node_id, "agent session opened");
            let mut session = AgentSessionState {
                app: app.clone(),
                node_id: node_id.clone(),
                seen: HashMap::new(),
                tx: tx.clone(),
                session_id: None,
                swept: None,
            };
            let end = loop {
                match inbound.message().await {
                    Ok(Some(msg)) => {
                        if let Err(e) = session.handle(msg).await {
                            let fatal = matches!(e, Error::Forbidden(_));
                            let status: Status = e.into();
                            if fatal {
                                let _ = tx.send(Err(status.clone())).await;
                                // Keep the request side open until the agent,
                                // having read the status, closes it: dropping
                                // it now can reset the stream before the
                                // status is flushed, and the agent would see
                                // a clean close instead of the reason.
                                let drain =
                                    async { while let Ok(Some(_)) = inbound.message().await {} };
                                let _ =
                                    tokio::time::timeout(std::time::Duration::from_secs(5), drain)
                                        .await;
                                break format!("refused: {}", status.message());
                            }
                            tracing::warn!(node_id, error = %status.message(), "agent message not applied");
                        }
                    }
                    Ok(None) => break "closed by agent".to_owned(),
                    Err(e) => break format!("stream error: {e}"),
                }
            };
            if let Some(id) = session.session_id {
                app.sessions.unregister(&node_id, id);
            }
            metrics::gauge!("clawdeploy_agent_sessions").set(app.sessions.connected() as f64);
            tracing::info!(node_id, reason = %end, "agent session ended");
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// What one session has already applied, so heartbeats only cost database
/// work when something changed.
struct AgentSessionState {
    app: AppRef,
    node_id: String,
    seen: HashMap<String, (i32, u64, String)>,
    /// The containers the last destroyed-sweep saw reported, and when.
    swept: Option<(Vec<Uuid>, std::time::Instant)>,
    tx: crate::sessions::Outbound,
    /// Set once a valid hello registered this session as the node's; until
    /// then the stream cannot receive desired state nor report.
    session_id: Option<u64>,
}

impl AgentSessionState {
    async fn handle(&mut self, msg: AgentMessage) -> Result<()> {
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
        let state: String = sqlx::query_scalar(
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
        .bind(cap.cpu_millis as i32)
        .bind(cap.memory_bytes as i64)
        .bind(cap.max_containers.max(1) as i32)
        .fetch_one(&self.app.db)
        .await?;
        if state == "removed" {
            return Err(Error::Forbidden(format!(
                "node {} has been removed",
                self.node_id
            )));
        }
        crate::audit(&self.app.db, &format!("node:{}", self.node_id), "node.hello", &self.node_id, serde_json::json!({"agentVersion": hello.agent_version, "appliedGeneration": hello.applied_generation})).await;
        if self.session_id.is_none() {
            self.session_id = Some(self.app.sessions.register(&self.node_id, self.tx.clone()));
            metrics::gauge!("clawdeploy_agent_sessions").set(self.app.sessions.connected() as f64);
        }
        self.seen.clear();
        self.swept = None;
        desired::bump_past_and_push(&self.app, &self.node_id, hello.applied_generation).await?;
        self.app.pool_wake.notify_one();
        Ok(())
    }

    async fn heartbeat(&mut self, hb: Heartbeat) -> Result<()> {
        let usage = hb.usage.unwrap_or_default();
        let (generation, state): (i64, String) = sqlx::query_as(
            "UPDATE nodes SET last_heartbeat = now(), state = CASE WHEN state = 'unreachable' THEN 'active' ELSE state END,
                    cpu_busy_permille = $2, memory_available_bytes = $3, disk_available_bytes = $4,
                    disk_total_bytes = $5, containers_running = $6
              WHERE id = $1 RETURNING generation, state",
        )
        .bind(&self.node_id)
        .bind(usage.cpu_busy_permille.min(1000) as i32)
        .bind(usage.memory_available_bytes.min(i64::MAX as u64) as i64)
        .bind(usage.disk_available_bytes.min(i64::MAX as u64) as i64)
        .bind(usage.disk_total_bytes.min(i64::MAX as u64) as i64)
        .bind(usage.containers_running as i32)
        .fetch_one(&self.app.db)
        .await?;
        if state == "removed" {
            return Err(Error::Forbidden(format!(
                "node {} has been removed",
                self.node_id
            )));
        }
        // Reports touch different rows, so they are applied concurrently:
        // a burst of claims on one node completes in parallel.
        let changed: Vec<&ContainerStatus> = hb
            .containers
            .iter()
            .filter(|s| {
                self.seen.get(&s.container_id)
                    != Some(&(s.phase, s.config_version, s.upstream.clone()))
            })
            .collect();
        let mut results: Vec<(&ContainerStatus, Result<bool>)> = Vec::with_capacity(changed.len());
        for chunk in changed.chunks(16) {
            let done = futures::future::join_all(chunk.iter().map(|s| self.observe(s))).await;
            results.extend(chunk.iter().copied().zip(done));
        }
        let mut changed_node = false;
        for (status, result) in results {
            match result {
                Ok(bumped) => {
                    changed_node |= bumped;
                    self.seen.insert(
                        status.container_id.clone(),
                        (status.phase, status.config_version, status.upstream.clone()),
                    );
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
                .execute(&self.app.db)
                .await?;
            self.swept = Some((reported, std::time::Instant::now()));
        }
        if changed_node || hb.applied_generation > generation as u64 {
            // A ledger ahead of the database (restored from a backup) is
            // overtaken, or the agent would refuse every push.
            desired::bump_past_and_push(&self.app, &self.node_id, hb.applied_generation).await?;
        } else if hb.applied_generation < generation as u64 {
            // The agent missed a push (or a push raced a bump): resend.
            desired::push(&self.app, &self.node_id).await?;
        }
        Ok(())
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
        let new_state: Option<String> = match phase {
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
                        docker_id = $3, upstream = $4, updated_at = now()
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
        .fetch_optional(&self.app.db)
        .await?;
        let Some(state) = new_state else {
            return Err(Error::NotFound("container on this node"));
        };
        let mut bumped = false;
        match state.as_str() {
            "idle" => self.app.pool_wake.notify_one(),
            "destroying" => {
                tracing::warn!(node_id = self.node_id, container_id = %id, message = s.message, "pool container failed; replacing it");
                self.app.pool_wake.notify_one();
                bumped = true;
            }
            _ => {}
        }
        if phase == ContainerPhase::Healthy && !s.upstream.is_empty() {
            crate::routes::repoint(&self.app, id, &s.upstream).await?;
        }
        if s.config_version > 0 {
            assign::complete(&self.app, &self.node_id, id, s.config_version).await?;
        }
        Ok(bumped)
    }
}

pub struct RouteService {
    pub app: AppRef,
}

type RouteStream = Pin<Box<dyn Stream<Item = Result<RouteEvent, Status>> + Send>>;

#[tonic::async_trait]
impl RouteWatch for RouteService {
    type WatchRoutesStream = RouteStream;

    async fn watch_routes(
        &self,
        req: Request<WatchRoutesRequest>,
    ) -> Result<Response<RouteStream>, Status> {
        let Identity::Edge(edge_id) = caller(&req)? else {
            return Err(Status::permission_denied(
                "only edge certificates may watch routes",
            ));
        };
        // Subscribe before reading the snapshot so no committed change is missed;
        // the edge orders by version, so a delta it already has is harmless.
        let mut deltas = self.app.route_events.subscribe();
        let snapshot = crate::routes::snapshot(&self.app).await?;
        tracing::info!(
            edge_id,
            routes = snapshot.routes.len(),
            version = snapshot.version,
            "edge watching routes"
        );
        let (tx, rx) = mpsc::channel(256);
        let app = self.app.clone();
        let watch_id = app.edge_acks.register(&edge_id);
        tokio::spawn(async move {
            let snapshot = RouteEvent {
                event: Some(route_event::Event::Snapshot(snapshot)),
            };
            if tx.send(Ok(snapshot)).await.is_ok() {
                loop {
                    let delta = tokio::select! {
                        d = deltas.recv() => d,
                        // The edge went away: stop counting it at once.
                        _ = tx.closed() => break,
                    };
                    match delta {
                        Ok(d) => {
                            let event = RouteEvent {
                                event: Some(route_event::Event::Delta(d)),
                            };
                            if tx.send(Ok(event)).await.is_err() {
                                break;
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            // The edge reconnects and gets a fresh snapshot.
                            let msg = format!("edge fell {n} route changes behind; resubscribe");
                            let _ = tx.send(Err(Status::data_loss(msg))).await;
                            break;
                        }
                        Err(broadcast::error::RecvError::Closed) => break,
                    }
                }
            }
            app.edge_acks.unregister(watch_id);
            tracing::info!(edge_id, "edge route watch ended");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn ack_routes(
        &self,
        req: Request<AckRoutesRequest>,
    ) -> Result<Response<AckRoutesResponse>, Status> {
        let Identity::Edge(edge_id) = caller(&req)? else {
            return Err(Status::permission_denied(
                "only edge certificates may acknowledge routes",
            ));
        };
        self.app.edge_acks.ack(&edge_id, req.into_inner().version);
        Ok(Response::new(AckRoutesResponse {}))
    }
}
