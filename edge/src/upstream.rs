//! Upstream connections, pooled per container *and* address: the pool key
//! names the container id and the address its route had when the request
//! came, and a new connection is made only while the route table still
//! gives that container that address. A kept-alive connection opened for one
//! container is therefore never reused for another, even one that later got
//! the same address, and a connection made to a container's old address
//! (Docker gave it another on a restart) is never reused once the route
//! follows it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_service::Service;

use crate::routes::{RouteTable, Target};

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

/// The pool key of `container_id` at `upstream`:
/// `<container id>--<address with '.' and ':' as '-'>`.
fn pool_key(container_id: &str, upstream: &str) -> Option<Authority> {
    Authority::try_from(format!("{container_id}--{}", key_address(upstream))).ok()
}

/// The URI a request for `container_id` at `upstream` is sent to (its
/// host is the pool's key).
pub fn uri_for(container_id: &str, upstream: &str, path_and_query: &str) -> Option<Uri> {
    with_path(
        pool_key(container_id, upstream)?,
        Some(&PathAndQuery::try_from(path_and_query).ok()?),
    )
}

/// `uri_for` of a route's target, with the key made once per route: the
/// per-request part is only putting the path behind it.
pub fn uri_of(target: &Target, path_and_query: Option<&PathAndQuery>) -> Option<Uri> {
    let key = target
        .pool_key
        .get_or_init(|| pool_key(&target.container_id, &target.upstream));
    with_path(key.clone()?, path_and_query)
}

fn with_path(key: Authority, path_and_query: Option<&PathAndQuery>) -> Option<Uri> {
    Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(key)
        .path_and_query(
            path_and_query
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        )
        .build()
        .ok()
}

/// An address as a host-name-safe part of the pool key.
fn key_address(upstream: &str) -> String {
    upstream.replace(['.', ':'], "-")
}

/// The address to dial for a pool key, if the route table still gives the
/// key's container the key's address.
fn address_of(routes: &RouteTable, key: &str) -> Option<String> {
    let (container, address) = key.split_once("--")?;
    routes
        .upstream_of(container)
        .filter(|now| !now.is_empty() && key_address(now) == address)
}

impl Service<Uri> for UpstreamConnector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let address = uri.host().and_then(|key| address_of(&self.routes, key));
        let mut http = self.http.clone();
        Box::pin(async move {
            let address = address.ok_or("no route gives this container this address any more")?;
            let target: Uri = format!("http://{address}").parse()?;
            metrics::counter!("clawdeploy_edge_upstream_connects_total").increment(1);
            Ok(http.call(target).await?)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clawdeploy_proto::{Route, RouteDelta, RouteSnapshot};

    fn route(upstream: &str) -> Route {
        Route {
            hostname: "a.x.test".into(),
            upstream: upstream.into(),
            instance_id: "i".into(),
            container_id: "c1".into(),
            ..Route::default()
        }
    }

    #[test]
    fn a_key_dials_only_while_its_container_keeps_that_address() {
        let t = RouteTable::load(None);
        t.apply_snapshot(RouteSnapshot {
            version: 1,
            routes: vec![route("10.0.0.3:18789")],
        });
        let old = uri_for("c1", "10.0.0.3:18789", "/v1/models").unwrap();
        let old_key = old.host().unwrap();
        assert_eq!(address_of(&t, old_key).as_deref(), Some("10.0.0.3:18789"));
        // Docker gave the container another address (and its old one may
        // now belong to another tenant): the old key dials nothing.
        t.apply_delta(RouteDelta {
            version: 2,
            upsert: Some(route("10.0.0.4:18789")),
            ..Default::default()
        });
        assert_eq!(address_of(&t, old_key), None);
        let new = uri_for("c1", "10.0.0.4:18789", "/").unwrap();
        // A route's cached key is the same key.
        let target = t.lookup("a.x.test").unwrap();
        let pq = PathAndQuery::from_static("/v1/models?x=1");
        let cached = uri_of(&target, Some(&pq)).unwrap();
        assert_eq!(cached.host(), new.host());
        assert_eq!(cached.path_and_query(), Some(&pq));
        assert_eq!(uri_of(&target, None).unwrap().path(), "/");
        assert_eq!(
            address_of(&t, new.host().unwrap()).as_deref(),
            Some("10.0.0.4:18789")
        );
        // A container whose route is paused (no address) is not dialled.
        t.apply_delta(RouteDelta {
            version: 3,
            upsert: Some(route("")),
            ..Default::default()
        });
        assert_eq!(address_of(&t, new.host().unwrap()), None);
        assert_eq!(address_of(&t, "no-separator"), None);
    }
}
