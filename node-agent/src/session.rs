//! The agent's one session with the scheduler: dial over mTLS, say hello,
//! then heartbeat (every interval and at once on any container change) while
//! receiving full desired states. Reconnects with capped, jittered backoff;
//! reconciling goes on from the ledger while disconnected.

use clawdeploy_common::Backoff;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clawdeploy_proto::agent_session_client::AgentSessionClient;
use clawdeploy_proto::client::SchedulerEndpoint;
use clawdeploy_proto::{
    agent_message, scheduler_message, AgentMessage, ContainerPhase, DesiredState, Heartbeat, Hello,
    NodeCapacity, NodeUsage,
};
use futures::FutureExt;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::enroll::TlsFiles;
use crate::error::{Error, Result};
use crate::host::HostSampler;
use crate::ledger::{Accepted, Ledger};
use crate::reconcile::StatusBoard;

#[derive(Clone, Debug)]
pub struct SessionConfig {
    pub node_id: String,
    pub scheduler: SchedulerEndpoint,
    pub capacity: NodeCapacity,
    pub private_address: String,
    pub heartbeat_every: Duration,
    /// The node's certificate files, renewed in place.
    pub tls: TlsFiles,
}

pub struct Session {
    pub cfg: SessionConfig,
    pub host: HostSampler,
    pub ledger: Arc<Mutex<Ledger>>,
    pub desired: watch::Sender<DesiredState>,
    pub board: Arc<StatusBoard>,
    /// When to renew next, on the monotonic clock, once a certificate was
    /// received in this process (see `renewal_after_receipt`).
    pub next_renewal: Mutex<Option<tokio::time::Instant>>,
}

