//! Keeps the route table in step with the scheduler: `WatchRoutes` over
//! mTLS, a snapshot then deltas, reconnecting with capped backoff. While the
//! scheduler is away the edge keeps serving what it has.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clawdeploy_proto::route_watch_client::RouteWatchClient;
use clawdeploy_proto::{route_event, WatchRoutesRequest};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::routes::RouteTable;

#[derive(Clone, Debug)]
pub struct WatchConfig {
    pub scheduler_url: String,
    pub server_name: String,
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

pub async fn run(cfg: WatchConfig, table: Arc<RouteTable>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let started = tokio::time::Instant::now();
        match once(&cfg, &table).await {
            Ok(()) => tracing::info!("route watch closed by the scheduler"),
            Err(e) => tracing::warn!(error = %e, "route watch failed; serving the table as it is"),
        }
        metrics::gauge!("clawdeploy_edge_scheduler_connected").set(0.0);
        if started.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(100);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn once(cfg: &WatchConfig, table: &RouteTable) -> anyhow::Result<()> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(tokio::fs::read(&cfg.ca_file).await?))
        .identity(Identity::from_pem(
            tokio::fs::read(&cfg.cert_file).await?,
            tokio::fs::read(&cfg.key_file).await?,
        ))
        .domain_name(cfg.server_name.clone());
    let channel = Channel::from_shared(cfg.scheduler_url.clone())?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(3))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .connect()
        .await?;
    let mut stream = RouteWatchClient::new(channel)
        .watch_routes(WatchRoutesRequest {
            known_version: table.version(),
        })
        .await?
        .into_inner();
    metrics::gauge!("clawdeploy_edge_scheduler_connected").set(1.0);
    while let Some(event) = stream.message().await? {
        match event.event {
            Some(route_event::Event::Snapshot(s)) => {
                tracing::info!(
                    routes = s.routes.len(),
                    version = s.version,
                    "route snapshot"
                );
                table.apply_snapshot(s);
            }
            Some(route_event::Event::Delta(d)) => {
                tracing::debug!(version = d.version, "route delta");
                table.apply_delta(d);
            }
            None => {}
        }
    }
    Ok(())
}
