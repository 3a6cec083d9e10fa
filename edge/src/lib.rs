//! ClawDeploy edge: the public entry to customers' gateways. It maps
//! `<sub>.<base_domain>` to the tenant container named by the route table
//! that the scheduler streams to it, and serves its own 404 for anything
//! else.

pub mod proxy;
pub mod routes;
pub mod watch;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use tokio::net::TcpListener;

pub use watch::WatchConfig;

pub struct EdgeConfig {
    pub watch: WatchConfig,
    pub cache_file: Option<PathBuf>,
}

/// Runs the edge on `listener` (public) and `admin` (metrics, health) until
/// `shutdown` resolves.
pub async fn serve(
    cfg: EdgeConfig,
    listener: TcpListener,
    admin: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".into()),
            &[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            ],
        )?
        .install_recorder()?;
    let table = Arc::new(routes::RouteTable::load(cfg.cache_file));
    let watcher = tokio::spawn(watch::run(cfg.watch, table.clone()));
    let persister = tokio::spawn(table.clone().persist_changes());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let status_table = table.clone();
    let admin_app =
        axum::Router::new()
            .route("/metrics", get(move || std::future::ready(handle.render())))
            .route("/healthz", get(|| async { "ok" }))
            .route(
                "/routes",
                get(move || {
                    let t = status_table.clone();
                    async move {
                        axum::Json(serde_json::json!({"routes": t.len(), "version": t.version()}))
                    }
                }),
            );
    let mut admin_stop = stop_rx.clone();
    let admin_task = tokio::spawn(async move {
        axum::serve(admin, admin_app)
            .with_graceful_shutdown(async move {
                let _ = admin_stop.changed().await;
            })
            .await
    });
    let proxy_task = tokio::spawn(proxy::serve(
        Arc::new(proxy::Proxy::new(table.clone())),
        listener,
        stop_rx,
    ));
    shutdown.await;
    let _ = stop_tx.send(true);
    watcher.abort();
    persister.abort();
    if let Err(e) = table.save() {
        tracing::warn!(error = %e, "route cache not written at shutdown");
    }
    let _ = proxy_task.await;
    let _ = admin_task.await;
    Ok(())
}