impl Session {
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff =
            Backoff::new(Duration::from_millis(100), Duration::from_secs(5)).jittered();
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
                backoff.reset();
            }
            tokio::select! {
                _ = backoff.wait() => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    async fn heartbeat(&self) -> AgentMessage {
        let containers = self.board.snapshot();
        let applied_generation = self.ledger.lock().unwrap().current().generation;
        // Sampled at most about once per interval (the periodic beats);
        // beats sent at once on a change reuse the last sample.
        let host = self.host.recent(self.cfg.heartbeat_every / 2).await;
        metrics::gauge!("clawdeploy_agent_host_cpu_busy_ratio")
            .set(f64::from(host.cpu_busy_permille) / 1000.0);
        metrics::gauge!("clawdeploy_agent_host_memory_available_bytes")
            .set(host.memory_available_bytes as f64);
        metrics::gauge!("clawdeploy_agent_host_disk_available_bytes")
            .set(host.disk_available_bytes as f64);
        let usage = NodeUsage {
            containers: containers.len() as u32,
            containers_running: containers
                .iter()
                .filter(|c| {
                    c.phase == ContainerPhase::Healthy as i32
                        || c.phase == ContainerPhase::Unhealthy as i32
                        || c.phase == ContainerPhase::Starting as i32
                })
                .count() as u32,
            cpu_busy_permille: host.cpu_busy_permille,
            memory_available_bytes: host.memory_available_bytes,
            disk_available_bytes: host.disk_available_bytes,
            disk_total_bytes: host.disk_total_bytes,
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
        let mut client = AgentSessionClient::new(channel.clone());
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
        let _ = tx.send(self.heartbeat().await).await;
        let mut inbound = client.session(ReceiverStream::new(rx)).await?.into_inner();
        tracing::info!(scheduler = self.cfg.scheduler.url(), "session open");
        metrics::gauge!("clawdeploy_agent_connected").set(1.0);
        metrics::counter!("clawdeploy_agent_sessions_opened_total").increment(1);
        let mut tick = tokio::time::interval(self.cfg.heartbeat_every);
        let mut last_beat = tokio::time::Instant::now();
        let mut renew = self
            .next_renewal
            .lock()
            .unwrap()
            .unwrap_or_else(|| renewal_deadline(&self.cfg.tls));
        loop {
            tokio::select! {
                msg = inbound.message() => {
                    let Some(msg) = msg? else { return Ok(()) };
                    let mut newest = None;
                    if let Some(scheduler_message::Msg::Desired(state)) = msg.msg {
                        newest = Some(state);
                    }
                    // A burst of claims sends one full state per claim: only
                    // the newest of those already here is persisted (one
                    // fsync instead of one per claim).
                    let mut closed = false;
                    while let Some(next) = inbound.message().now_or_never() {
                        match next? {
                            Some(m) => if let Some(scheduler_message::Msg::Desired(state)) = m.msg {
                                if newest.as_ref().is_none_or(|n| state.generation > n.generation) {
                                    newest = Some(state);
                                }
                            },
                            None => { closed = true; break }
                        }
                    }
                    if let Some(state) = newest {
                        // A state that cannot be persisted (a full disk) is
                        // not applied; the session goes on, so heartbeats
                        // keep reporting the disk and the applied
                        // generation, and the scheduler pushes again.
                        if let Err(e) = self.accept(state).await {
                            metrics::counter!("clawdeploy_agent_ledger_write_failures_total").increment(1);
                            tracing::error!(error = %e, "desired state not persisted; keeping the last one");
                        }
                    }
                    if closed { return Ok(()) }
                }
                _ = self.board.changed.notified() => {
                    if tx.send(self.heartbeat().await).await.is_err() { return Ok(()) }
                }
                _ = tick.tick() => {
                    // Lag: how late this beat is against its schedule (a
                    // starved runtime or a full outbound queue shows here).
                    let lag = last_beat.elapsed().saturating_sub(self.cfg.heartbeat_every);
                    metrics::histogram!("clawdeploy_agent_heartbeat_lag_seconds").record(lag.as_secs_f64());
                    last_beat = tokio::time::Instant::now();
                    metrics::counter!("clawdeploy_agent_heartbeats_total").increment(1);
                    if tx.send(self.heartbeat().await).await.is_err() { return Ok(()) }
                }
                _ = tokio::time::sleep_until(renew) => {
                    // Renewed over this session's own connection: the
                    // stream is not interrupted, and the next connect
                    // presents the new certificate.
                    renew = match tokio::time::timeout(
                        Duration::from_secs(10),
                        crate::enroll::renew(channel.clone(), &self.cfg.tls),
                    ).await {
                        Ok(Ok(_)) => {
                            let next = renewal_after_receipt(&self.cfg.tls);
                            *self.next_renewal.lock().unwrap() = Some(next);
                            next
                        }
                        Ok(Err(e)) => {
                            metrics::counter!("clawdeploy_agent_cert_renewal_failures_total").increment(1);
                            tracing::warn!(error = %e, "certificate renewal failed; retrying");
                            tokio::time::Instant::now() + Duration::from_secs(5)
                        }
                        Err(_) => {
                            metrics::counter!("clawdeploy_agent_cert_renewal_failures_total").increment(1);
                            tracing::warn!("certificate renewal timed out; retrying");
                            tokio::time::Instant::now() + Duration::from_secs(5)
                        }
                    };
                }
            }
        }
    }

    async fn accept(&self, state: DesiredState) -> Result<()> {
        let generation = state.generation;
        // The ledger fsyncs: off the async threads, so heartbeats and
        // probes do not wait on the disk.
        let ledger = self.ledger.clone();
        let copy = state.clone();
        let accepted = tokio::task::spawn_blocking(move || ledger.lock().unwrap().accept(copy))
            .await
            .map_err(|e| Error::Ledger(format!("ledger task: {e}")))??;
        match accepted {
            Accepted::Newer => {
                if state.containers.iter().any(|c| c.tenant.is_some()) {
                    crate::crash_point("desired");
                }
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

/// When to renew a certificate just received: half its validity span from
/// now, on the monotonic clock. The span is a difference of the
/// certificate's own times (both the scheduler's), so this clock's offset
/// from the scheduler's does not move the renewal (the scheduler back-dates
/// `not_before` by at most a quarter of the lifetime, so half the span is
/// at most 62.5% of the lifetime).
fn renewal_after_receipt(files: &TlsFiles) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    match crate::enroll::validity(&files.cert()) {
        Ok((from, to)) => now + Duration::from_secs((to - from).max(0) as u64 / 2),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the node certificate's lifetime");
            now + Duration::from_secs(60)
        }
    }
}

/// When to renew the certificate on disk at start-up: two thirds through
/// its life by this host's clock, or half its span from now, whichever
/// comes first (a clock behind the scheduler's would otherwise renew late;
/// one ahead renews at once, once, and then by `renewal_after_receipt`).
/// An unreadable certificate is retried in a minute.
fn renewal_deadline(files: &TlsFiles) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    match crate::enroll::validity(&files.cert()) {
        Ok((from, to)) => {
            let by_clock = u64::try_from(from + (to - from) * 2 / 3)
                .map(|at| std::time::UNIX_EPOCH + Duration::from_secs(at))
                .unwrap_or(std::time::UNIX_EPOCH)
                .duration_since(std::time::SystemTime::now())
                .unwrap_or(Duration::ZERO);
            let by_span = Duration::from_secs((to - from).max(0) as u64 / 2);
            now + by_clock.min(by_span)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the node certificate's lifetime");
            now + Duration::from_secs(60)
        }
    }
}
