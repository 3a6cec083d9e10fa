//! ClawDeploy node agent: the only thing on a customer's host that touches
//! Docker. It keeps one mTLS session with the scheduler, persists the node's
//! desired state, reconciles Docker towards it, injects tenant config and
//! proves it live, and reports health.

pub mod enroll;
pub mod error;
pub mod firewall;
pub mod host;
pub mod ledger;
pub mod probe;
pub mod reconcile;
pub mod runtime;
pub mod session;
pub mod telemetry;

use std::future::Future;
use std::sync::{Arc, Mutex};

use axum::routing::get;
use tokio::net::TcpListener;

use crate::probe::GatewayProbe;
use crate::reconcile::{Reconciler, StatusBoard};
use crate::runtime::ContainerRuntime;
use crate::session::{Session, SessionConfig};

/// Test hook for crash-consistency tests: with
/// `CLAWDEPLOY_AGENT_CRASH_AT=<point>` in its environment the agent kills
/// itself with SIGKILL on reaching `<point>` (`desired`: a desired state with
/// a tenant persisted; `config`: tenant config written; `report`: config
/// proven live, not yet reported). Unset in production.
pub fn crash_point(point: &str) {
    if std::env::var("CLAWDEPLOY_AGENT_CRASH_AT").is_ok_and(|v| v == point) {
        tracing::error!(point, "crash point reached; killing the agent (test hook)");
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &std::process::id().to_string()])
            .status();
        std::process::abort();
    }
}

/// Runs the agent until `shutdown` resolves, with its `/metrics` and
/// `/healthz` on `metrics_listener`, over Docker and HTTP probes. Containers
/// keep running after the agent stops: they belong to tenants, not to this
/// process.
pub async fn run<R: ContainerRuntime>(
    session: SessionConfig,
    state_dir: std::path::PathBuf,
    runtime: R,
    max_parallel_creates: usize,
    metrics_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let handle = clawdeploy_common::metrics::install(telemetry::CATALOG, telemetry::BUCKETS)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let app = axum::Router::new()
        .route("/metrics", get(move || std::future::ready(handle.render())))
        .route("/healthz", get(|| async { "ok" }));
    let mut stop_metrics = stop_rx.clone();
    let metrics_server = tokio::spawn(async move {
        axum::serve(metrics_listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop_metrics.changed().await;
            })
            .await
    });
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("agent stopping; tenant containers keep running");
        let _ = stop_tx.send(true);
    });
    let r = run_until(
        session,
        state_dir,
        runtime,
        probe::Prober::default(),
        max_parallel_creates,
        stop_rx,
    )
    .await;
    let _ = metrics_server.await;
    r
}

/// The agent's work without its metrics endpoint, over any runtime and
/// probe (the fleet simulation runs many in one process over
/// `runtime::fake::FakeRuntime`): the ledger, the reconciler and the session
/// with the scheduler, until `stop` turns true.
pub async fn run_until<R: ContainerRuntime, P: GatewayProbe>(
    session: SessionConfig,
    state_dir: std::path::PathBuf,
    runtime: R,
    probe: P,
    max_parallel_creates: usize,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    runtime.prepare().await?;
    let ledger = ledger::Ledger::open(&state_dir)?;
    let initial = ledger.current().clone();
    tracing::info!(
        generation = initial.generation,
        containers = initial.containers.len(),
        "desired state loaded from the ledger"
    );
    let ledger = Arc::new(Mutex::new(ledger));
    let (desired_tx, desired_rx) = tokio::sync::watch::channel(initial);
    let board = Arc::new(StatusBoard::default());
    let transfers = runtime::transfer::Transfers::new(&state_dir.join("archives"))?;
    let reconciler = tokio::spawn(
        Reconciler::with_probe(
            Arc::new(runtime),
            probe,
            board.clone(),
            max_parallel_creates,
        )
        .with_transfers(Arc::new(transfers))
        .run(desired_rx),
    );
    Session {
        host: host::HostSampler::new(state_dir),
        cfg: session,
        ledger,
        desired: desired_tx,
        board,
        next_renewal: Default::default(),
    }
    .run(stop)
    .await;
    reconciler.abort();
    Ok(())
}
