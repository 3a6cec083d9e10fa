//! Upstream connections: HTTP/1.1 to the containers, kept alive in a pool
//! each worker owns (a worker is one thread, so the pool's lock is never
//! contended), keyed by container *and* address: the key names the
//! container id and the address its route had when the request came, and a
//! new connection is made only while the route table still gives that
//! container that address. A kept-alive connection opened for one container
//! is therefore never reused for another, even one that later got the same
//! address, and a connection made to a container's old address (Docker gave
//! it another on a restart) is never reused once the route follows it.
//!
//! A request is written by the connection's own task and its connection
//! goes back to the pool when the response body ends (`Returning`), with no
//! task spawned per request to wait for it and no channel between a pool
//! and a connector: on a cheap route that machinery was the edge's largest
//! cost after the kernel.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Limited;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::routes::{RouteTable, Target};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the edge sends upstream: the client's body, capped.
pub type UpBody = Limited<Incoming>;

/// How long an idle upstream connection is kept.
const IDLE_FOR: Duration = Duration::from_secs(60);
/// Idle connections kept per container and address.
const MAX_IDLE_PER_KEY: usize = 64;
/// How often idle connections past `IDLE_FOR` (or closed) are dropped.
const SWEEP_EVERY: Duration = Duration::from_secs(15);

/// The pool key of `container_id` at `upstream`:
/// `<container id>--<address with '.' and ':' as '-'>`.
pub fn pool_key(container_id: &str, upstream: &str) -> Arc<str> {
    format!("{container_id}--{}", key_address(upstream)).into()
}

/// A route target's pool key, made once per route.
pub fn key_of(target: &Target) -> &Arc<str> {
    target
        .pool_key
        .get_or_init(|| pool_key(&target.container_id, &target.upstream))
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

struct Idle {
    sender: SendRequest<UpBody>,
    since: Instant,
}

type IdleMap = HashMap<Arc<str>, Vec<Idle>, foldhash::fast::RandomState>;

/// One worker's upstream connections.
pub struct UpstreamPool {
    routes: Arc<RouteTable>,
    connect_timeout: Duration,
    idle: Mutex<IdleMap>,
    sweeping: std::sync::atomic::AtomicBool,
}

impl UpstreamPool {
    pub fn new(routes: Arc<RouteTable>, connect_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            routes,
            connect_timeout,
            idle: Mutex::new(IdleMap::default()),
            sweeping: Default::default(),
        })
    }

    /// Sends `req` to the container `key` names: over an idle connection
    /// when one is alive (a request the container closed the connection
    /// under before it was written goes out on the next), else over a new
    /// one. The response's body returns its connection to the pool.
    pub async fn send(
        self: &Arc<Self>,
        key: &Arc<str>,
        mut req: Request<UpBody>,
    ) -> Result<Response<Returning>, BoxError> {
        while let Some(mut sender) = self.take_idle(key) {
            if sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(self.returning(key, sender, resp)),
                Err(mut e) => match e.take_message() {
                    Some(back) => req = back,
                    None => return Err(e.into_error().into()),
                },
            }
        }
        let mut sender = self.connect(key).await?;
        let resp = sender.send_request(req).await?;
        Ok(self.returning(key, sender, resp))
    }

    fn returning(
        self: &Arc<Self>,
        key: &Arc<str>,
        sender: SendRequest<UpBody>,
        resp: Response<Incoming>,
    ) -> Response<Returning> {
        // An upgraded connection (101) belongs to the tunnel from now on.
        let back = (resp.status() != http::StatusCode::SWITCHING_PROTOCOLS).then(|| Checkin {
            pool: Arc::downgrade(self),
            key: key.clone(),
            sender,
        });
        resp.map(|body| Returning::new(body, back))
    }

    /// The most recently used live idle connection for `key`.
    fn take_idle(&self, key: &str) -> Option<SendRequest<UpBody>> {
        let mut idle = self.idle.lock().unwrap();
        let list = idle.get_mut(key)?;
        while let Some(Idle { sender, since }) = list.pop() {
            if !sender.is_closed() && since.elapsed() < IDLE_FOR {
                return Some(sender);
            }
        }
        None
    }

    fn put_back(self: &Arc<Self>, key: Arc<str>, sender: SendRequest<UpBody>) {
        if sender.is_closed() {
            return;
        }
        {
            let mut idle = self.idle.lock().unwrap();
            let list = idle.entry(key).or_default();
            if list.len() >= MAX_IDLE_PER_KEY {
                return;
            }
            list.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
        if !self
            .sweeping
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tokio::spawn(sweep(Arc::downgrade(self)));
        }
    }

    /// A new connection to the address the route table gives `key`'s
    /// container, if it still gives it the key's address.
    async fn connect(&self, key: &str) -> Result<SendRequest<UpBody>, BoxError> {
        let address = address_of(&self.routes, key)
            .ok_or("no route gives this container this address any more")?;
        metrics::counter!("clawdeploy_edge_upstream_connects_total").increment(1);
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(address))
            .await
            .map_err(|_| "connecting to the container timed out")??;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }
}

/// Drops idle connections past their time, and closed ones, until the
/// pool is gone.
async fn sweep(pool: Weak<UpstreamPool>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        let mut idle = pool.idle.lock().unwrap();
        idle.retain(|_, list| {
            list.retain(|i| !i.sender.is_closed() && i.since.elapsed() < IDLE_FOR);
            !list.is_empty()
        });
    }
}

/// A connection on its way back to its pool.
struct Checkin {
    pool: Weak<UpstreamPool>,
    key: Arc<str>,
    sender: SendRequest<UpBody>,
}

impl Checkin {
    fn done(self) {
        if let Some(pool) = self.pool.upgrade() {
            pool.put_back(self.key, self.sender);
        }
    }
}

/// A container's response body, which gives its connection back to the
/// pool once it has been read to the end. A body dropped before its end
/// drops the connection too (hyper cannot reuse it with bytes unread).
pub struct Returning {
    inner: Incoming,
    back: Option<Checkin>,
}

impl Returning {
    fn new(inner: Incoming, back: Option<Checkin>) -> Self {
        let mut body = Self { inner, back };
        // An empty body may never be read: its connection is free now.
        if body.inner.is_end_stream() {
            body.check_in();
        }
        body
    }

    fn check_in(&mut self) {
        if let Some(back) = self.back.take() {
            back.done();
        }
    }
}

impl Body for Returning {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.check_in(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.check_in(),
            Poll::Ready(Some(Err(_))) => self.back = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
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
        let old_key = pool_key("c1", "10.0.0.3:18789");
        assert_eq!(address_of(&t, &old_key).as_deref(), Some("10.0.0.3:18789"));
        // Docker gave the container another address (and its old one may
        // now belong to another tenant): the old key dials nothing.
        t.apply_delta(RouteDelta {
            version: 2,
            upsert: Some(route("10.0.0.4:18789")),
            ..Default::default()
        });
        assert_eq!(address_of(&t, &old_key), None);
        let new_key = pool_key("c1", "10.0.0.4:18789");
        // A route's cached key is the same key.
        let target = t.lookup("a.x.test").unwrap();
        assert_eq!(key_of(&target), &new_key);
        assert_eq!(address_of(&t, &new_key).as_deref(), Some("10.0.0.4:18789"));
        // A container whose route is paused (no address) is not dialled.
        t.apply_delta(RouteDelta {
            version: 3,
            upsert: Some(route("")),
            ..Default::default()
        });
        assert_eq!(address_of(&t, &new_key), None);
        assert_eq!(address_of(&t, "no-separator"), None);
    }
}
