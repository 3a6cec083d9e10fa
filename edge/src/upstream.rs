//! Upstream connections, pooled per container rather than per address: the
//! pool key is the container id, and a new connection goes to the address
//! the route table gives that container at that moment. A kept-alive
//! connection opened for one container is therefore never reused for
//! another, even one that later got the same address.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_service::Service;

use crate::routes::RouteTable;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Clone)]
pub struct UpstreamConnector {
    routes: Arc<RouteTable>,
    http: HttpConnector,
}

impl UpstreamConnector {
    pub fn new(routes: Arc<RouteTable>, connect_timeout: Duration) -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect_timeout));
        Self { routes, http }
    }
}

/// The URI a request for `container_id` is sent to (the pool's key).
pub fn uri_for(container_id: &str, path_and_query: &str) -> Option<Uri> {
    format!("http://{container_id}{path_and_query}")
        .parse()
        .ok()
}

impl Service<Uri> for UpstreamConnector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let address = uri
            .host()
            .and_then(|container| self.routes.upstream_of(container));
        let mut http = self.http.clone();
        Box::pin(async move {
            let address = address.ok_or("no route names this container any more")?;
            let target: Uri = format!("http://{address}").parse()?;
            metrics::counter!("clawdeploy_edge_upstream_connects_total").increment(1);
            Ok(http.call(target).await?)
        })
    }
}
