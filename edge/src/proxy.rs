//! The public reverse proxy: `Host: <sub>.<base_domain>` → the container the
//! route names. HTTP/1.1 and HTTP/2 (h2c here; TLS comes with the edge
//! issue), WebSocket upgrades spliced end to end, bodies streamed both ways,
//! upstream connections pooled. Unknown hosts get the edge's own 404.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::routes::{normalize_host, RouteTable};

pub type Body = BoxBody<Bytes, hyper::Error>;

pub struct Proxy {
    pub routes: Arc<RouteTable>,
    client: Client<HttpConnector, Incoming>,
}

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];

impl Proxy {
    pub fn new(routes: Arc<RouteTable>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(3)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(64)
            .timer(TokioTimer::new())
            .build(connector);
        Self { routes, client }
    }
}

fn full(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from_static(body.as_bytes()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn not_found() -> Response<Body> {
    full(
        StatusCode::NOT_FOUND,
        r#"{"error":{"code":"unknown_host","message":"no ClawDeploy instance lives at this address"}}"#,
    )
}

fn bad_gateway() -> Response<Body> {
    full(
        StatusCode::BAD_GATEWAY,
        r#"{"error":{"code":"upstream_unavailable","message":"the instance did not answer"}}"#,
    )
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
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
}

/// The edge, not the client, says who the client is.
fn set_forwarded(headers: &mut HeaderMap, client: SocketAddr, host: &str, proto: &'static str) {
    for h in [
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-real-ip",
        "forwarded",
    ] {
        headers.remove(h);
    }
    if let Ok(v) = HeaderValue::from_str(&client.ip().to_string()) {
        headers.insert("x-forwarded-for", v.clone());
        headers.insert("x-real-ip", v);
    }
    if let Ok(v) = HeaderValue::from_str(host) {
        headers.insert("x-forwarded-host", v);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static(proto));
}

fn status_class(s: StatusCode) -> &'static str {
    match s.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

impl Proxy {
    pub async fn handle(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        client: SocketAddr,
    ) -> Result<Response<Body>, Infallible> {
        let raw_host = req
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .or_else(|| req.uri().authority().map(|a| a.to_string()));
        let host = raw_host.as_deref().and_then(normalize_host);
        let Some((host, target)) = host.and_then(|h| self.routes.lookup(&h).map(|t| (h, t))) else {
            metrics::counter!("clawdeploy_edge_requests_total", "class" => "4xx", "route" => "unknown").increment(1);
            return Ok(not_found());
        };
        let upgrade = is_upgrade(req.headers());
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let Ok(uri) = format!("http://{}{path}", target.upstream).parse() else {
            return Ok(bad_gateway());
        };
        *req.uri_mut() = uri;
        *req.version_mut() = http::Version::HTTP_11;
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let upgrade_proto = req.headers().get(header::UPGRADE).cloned();
        strip_hop_by_hop(req.headers_mut());
        if let Some(proto) = upgrade_proto.filter(|_| upgrade) {
            req.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            req.headers_mut().insert(header::UPGRADE, proto);
        }
        set_forwarded(req.headers_mut(), client, &host, "http");

        let started = Instant::now();
        let mut resp = match self.client.request(req).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(host, upstream = target.upstream, error = %e, "upstream request failed");
                metrics::counter!("clawdeploy_edge_requests_total", "class" => "5xx", "route" => "known").increment(1);
                return Ok(bad_gateway());
            }
        };
        metrics::histogram!("clawdeploy_edge_upstream_seconds")
            .record(started.elapsed().as_secs_f64());
        metrics::counter!("clawdeploy_edge_requests_total", "class" => status_class(resp.status()), "route" => "known").increment(1);

        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let Some(client_upgrade) = client_upgrade else {
                return Ok(bad_gateway());
            };
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                let (c, u) = match tokio::try_join!(client_upgrade, upstream_upgrade) {
                    Ok(pair) => pair,
                    Err(e) => return tracing::debug!(error = %e, "upgrade failed"),
                };
                metrics::gauge!("clawdeploy_edge_websockets").increment(1.0);
                let _ =
                    tokio::io::copy_bidirectional(&mut TokioIo::new(c), &mut TokioIo::new(u)).await;
                metrics::gauge!("clawdeploy_edge_websockets").decrement(1.0);
            });
            let (parts, _) = resp.into_parts();
            return Ok(Response::from_parts(
                parts,
                http_body_util::Empty::new()
                    .map_err(|never| match never {})
                    .boxed(),
            ));
        }
        strip_hop_by_hop(resp.headers_mut());
        Ok(resp.map(|b| b.boxed()))
    }
}

/// Accepts connections until `shutdown` resolves.
pub async fn serve(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    let builder = Arc::new(builder);
    loop {
        let (stream, client) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let _ = stream.set_nodelay(true);
        let (proxy, builder) = (proxy.clone(), builder.clone());
        tokio::spawn(async move {
            metrics::gauge!("clawdeploy_edge_connections").increment(1.0);
            let service = hyper::service::service_fn(move |req| proxy.clone().handle(req, client));
            if let Err(e) = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            metrics::gauge!("clawdeploy_edge_connections").decrement(1.0);
        });
    }
}
