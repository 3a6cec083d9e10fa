//! Drives the runtime towards the persisted desired state. One worker task
//! per desired container (`worker.rs`) owns that container's lifecycle
//! (create or adopt, start, health, tenant config), so a slow `docker
//! create` never delays a customer's config write on another container.
//! The top-level loop here starts and stops workers and removes orphans:
//! containers with this node's label that nobody wants.

mod board;
mod slots;
mod worker;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clawdeploy_proto::{ContainerPhase, DesiredContainer, DesiredState};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::probe::{GatewayProbe, Prober};
use crate::runtime::transfer::Transfers;
use crate::runtime::ContainerRuntime;

pub use board::StatusBoard;
pub use slots::CreateSlots;
pub use worker::tenant_config_json;
use worker::Worker;

pub struct Reconciler<R: ContainerRuntime, P: GatewayProbe = Prober> {
    runtime: Arc<R>,
    /// Bounds concurrent `docker create`/`start`: a pool refill must not
    /// starve claims (config write + probe) of CPU on a busy node.
    creates: Arc<CreateSlots>,
    prober: P,
    board: Arc<StatusBoard>,
    workers: HashMap<String, (watch::Sender<DesiredContainer>, JoinHandle<()>)>,
    removing: Arc<Mutex<HashSet<String>>>,
    /// Moves state archives to and from object storage; without it, export
    /// and import requests fail with a clear message.
    transfers: Option<Arc<Transfers>>,
}

impl<R: ContainerRuntime> Reconciler<R> {
    /// A reconciler that probes gateways over HTTP.
    pub fn new(runtime: Arc<R>, board: Arc<StatusBoard>, max_parallel_creates: usize) -> Self {
        Self::with_probe(runtime, Prober::default(), board, max_parallel_creates)
    }
}

impl<R: ContainerRuntime, P: GatewayProbe> Reconciler<R, P> {
    pub fn with_probe(
        runtime: Arc<R>,
        prober: P,
        board: Arc<StatusBoard>,
        max_parallel_creates: usize,
    ) -> Self {
        Self {
            runtime,
            creates: Arc::new(CreateSlots::new(max_parallel_creates)),
            prober,
            board,
            workers: HashMap::new(),
            removing: Arc::default(),
            transfers: None,
        }
    }

    /// Lets the workers export and import state archives.
    pub fn with_transfers(mut self, transfers: Arc<Transfers>) -> Self {
        self.transfers = Some(transfers);
        self
    }

    /// Reconciles on every new desired state and every few seconds, until
    /// the desired-state channel closes.
    pub async fn run(mut self, mut desired: watch::Receiver<DesiredState>) {
        // The first tick fires at once: orphans are removed (and running
        // containers adopted by their workers) right after a start.
        let mut orphan_scan = tokio::time::interval(Duration::from_secs(5));
        loop {
            let state = desired.borrow_and_update().clone();
            self.sync(&state);
            tokio::select! {
                changed = desired.changed() => if changed.is_err() { break },
                _ = orphan_scan.tick() => self.spawn_orphan_scan(&state),
            }
        }
        for (_, (_, handle)) in self.workers.drain() {
            handle.abort();
        }
    }

    /// Hands every worker its spec, starts missing workers and stops the
    /// ones no longer wanted. Never waits on Docker: a new desired state
    /// reaches the workers at once.
    fn sync(&mut self, state: &DesiredState) {
        let wanted: HashMap<&str, &DesiredContainer> = state
            .containers
            .iter()
            .map(|c| (c.container_id.as_str(), c))
            .collect();
        // Stop workers for containers no longer wanted, and remove those.
        let gone: Vec<String> = self
            .workers
            .keys()
            .filter(|id| !wanted.contains_key(id.as_str()))
            .cloned()
            .collect();
        for id in gone {
            if let Some((_, handle)) = self.workers.remove(&id) {
                handle.abort();
            }
            self.spawn_removal(id);
        }
        // Start or update workers for wanted containers.
        for (id, spec) in &wanted {
            let spec = DesiredContainer::clone(spec);
            match self.workers.get(*id) {
                Some((tx, handle)) if !handle.is_finished() => {
                    tx.send_if_modified(|cur| {
                        if *cur != spec {
                            *cur = spec;
                            true
                        } else {
                            false
                        }
                    });
                }
                _ => {
                    let (tx, rx) = watch::channel(spec);
                    let worker = Worker {
                        runtime: self.runtime.clone(),
                        creates: self.creates.clone(),
                        prober: self.prober.clone(),
                        board: self.board.clone(),
                        generation: state.generation,
                        transfers: self.transfers.clone(),
                    };
                    let handle = tokio::spawn(worker.run(rx));
                    self.workers.insert((*id).to_owned(), (tx, handle));
                }
            }
        }
        let snapshot = self.board.snapshot();
        for phase in [
            ContainerPhase::Creating,
            ContainerPhase::Starting,
            ContainerPhase::Healthy,
            ContainerPhase::Unhealthy,
            ContainerPhase::Failed,
            ContainerPhase::Stopped,
        ] {
            let n = snapshot.iter().filter(|s| s.phase == phase as i32).count();
            metrics::gauge!("clawdeploy_agent_containers", "phase" => phase.as_str_name())
                .set(n as f64);
        }
    }

    /// Orphans: ours by label, wanted by nobody. Listed off the main loop so
    /// a slow Docker never delays desired state.
    fn spawn_orphan_scan(&self, state: &DesiredState) {
        let wanted: HashSet<String> = state
            .containers
            .iter()
            .map(|c| c.container_id.clone())
            .collect();
        let remover = self.remover();
        tokio::spawn(async move {
            match remover.runtime.list().await {
                Ok(list) => {
                    for o in list
                        .into_iter()
                        .filter(|o| !wanted.contains(&o.container_id))
                    {
                        tracing::info!(container_id = o.container_id, "removing orphan container");
                        remover.spawn(o.container_id);
                    }
                }
                Err(e) => {
                    metrics::counter!("clawdeploy_agent_reconcile_errors_total", "step" => "list")
                        .increment(1);
                    tracing::warn!(error = %e, "listing containers failed");
                }
            }
        });
    }

    fn remover(&self) -> Remover<R> {
        Remover {
            runtime: self.runtime.clone(),
            board: self.board.clone(),
            removing: self.removing.clone(),
        }
    }

    fn spawn_removal(&self, container_id: String) {
        self.remover().spawn(container_id);
    }
}

/// Removes containers (and their volumes) in the background, once each.
struct Remover<R> {
    runtime: Arc<R>,
    board: Arc<StatusBoard>,
    removing: Arc<Mutex<HashSet<String>>>,
}

impl<R: ContainerRuntime> Remover<R> {
    fn spawn(&self, container_id: String) {
        if !self.removing.lock().unwrap().insert(container_id.clone()) {
            return;
        }
        let (runtime, board, removing) = (
            self.runtime.clone(),
            self.board.clone(),
            self.removing.clone(),
        );
        tokio::spawn(async move {
            match runtime.remove(&container_id).await {
                Ok(()) => {
                    tracing::info!(container_id, "container and its volume removed");
                    board.remove(&container_id);
                }
                Err(e) => {
                    metrics::counter!("clawdeploy_agent_reconcile_errors_total", "step" => "remove").increment(1);
                    tracing::warn!(container_id, error = %e, "removal failed; retrying on the next pass");
                }
            }
            removing.lock().unwrap().remove(&container_id);
        });
    }
}
