//! One client connection on a worker's runtime: the PROXY protocol header
//! from a trusted balancer, the per-address connection limit, the TLS
//! handshake (bounded by the header timeout), HTTP/1.1 and HTTP/2 on one
//! socket, the idle timeout, ACME HTTP-01 answers on the plain listener,
//! and, on the plain listener when TLS is on, the redirect to HTTPS.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsAcceptor;

use crate::conn::{Activity, IpSlot, PerIpLimit, Tracked};
use crate::proxy::{count, error_page, request_host, Body, Proxy};
use crate::proxy_protocol::{self, Cidr};
use crate::routes::normalize_host;
use crate::Limits;

/// What a listener does with requests.
#[derive(Clone, Copy, Debug)]
pub enum Mode {
    /// Route them to tenants.
    Proxy,
    /// Send them to the same URL over HTTPS on this port.
    RedirectTo { https_port: u16 },
}

/// What every connection a worker serves shares: one per worker (its own
/// upstream pool), with the per-address limit shared by all.
pub struct Front {
    pub proxy: Arc<Proxy>,
    pub limits: Limits,
    pub per_ip: Arc<PerIpLimit>,
    /// Peers whose connections start with a PROXY protocol header.
    pub proxy_from: Vec<Cidr>,
    builder: auto::Builder<TokioExecutor>,
}

impl Front {
    pub fn new(
        proxy: Arc<Proxy>,
        limits: Limits,
        proxy_from: Vec<Cidr>,
        per_ip: Arc<PerIpLimit>,
    ) -> Arc<Self> {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            // hyper answers 431 when the request head outgrows this.
            .max_buf_size(limits.max_header_bytes.max(8192));
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(limits.max_header_bytes as u32)
            .max_concurrent_streams(256)
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(20));
        Arc::new(Self {
            per_ip,
            proxy_from,
            proxy,
            limits,
            builder,
        })
    }
}

/// An accepted connection on its way to a worker: a plain socket (not yet
/// registered with any runtime's reactor), who sent it and how to serve it.
pub struct Accepted {
    pub stream: std::net::TcpStream,
    pub peer: SocketAddr,
    pub tls: Option<TlsAcceptor>,
    pub mode: Mode,
}

/// `308` to the same host and path over HTTPS, for the hosts the edge
/// routes.
fn redirect<B>(proxy: &Proxy, req: &Request<B>, https_port: u16) -> Response<Body> {
    let Some(host) = request_host(req).and_then(normalize_host) else {
        count(StatusCode::BAD_REQUEST, "redirect");
        return error_page(
            req.headers(),
            StatusCode::BAD_REQUEST,
            "bad_host",
            "The request names no valid host.",
        );
    };
    // An unknown host gets the same 404 as over HTTPS (a custom domain that
    // is switched off, too), not a redirect to a name nobody serves.
    if proxy.routes.lookup(&host).is_none() {
        return proxy.unknown_host(req.headers());
    }
    let port = if https_port == 443 {
        String::new()
    } else {
        format!(":{https_port}")
    };
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let mut resp = error_page(
        req.headers(),
        StatusCode::PERMANENT_REDIRECT,
        "https_required",
        "This address is served over HTTPS.",
    );
    if let Ok(v) = HeaderValue::from_str(&format!("https://{host}{port}{path}")) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    count(StatusCode::PERMANENT_REDIRECT, "redirect");
    resp
}

const ACME_PREFIX: &str = "/.well-known/acme-challenge/";

/// The answer to an ACME HTTP-01 request, when `req` is one: the key
/// authorization the route table holds for its host and token, or 404.
fn acme_answer<B>(proxy: &Proxy, req: &Request<B>) -> Option<Response<Body>> {
    let token = req.uri().path().strip_prefix(ACME_PREFIX)?;
    let host = request_host(req).and_then(normalize_host);
    let found = host.and_then(|h| proxy.routes.challenge(&h, token));
    let outcome = if found.is_some() {
        "answered"
    } else {
        "unknown"
    };
    metrics::counter!("clawdeploy_edge_acme_challenges_total", "result" => outcome).increment(1);
    Some(match found {
        Some(key_auth) => {
            let mut r = Response::new(
                http_body_util::Full::new(bytes::Bytes::from(key_auth))
                    .map_err(|never| match never {})
                    .boxed(),
            );
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            r
        }
        None => error_page(
            req.headers(),
            StatusCode::NOT_FOUND,
            "unknown_challenge",
            "No such ACME challenge here.",
        ),
    })
}

