//! Keeps the route table in step with the scheduler: `WatchRoutes` over
//! mTLS, a snapshot then deltas, reconnecting with capped backoff. While the
//! scheduler is away the edge keeps serving what it has.

use std::sync::Arc;
use std::time::Duration;

use clawdeploy_common::Backoff;
use clawdeploy_proto::route_watch_client::RouteWatchClient;
use clawdeploy_proto::{route_event, AckRoutesRequest, WatchRoutesRequest};

use crate::error::{Error, Result};
use crate::routes::RouteTable;

pub use clawdeploy_proto::client::SchedulerEndpoint as WatchConfig;

pub async fn run(cfg: WatchConfig, table: Arc<RouteTable>) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let started = tokio::time::Instant::now();
        match once(&cfg, &table).await {
            Ok(()) => tracing::info!("route watch closed by the scheduler"),
            Err(e) => tracing::warn!(error = %e, "route watch failed; serving the table as it is"),
        }
        metrics::gauge!("clawdeploy_edge_scheduler_connected").set(0.0);
        if started.elapsed() > Duration::from_secs(30) {
            backoff.reset();
        }
        backoff.wait().await;
    }
}

async fn once(cfg: &WatchConfig, table: &RouteTable) -> Result<()> {
    let channel = cfg
        .connect()
        .await
        .map_err(|e| Error::Watch(e.to_string()))?;
    let mut client = RouteWatchClient::new(channel);
    let mut stream = client
        .watch_routes(WatchRoutesRequest {
            known_version: table.version(),
        })
        .await?
        .into_inner();
    metrics::gauge!("clawdeploy_edge_scheduler_connected").set(1.0);
    // Acknowledge applied versions off the stream's path, coalescing bursts
    // into the latest change.
    let (applied_tx, mut applied_rx) = tokio::sync::watch::channel(0u64);
    let acker = tokio::spawn(async move {
        while applied_rx.changed().await.is_ok() {
            let version = *applied_rx.borrow_and_update();
            if let Err(e) = client.ack_routes(AckRoutesRequest { version }).await {
                tracing::debug!(error = %e, "route ack failed");
            }
        }
    });
    let _stop_acker = AbortOnDrop(acker);
    while let Some(event) = stream.message().await? {
        let version = match event.event {
            Some(route_event::Event::Snapshot(s)) => {
                tracing::info!(
                    routes = s.routes.len(),
                    version = s.version,
                    "route snapshot"
                );
                let v = s.version;
                table.apply_snapshot(s);
                v
            }
            Some(route_event::Event::Delta(d)) => {
                tracing::debug!(version = d.version, "route delta");
                let (v, published) = (d.version, d.published_unix_ms);
                table.apply_delta(d);
                record_lag(published);
                v
            }
            None => continue,
        };
        // The last change applied, in the order they came: the scheduler
        // reads it as covering every change it sent before (versions are
        // not sent in order, so the highest would claim too much).
        applied_tx.send_replace(version);
    }
    Ok(())
}

/// How long a delta took from the scheduler sending it to the edge
/// applying it (wall clocks: across hosts this includes their skew).
fn record_lag(published_unix_ms: u64) {
    if published_unix_ms == 0 {
        return;
    }
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let lag = now_ms.saturating_sub(published_unix_ms) as f64 / 1000.0;
    metrics::histogram!("clawdeploy_edge_route_update_lag_seconds").record(lag);
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
