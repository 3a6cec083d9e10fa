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
//! Two kinds of connection: a request with no body that does not upgrade
//! and is safe to send again goes over an inline connection (`h1.rs`),
//! written and read by the request's own task; any other goes through
//! hyper's client, whose connection runs as a task of its own. Either goes
//! back to the pool when the response body ends, with no task spawned per
//! request to wait for it.

mod framing;
mod h1;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{combinators::BoxBody, BodyExt, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use self::h1::{H1Conn, InlineBody};
use crate::routes::{RouteTable, Target};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the edge sends upstream: the client's body, capped.
pub type UpBody = Limited<Incoming>;

/// A container's response body, whichever kind of connection carried it.
pub type DownBody = BoxBody<Bytes, BoxError>;

/// How long an idle upstream connection is kept.
const IDLE_FOR: Duration = Duration::from_secs(60);
/// Idle connections kept per container and address, of each kind.
const MAX_IDLE_PER_KEY: usize = 64;
/// How often idle connections past `IDLE_FOR` (or closed) are dropped.
const SWEEP_EVERY: Duration = Duration::from_secs(15);
/// Kept-alive inline connections tried for one request before a new one
/// is made: one found closed by the container is passed over once (a GET
/// may go again), not once per idle connection.
const REUSE_TRIES: usize = 2;

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

struct Idle<C> {
    conn: C,
    since: Instant,
}

type IdleMap<C> = HashMap<Arc<str>, Vec<Idle<C>>, foldhash::fast::RandomState>;

/// A kind of connection the pool keeps.
trait Pooled: Sized + Send + 'static {
    /// Whether it can still carry a request.
    fn usable(&self) -> bool;
    /// The pool's idle connections of this kind.
    fn idle(pool: &UpstreamPool) -> &Mutex<IdleMap<Self>>;
}

impl Pooled for SendRequest<UpBody> {
    fn usable(&self) -> bool {
        !self.is_closed()
    }
    fn idle(pool: &UpstreamPool) -> &Mutex<IdleMap<Self>> {
        &pool.idle
    }
}

impl Pooled for H1Conn {
    fn usable(&self) -> bool {
        self.is_usable()
    }
    fn idle(pool: &UpstreamPool) -> &Mutex<IdleMap<Self>> {
        &pool.inline_idle
    }
}

/// One worker's upstream connections.
pub struct UpstreamPool {
    routes: Arc<RouteTable>,
    connect_timeout: Duration,
    /// hyper's client connections (requests with bodies, upgrades).
    idle: Mutex<IdleMap<SendRequest<UpBody>>>,
    /// Inline connections (`h1.rs`).
    inline_idle: Mutex<IdleMap<H1Conn>>,
    sweeping: std::sync::atomic::AtomicBool,
}

