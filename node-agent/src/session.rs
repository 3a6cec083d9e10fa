//! The agent's one session with the scheduler: dial over mTLS, say hello,
//! then heartbeat (every interval and at once on any container change) while
//! receiving full desired states. Reconnects with capped, jittered backoff;
//! reconciling goes on from the ledger while disconnected.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use clawdeploy_proto::agent_session_client::AgentSessionClient;
use clawdeploy_proto::client::SchedulerEndpoint;
use clawdeploy_proto::{
    agent_message, scheduler_message, AgentMessage, DesiredState, Heartbeat, Hello, NodeCapacity,
    NodeUsage,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::error::{Error, Result};
use crate::ledger::{Accepted, Ledger};
use crate::reconcile::StatusBoard;

#[derive(Clone, Debug)]
pub struct SessionConfig {
    pub node_id: String,
    pub scheduler: SchedulerEndpoint,
    pub capacity: NodeCapacity,
    pub private_address: String,
    pub heartbeat_every: Duration,
}

pub struct Session {
    pub cfg: SessionConfig,
    pub ledger: Arc<Mutex<Ledger>>,
    pub desired: watch::Sender<DesiredState>,
    pub board: Arc<StatusBoard>,
}

fn jitter(max: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    max.mul_f64(f64::from(nanos % 1000) / 1000.0)
}

impl Session {
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let started = tokio::time::Instant::now();
            tokio::select! {
                r = self.once() => match r {
                    Ok(()) => tracing::info!("scheduler closed the session"),
                    Err(e) => tracing::warn!(error = %e, "scheduler session failed"),
                },
                _ = shutdown.changed() => return,
            }
            metrics::gauge!("clawdeploy_agent_connected").set(0.0);
            if started.elapsed() > Duration::from_secs(30) {
                backoff = Duration::from_millis(100);
            }
            let wait = backoff + jitter(backoff / 2);
            backoff = (backoff * 2).min(Duration::from_secs(5));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    fn heartbeat(&self) -> AgentMessage {
        let containers = self.board.snapshot();
        let applied_generation = self.ledger.lock().unwrap().current().generation;
        let usage = NodeUsage {
            containers: containers.len() as u32,
            ..Default::default()
        };
        AgentMessage {
            msg: Some(agent_message::Msg::Heartbeat(Heartbeat {
                applied_generation,
                containers,
                usage: Some(usage),
            })),
        }
    }

    async fn once(&self) -> Result<()> {
        let channel = self
            .cfg
            .scheduler
            .connect()
            .await
            .map_err(|e| Error::Tls(e.to_string()))?;
        let mut client = AgentSessionClient::new(channel);
        let (tx, rx) = mpsc::channel(16);
        let hello = Hello {
            node_id: self.cfg.node_id.clone(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            capacity: Some(self.cfg.capacity),
            applied_generation: self.ledger.lock().unwrap().current().generation,
            private_address: self.cfg.private_address.clone(),
        };
        let _ = tx
            .send(AgentMessage {
                msg: Some(agent_message::Msg::Hello(hello)),
            })
            .await;
        // The first heartbeat goes right after the hello so the scheduler
        // learns what runs here at once.
        let _ = tx.send(self.heartbeat()).await;
        let mut inbound = client.session(ReceiverStream::new(rx)).await?.into_inner();
        tracing::info!(scheduler = self.cfg.scheduler.url, "session open");
        metrics::gauge!("clawdeploy_agent_connected").set(1.0);
        let mut tick = tokio::time::interval(self.cfg.heartbeat_every);
        loop {
            tokio::select! {
                msg = inbound.message() => {
                    let Some(msg) = msg? else { return Ok(()) };
                    if let Some(scheduler_message::Msg::Desired(state)) = msg.msg {
                        self.accept(state)?;
                    }
                }
                _ = self.board.changed.notified() => {
                    if tx.send(self.heartbeat()).await.is_err() { return Ok(()) }
                }
                _ = tick.tick() => {
                    metrics::counter!("clawdeploy_agent_heartbeats_total").increment(1);
                    if tx.send(self.heartbeat()).await.is_err() { return Ok(()) }
                }
            }
        }
    }

    fn accept(&self, state: DesiredState) -> Result<()> {
        let generation = state.generation;
        let accepted = self.ledger.lock().unwrap().accept(state.clone())?;
        match accepted {
            Accepted::Newer => {
                tracing::debug!(
                    generation,
                    containers = state.containers.len(),
                    "new desired state"
                );
                metrics::gauge!("clawdeploy_agent_desired_generation").set(generation as f64);
                self.desired.send_replace(state);
            }
            Accepted::Same => {}
            Accepted::Stale { have } => {
                metrics::counter!("clawdeploy_agent_stale_generations_total").increment(1);
                tracing::warn!(generation, have, "ignoring stale desired state");
            }
        }
        Ok(())
    }
}