/// Serves one accepted connection on the current (worker's) runtime.
/// Connections from `Front::proxy_from` start with a PROXY protocol header
/// naming the client, which then stands for the peer everywhere (limits,
/// logs, `X-Forwarded-For`).
pub async fn accepted(front: Arc<Front>, conn: Accepted) {
    let Accepted {
        stream,
        peer,
        tls,
        mode,
    } = conn;
    let mut stream = match tokio::net::TcpStream::from_std(stream) {
        Ok(s) => s,
        Err(e) => return tracing::debug!(%peer, error = %e, "socket not registered"),
    };
    let behind_balancer = front.proxy_from.iter().any(|r| r.contains(peer.ip()));
    let client = if behind_balancer {
        let header = tokio::time::timeout(
            front.limits.header_timeout,
            proxy_protocol::read_header(&mut stream),
        )
        .await;
        match header {
            Ok(Ok(client)) => client.unwrap_or(peer),
            Ok(Err(e)) => {
                metrics::counter!("clawdeploy_edge_connections_refused_total", "reason" => "proxy_header").increment(1);
                tracing::debug!(%peer, error = %e, "connection refused: PROXY header");
                return;
            }
            Err(_) => {
                metrics::counter!("clawdeploy_edge_timeouts_total", "kind" => "proxy_header")
                    .increment(1);
                return;
            }
        }
    } else {
        peer
    };
    if let Some(slot) = acquire(&front, client) {
        connection(front, stream, client, tls, mode, slot).await;
    }
}

/// A connection slot for `client`'s address, or `None` (counted) when it
/// has used up its limit.
fn acquire(front: &Front, client: SocketAddr) -> Option<IpSlot> {
    let slot = front.per_ip.acquire(client.ip());
    if slot.is_none() {
        metrics::counter!("clawdeploy_edge_connections_refused_total", "reason" => "per_address_limit").increment(1);
        tracing::debug!(%client, "connection refused: per-address limit");
    }
    slot
}

/// One client connection: the TLS handshake (on the TLS listener), then
/// HTTP until it ends or idles out.
async fn connection(
    front: Arc<Front>,
    stream: tokio::net::TcpStream,
    client: SocketAddr,
    tls: Option<TlsAcceptor>,
    mode: Mode,
    slot: IpSlot,
) {
    let _slot = slot;
    let activity = Activity::default();
    metrics::gauge!("clawdeploy_edge_connections").increment(1.0);
    match tls {
        Some(acceptor) => {
            let handshake = acceptor.accept(stream);
            match tokio::time::timeout(front.limits.header_timeout, handshake).await {
                Ok(Ok(s)) => {
                    let io = Tracked::new(s, activity.clone());
                    serve_connection(&front, io, activity, client, "https", mode).await
                }
                Ok(Err(e)) => {
                    metrics::counter!("clawdeploy_edge_tls_handshake_failures_total").increment(1);
                    tracing::debug!(%client, error = %e, "TLS handshake failed");
                }
                Err(_) => {
                    metrics::counter!("clawdeploy_edge_timeouts_total", "kind" => "handshake")
                        .increment(1);
                }
            }
        }
        None => {
            let io = Tracked::new(stream, activity.clone());
            serve_connection(&front, io, activity, client, "http", mode).await
        }
    }
    metrics::gauge!("clawdeploy_edge_connections").decrement(1.0);
}

async fn serve_connection<I>(
    front: &Arc<Front>,
    io: I,
    activity: Activity,
    client: SocketAddr,
    proto: &'static str,
    mode: Mode,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let proxy = front.proxy.clone();
    let plain = proto == "http";
    let peer = crate::proxy::Peer::new(client);
    let service = hyper::service::service_fn(move |req| {
        let proxy = proxy.clone();
        let peer = peer.clone();
        async move {
            // The CA validates over plain HTTP on every edge.
            if plain {
                if let Some(answer) = acme_answer(&proxy, &req) {
                    return Ok(answer);
                }
            }
            match mode {
                Mode::Proxy => proxy.handle(req, peer, proto).await,
                Mode::RedirectTo { https_port } => Ok(redirect(&proxy, &req, https_port)),
            }
        }
    });
    let conn = front
        .builder
        .serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => if let Err(e) = r {
            tracing::debug!(%client, error = %e, "connection ended with an error");
        },
        _ = activity.idle_for(front.limits.idle_timeout) => {
            metrics::counter!("clawdeploy_edge_timeouts_total", "kind" => "idle").increment(1);
        }
    }
}