impl UpstreamPool {
    pub fn new(routes: Arc<RouteTable>, connect_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            routes,
            connect_timeout,
            idle: Mutex::new(IdleMap::default()),
            inline_idle: Mutex::new(IdleMap::default()),
            sweeping: Default::default(),
        })
    }

    /// Sends `req` to the container `key` names, over a kept-alive
    /// connection when one is alive, else over a new one. The response's
    /// body returns its connection to the pool.
    pub async fn send(
        self: &Arc<Self>,
        key: &Arc<str>,
        req: Request<UpBody>,
    ) -> Result<Response<DownBody>, BoxError> {
        if h1::suits(&req) {
            self.send_inline(key, &req).await
        } else {
            self.send_hyper(key, req).await
        }
    }

    /// A request without a body over an inline connection. One the
    /// container closed before answering hands the request to the next.
    async fn send_inline<B>(
        self: &Arc<Self>,
        key: &Arc<str>,
        req: &Request<B>,
    ) -> Result<Response<DownBody>, BoxError> {
        let mut head = Vec::with_capacity(512);
        h1::encode_head(req, &mut head);
        let method = req.method();
        for _ in 0..REUSE_TRIES {
            let Some(mut conn) = self.take_idle::<H1Conn>(key) else {
                break;
            };
            match conn.exchange(&head, method).await {
                Ok(answer) => return Ok(self.inline_response(key, conn, answer)),
                Err(crate::Error::UpstreamClosed) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        let mut conn = H1Conn::new(self.dial(key).await?);
        let answer = conn.exchange(&head, method).await?;
        Ok(self.inline_response(key, conn, answer))
    }

    fn inline_response(
        self: &Arc<Self>,
        key: &Arc<str>,
        conn: H1Conn,
        answer: h1::Head,
    ) -> Response<DownBody> {
        let body = InlineBody::new(conn, &answer, Home::new(self, key.clone()));
        answer.response.map(|()| body.boxed())
    }

    /// Any other request, through hyper's client: over an idle connection
    /// when one is alive (a request the container closed the connection
    /// under before it was written goes out on the next), else a new one.
    async fn send_hyper(
        self: &Arc<Self>,
        key: &Arc<str>,
        mut req: Request<UpBody>,
    ) -> Result<Response<DownBody>, BoxError> {
        while let Some(mut sender) = self.take_idle::<SendRequest<UpBody>>(key) {
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
        let mut sender = self.connect_hyper(key).await?;
        let resp = sender.send_request(req).await?;
        Ok(self.returning(key, sender, resp))
    }

    fn returning(
        self: &Arc<Self>,
        key: &Arc<str>,
        sender: SendRequest<UpBody>,
        resp: Response<Incoming>,
    ) -> Response<DownBody> {
        // An upgraded connection (101) belongs to the tunnel from now on.
        let back = (resp.status() != http::StatusCode::SWITCHING_PROTOCOLS)
            .then(|| (Home::new(self, key.clone()), sender));
        resp.map(|body| Returning::new(body, back).map_err(BoxError::from).boxed())
    }

    /// The most recently used usable idle connection of kind `C` for `key`.
    fn take_idle<C: Pooled>(&self, key: &str) -> Option<C> {
        let mut idle = C::idle(self).lock().unwrap();
        let list = idle.get_mut(key)?;
        while let Some(Idle { conn, since }) = list.pop() {
            if since.elapsed() < IDLE_FOR && conn.usable() {
                return Some(conn);
            }
        }
        None
    }

    fn put_back<C: Pooled>(self: &Arc<Self>, key: Arc<str>, conn: C) {
        if !conn.usable() {
            return;
        }
        {
            let mut idle = C::idle(self).lock().unwrap();
            let list = idle.entry(key).or_default();
            if list.len() >= MAX_IDLE_PER_KEY {
                return;
            }
            list.push(Idle {
                conn,
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

    /// A new TCP connection to the address the route table gives `key`'s
    /// container, if it still gives it the key's address.
    async fn dial(&self, key: &str) -> Result<TcpStream, BoxError> {
        let address = address_of(&self.routes, key)
            .ok_or("no route gives this container this address any more")?;
        metrics::counter!("clawdeploy_edge_upstream_connects_total").increment(1);
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(address))
            .await
            .map_err(|_| "connecting to the container timed out")??;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// A new hyper client connection, its connection task spawned.
    async fn connect_hyper(&self, key: &str) -> Result<SendRequest<UpBody>, BoxError> {
        let stream = self.dial(key).await?;
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
    fn prune<C: Pooled>(pool: &UpstreamPool) {
        C::idle(pool).lock().unwrap().retain(|_, list| {
            list.retain(|i| i.since.elapsed() < IDLE_FOR && i.conn.usable());
            !list.is_empty()
        });
    }
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        prune::<SendRequest<UpBody>>(&pool);
        prune::<H1Conn>(&pool);
    }
}

/// Where a connection goes back to when its response is done: its pool,
/// under its key (if the pool is still there).
pub struct Home {
    pool: Weak<UpstreamPool>,
    key: Arc<str>,
}

impl Home {
    fn new(pool: &Arc<UpstreamPool>, key: Arc<str>) -> Self {
        Self {
            pool: Arc::downgrade(pool),
            key,
        }
    }

    fn put_back<C: Pooled>(self, conn: C) {
        if let Some(pool) = self.pool.upgrade() {
            pool.put_back(self.key, conn);
        }
    }
}

/// A container's response body over hyper's client, which gives its
/// connection back to the pool once it has been read to the end. A body
/// dropped before its end drops the connection too (hyper cannot reuse it
/// with bytes unread).
pub struct Returning {
    inner: Incoming,
    back: Option<(Home, SendRequest<UpBody>)>,
}

impl Returning {
    fn new(inner: Incoming, back: Option<(Home, SendRequest<UpBody>)>) -> Self {
        let mut body = Self { inner, back };
        // An empty body may never be read: its connection is free now.
        if body.inner.is_end_stream() {
            body.check_in();
        }
        body
    }

    fn check_in(&mut self) {
        if let Some((home, sender)) = self.back.take() {
            home.put_back(sender);
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

    /// An empty pool and a key, for tests of what goes back into it.
    pub(super) fn a_pool() -> (Arc<UpstreamPool>, Arc<str>) {
        let pool = UpstreamPool::new(Arc::new(RouteTable::load(None)), Duration::from_secs(1));
        (pool, pool_key("c1", "127.0.0.1:1"))
    }

    /// A container that answers one request on each connection, without
    /// saying it will close, and then closes: a kept-alive connection's
    /// life ending between two requests, as a server's idle timeout ends it.
    async fn one_answer_per_connection() -> std::net::SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut got = Vec::new();
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_kept_connection_the_container_closed_costs_the_request_nothing() {
        let addr = one_answer_per_connection().await;
        let t = Arc::new(RouteTable::load(None));
        t.apply_snapshot(RouteSnapshot {
            version: 1,
            routes: vec![route(&addr.to_string())],
        });
        let pool = UpstreamPool::new(t, Duration::from_secs(1));
        let key = pool_key("c1", &addr.to_string());
        for i in 0..20 {
            let req = Request::get("/healthz")
                .header("host", "a.x.test")
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap();
            let resp = pool.send_inline(&key, &req).await.unwrap();
            assert_eq!(resp.status(), 200, "request {i}");
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"ok", "request {i}");
            // Sometimes the close is seen before the next request, sometimes
            // only when the request meets it: either way it is answered.
            if i % 2 == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
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
