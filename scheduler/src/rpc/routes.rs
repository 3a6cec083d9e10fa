//! The route watch: an edge gets a snapshot of every route, then each
//! committed change, and acknowledges the versions it has applied.

use std::pin::Pin;

use clawdeploy_proto::route_watch_server::RouteWatch;
use clawdeploy_proto::{
    route_event, AckRoutesRequest, AckRoutesResponse, RouteEvent, WatchRoutesRequest,
};
use futures::Stream;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::identity::caller;
use crate::app::AppRef;
use crate::crypto::pki::Identity;

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
        let (watch_id, mut deltas) = self.app.route_feed.watch(&edge_id);
        let snapshot = match crate::routes::snapshot(&self.app).await {
            Ok(s) => s,
            Err(e) => {
                self.app.route_feed.unwatch(watch_id);
                return Err(e.into());
            }
        };
        self.app
            .route_feed
            .snapshot_read(watch_id, snapshot.version);
        tracing::info!(
            edge_id,
            routes = snapshot.routes.len(),
            version = snapshot.version,
            "edge watching routes"
        );
        let (tx, rx) = mpsc::channel(256);
        let app = self.app.clone();
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
            app.route_feed.unwatch(watch_id);
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
        self.app.route_feed.ack(&edge_id, req.into_inner().version);
        Ok(Response::new(AckRoutesResponse {}))
    }
}
