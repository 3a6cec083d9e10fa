//! One request through the edge: `Host: <sub>.<base_domain>` (or the
//! HTTP/2 `:authority`) → the container the route names, over a pooled
//! HTTP/1.1 connection. Bodies stream both ways under a size cap, WebSocket
//! upgrades are spliced end to end, and unknown hosts get the edge's own 404.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::conn::{Activity, Tracked};
use crate::routes::{normalize_host, RouteTable, Target};
use crate::upstream::{self, UpstreamPool};
use crate::Limits;

/// What the edge answers with.
pub type Body = BoxBody<Bytes, upstream::BoxError>;

pub struct Proxy {
    pub routes: Arc<RouteTable>,
    /// This worker's upstream connections.
    upstream: Arc<UpstreamPool>,
    limits: Limits,
    meters: Meters,
}

/// Per-request metric handles, looked up once rather than on every request.
struct Meters {
    /// Routed requests by status class: 1xx … 5xx.
    known: [metrics::Counter; 5],
    unknown: metrics::Counter,
    upstream_seconds: metrics::Histogram,
}

impl Meters {
    fn new() -> Self {
        let known = ["1xx", "2xx", "3xx", "4xx", "5xx"].map(|class| {
            metrics::counter!("clawdeploy_edge_requests_total", "class" => class, "route" => "known")
        });
        Self {
            known,
            unknown: metrics::counter!("clawdeploy_edge_requests_total", "class" => "4xx", "route" => "unknown"),
            upstream_seconds: metrics::histogram!("clawdeploy_edge_upstream_seconds"),
        }
    }

    fn known(&self, status: StatusCode) -> &metrics::Counter {
        let i = (status.as_u16() / 100).clamp(1, 5) - 1;
        &self.known[usize::from(i)]
    }
}

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1).
/// Named once: a name given as a string is parsed on every use.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Who a connection's client is, as the edge tells the container: worked
/// out once per connection, not per request.
#[derive(Clone)]
pub struct Peer {
    /// The client's address as a header value (`X-Forwarded-For`).
    pub ip: HeaderValue,
}

