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

/// Runs the agent until `shutdown` resolves. Containers keep running after
/// the agent stops: they belong to tenants, not to this process.
pub async fn run<R: ContainerRuntime>(
    session: SessionConfig,
    state_dir: std::path::PathBuf,
    runtime: R,
    max_parallel_creates: usize,
    metrics_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let handle = clawdeploy_common::metrics::install(telemetry::CATALOG, telemetry::BUCKETS)?;
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
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

    let reconciler = tokio::spawn(
        Reconciler::new(Arc::new(runtime), board.clone(), max_parallel_creates).run(desired_rx),
    );
    let session = tokio::spawn(
        Session {
            host: host::HostSampler::new(state_dir.clone()),
            cfg: session,
            ledger,
            desired: desired_tx,
            board,
        }
        .run(stop_rx.clone()),
    );
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
    shutdown.await;
    tracing::info!("agent stopping; tenant containers keep running");
    let _ = stop_tx.send(true);
    let _ = session.await;
    reconciler.abort();
    let _ = metrics_server.await;
    Ok(())
}