impl Peer {
    pub fn new(addr: SocketAddr) -> Self {
        let ip = HeaderValue::from_str(&addr.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Self { ip }
    }
}

impl Proxy {
    pub fn new(routes: Arc<RouteTable>, limits: Limits) -> Self {
        Self {
            upstream: UpstreamPool::new(routes.clone(), limits.connect_timeout),
            routes,
            limits,
            meters: Meters::new(),
        }
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// Just the `Accept` header of `headers`, which is all an error page reads.
fn accept_only(headers: &HeaderMap) -> HeaderMap {
    let mut h = HeaderMap::new();
    if let Some(v) = headers.get(header::ACCEPT) {
        h.insert(header::ACCEPT, v.clone());
    }
    h
}

/// The edge's own answer: JSON `{error: {code, message}}`, or a small HTML
/// page for a browser.
pub fn error_page(
    headers: &HeaderMap,
    status: StatusCode,
    code: &str,
    message: &str,
) -> Response<Body> {
    let wants_html = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/html"));
    if wants_html {
        let title = status.canonical_reason().unwrap_or("Error");
        respond(
            status,
            "text/html; charset=utf-8",
            format!(
                "<!doctype html><html><head><meta charset=\"utf-8\"><title>{} {title} · ClawDeploy</title></head>\
                 <body style=\"font-family:system-ui,sans-serif;max-width:36rem;margin:4rem auto\">\
                 <h1>{title}</h1><p>{message}</p><p><small>{code} · ClawDeploy edge</small></p></body></html>",
                status.as_u16()
            ),
        )
    } else {
        respond(
            status,
            "application/json",
            serde_json::json!({"error": {"code": code, "message": message}}).to_string(),
        )
    }
}

fn not_found(headers: &HeaderMap) -> Response<Body> {
    error_page(
        headers,
        StatusCode::NOT_FOUND,
        "unknown_host",
        "No ClawDeploy instance lives at this address.",
    )
}

/// The answer for a suspended instance's hostname: `403`, saying why (in
/// JSON for API clients, HTML for browsers), without proxying.
pub fn paused(headers: &HeaderMap, reason: &str) -> Response<Body> {
    let message = match reason {
        "email_unverified" => {
            "This gateway is paused until its owner confirms their email address. \
             It resumes within seconds of the confirmation, with its data."
        }
        "account_deleted" => {
            "This gateway is paused: its owner's account is being deleted. \
             If the owner signs in again within 30 days, it resumes with its data."
        }
        _ => "This gateway is paused by its owner's account.",
    };
    error_page(headers, StatusCode::FORBIDDEN, "gateway_paused", message)
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.get(header::UPGRADE).is_some()
        && headers
            .get(header::CONNECTION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

/// Drops hop-by-hop headers, including any named by `Connection`.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over their few names (standard
    // names compare as tags) instead of a hashed removal per listed name.
    // Names that `Connection` lists matter only when it is there.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// The edge, not the client, says who the client is, and which host it
/// asked for (`host`: the normalized host, as a header value). `insert`
/// replaces whatever the client sent under the same name.
fn set_forwarded(
    headers: &mut HeaderMap,
    client: &Peer,
    host: Option<HeaderValue>,
    proto: &'static str,
) {
    headers.remove(X_FORWARDED_PORT);
    headers.remove(header::FORWARDED);
    headers.insert(X_FORWARDED_FOR, client.ip.clone());
    headers.insert(X_REAL_IP, client.ip.clone());
    match host {
        Some(h) => headers.insert(X_FORWARDED_HOST, h),
        None => headers.remove(X_FORWARDED_HOST),
    };
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
}

pub fn status_class(s: StatusCode) -> &'static str {
    match s.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

pub fn count(status: StatusCode, route: &'static str) {
    metrics::counter!("clawdeploy_edge_requests_total", "class" => status_class(status), "route" => route)
        .increment(1);
}

/// The host a request is for: `Host`, or the HTTP/2 `:authority`.
pub fn request_host<B>(req: &Request<B>) -> Option<&str> {
    req.headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
}

/// The most of a refused body read (and dropped) before answering 413.
const DISCARD_MAX_BYTES: u64 = 16 * 1024 * 1024;
/// How long reading a refused body may take before we answer anyway.
const DISCARD_FOR: std::time::Duration = std::time::Duration::from_secs(2);

/// Reads and drops `body` until it ends, `max` bytes have gone by, or `within` has passed.
async fn discard(mut body: Incoming, max: u64, within: std::time::Duration) {
    let drain = async {
        let mut seen = 0u64;
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, |d| d.len() as u64);
            if seen > max {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(within, drain).await;
}

/// Whether `e` (or what caused it) is the body cap tripping.
fn body_too_large(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<LengthLimitError>() {
            return true;
        }
        cur = err.source();
    }
    false
}

impl Proxy {
    /// The edge's 404 for a host it does not route, counted.
    pub fn unknown_host(&self, headers: &HeaderMap) -> Response<Body> {
        self.meters.unknown.increment(1);
        not_found(headers)
    }

    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        client: Peer,
        proto: &'static str,
    ) -> Result<Response<Body>, Infallible> {
        let found = request_host(&req)
            .and_then(normalize_host)
            .and_then(|h| self.routes.lookup(&h).map(|t| (h.into_owned(), t)));
        let Some((host, target)) = found else {
            return Ok(self.unknown_host(req.headers()));
        };
        if !target.paused.is_empty() {
            self.meters.known(StatusCode::FORBIDDEN).increment(1);
            return Ok(paused(req.headers(), &target.paused));
        }
        let proxy = self.clone();
        let resp = proxy.forward(req, client, proto, &host, target).await;
        self.meters.known(resp.status()).increment(1);
        Ok(resp)
    }

    async fn forward(
        self: Arc<Self>,
        req: Request<Incoming>,
        client: Peer,
        proto: &'static str,
        host: &str,
        target: Arc<Target>,
    ) -> Response<Body> {
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(n) = declared.filter(|&n| n > self.limits.max_body_bytes) {
            let (parts, body) = req.into_parts();
            // Like nginx's lingering close: a client still writing a modest
            // body would see a broken pipe instead of our 413 if we closed
            // under it, so read and drop up to a bound, briefly, first.
            if n <= DISCARD_MAX_BYTES {
                discard(body, DISCARD_MAX_BYTES, DISCARD_FOR).await;
            }
            return error_page(
                &parts.headers,
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                &format!(
                    "Request bodies are limited to {} bytes.",
                    self.limits.max_body_bytes
                ),
            );
        }
        // A route without an address: the container is stopped for a moment
        // (its state is being moved or backed up). Retryable, and said so.
        if target.upstream.is_empty() {
            let mut resp = error_page(
                req.headers(),
                StatusCode::SERVICE_UNAVAILABLE,
                "instance_moving",
                "This instance is being moved or backed up; try again in a moment.",
            );
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return resp;
        }
        // Origin form: the container sees the path, its host in `Host`.
        let uri = match req.uri().path_and_query() {
            Some(pq) => http::Uri::from(pq.clone()),
            None => http::Uri::from_static("/"),
        };
        let upgrade = is_upgrade(req.headers());
        let mut req = req;
        // The client's half of an upgrade lives in the request's extensions.
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let upgrade_proto = parts.headers.get(header::UPGRADE).cloned();
        let original_host = parts.headers.get(header::HOST).cloned();
        strip_hop_by_hop(&mut parts.headers);
        if let Some(proto) = upgrade_proto.filter(|_| upgrade) {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(header::UPGRADE, proto);
        }
        // The normalized host, as a header: the client's own value when
        // it was already normal (no copy).
        let normal_host = match &original_host {
            Some(h) if h.as_bytes() == host.as_bytes() => Some(h.clone()),
            _ => HeaderValue::from_str(host).ok(),
        };
        // The container sees the customer's host, whatever the client spoke.
        if let Some(h) = original_host.or_else(|| normal_host.clone()) {
            parts.headers.insert(header::HOST, h);
        }
        set_forwarded(&mut parts.headers, &client, normal_host, proto);
        parts.uri = uri;
        parts.version = http::Version::HTTP_11;
        // Error pages need only this of the request's headers (no copy of them all).
        let headers_for_errors = accept_only(&parts.headers);
        let body = Limited::new(body, self.limits.max_body_bytes as usize);
        let upstream_req = Request::from_parts(parts, body);

        let started = Instant::now();
        let key = upstream::key_of(&target).clone();
        let mut resp = match self.upstream.send(&key, upstream_req).await {
            Ok(r) => r,
            Err(e) if body_too_large(e.as_ref()) => {
                return error_page(
                    &headers_for_errors,
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    &format!(
                        "Request bodies are limited to {} bytes.",
                        self.limits.max_body_bytes
                    ),
                );
            }
            Err(e) => {
                tracing::debug!(host, container = target.container_id, error = %e, "upstream request failed");
                return error_page(
                    &headers_for_errors,
                    StatusCode::BAD_GATEWAY,
                    "upstream_unavailable",
                    "The instance did not answer.",
                );
            }
        };
        self.meters
            .upstream_seconds
            .record(started.elapsed().as_secs_f64());

        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let Some(client_upgrade) = client_upgrade else {
                return error_page(
                    &headers_for_errors,
                    StatusCode::BAD_GATEWAY,
                    "bad_upgrade",
                    "The instance switched protocols unasked.",
                );
            };
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            let (routes, idle) = (self.routes.clone(), self.limits.ws_idle_timeout);
            let host = host.to_owned();
            tokio::spawn(async move {
                let (c, u) = match tokio::try_join!(client_upgrade, upstream_upgrade) {
                    Ok(pair) => pair,
                    Err(e) => return tracing::debug!(error = %e, "upgrade failed"),
                };
                splice(
                    TokioIo::new(c),
                    TokioIo::new(u),
                    &routes,
                    &host,
                    &target,
                    idle,
                )
                .await;
            });
            let (parts, _) = resp.into_parts();
            return Response::from_parts(
                parts,
                http_body_util::Empty::new()
                    .map_err(|never| match never {})
                    .boxed(),
            );
        }
        strip_hop_by_hop(resp.headers_mut());
        resp
    }
}

/// Copies bytes both ways until either side closes, the tunnel idles out,
/// or the route stops naming this container (a released host loses its
/// live WebSockets too).
async fn splice<C, U>(
    client: C,
    upstream: U,
    routes: &RouteTable,
    host: &str,
    target: &Target,
    idle: std::time::Duration,
) where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let activity = Activity::default();
    let mut client = Tracked::new(client, activity.clone());
    let mut upstream = upstream;
    let mut changes = routes.subscribe();
    let route_gone = async {
        while changes.changed().await.is_ok() {
            if routes
                .lookup(host)
                .is_none_or(|t| t.container_id != target.container_id || !t.paused.is_empty())
            {
                return;
            }
        }
        std::future::pending::<()>().await
    };
    metrics::gauge!("clawdeploy_edge_websockets").increment(1.0);
    let ended = tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => "closed",
        _ = activity.idle_for(idle) => "idle",
        _ = route_gone => "route_changed",
    };
    metrics::gauge!("clawdeploy_edge_websockets").decrement(1.0);
    metrics::counter!("clawdeploy_edge_websockets_ended_total", "reason" => ended).increment(1);
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    #[tokio::test]
    async fn a_paused_gateway_is_answered_by_the_edge_saying_why() {
        let r = paused(&HeaderMap::new(), "email_unverified");
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        let body = r.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "gateway_paused");
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("confirms their email address"));
        let mut browser = HeaderMap::new();
        browser.insert(header::ACCEPT, HeaderValue::from_static("text/html"));
        let page = paused(&browser, "email_unverified");
        let body = page.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&body).contains("gateway_paused"));
    }
}
