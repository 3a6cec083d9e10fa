//! ClawDeploy edge: the public entry to customers' gateways. It maps
//! `<sub>.<base_domain>` to the tenant container named by the route table
//! that the scheduler streams to it, and serves its own 404 for anything
//! else. With certificates configured it terminates TLS and the plain
//! listener redirects to HTTPS.

pub mod conn;
pub mod connection;
pub mod error;
pub mod proxy;
pub mod proxy_protocol;
pub mod routes;
pub mod server;
pub mod telemetry;
pub mod tls;
pub mod upstream;
pub mod watch;
pub mod workers;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use tokio::net::TcpListener;

pub use error::{Error, Result};

pub use tls::CertFiles;
pub use watch::WatchConfig;

/// Bounds on what one client may ask of the edge.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Request head (line and headers) and HTTP/2 header list, in bytes.
    pub max_header_bytes: usize,
    /// Request body, in bytes (declared or streamed).
    pub max_body_bytes: u64,
    pub max_conns_per_ip: u32,
    pub connect_timeout: Duration,
    /// For the TLS handshake and for a request head to arrive.
    pub header_timeout: Duration,
    /// No bytes either way for this long closes a connection.
    pub idle_timeout: Duration,
    /// The same for a spliced WebSocket.
    pub ws_idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 32 * 1024,
            max_body_bytes: 256 * 1024 * 1024,
            max_conns_per_ip: 1024,
            connect_timeout: Duration::from_secs(3),
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            ws_idle_timeout: Duration::from_secs(3600),
        }
    }
}

pub struct EdgeConfig {
    pub watch: WatchConfig,
    pub cache_file: Option<PathBuf>,
    /// Certificate and key files; empty: no TLS.
    pub certs: Vec<CertFiles>,
    /// How often the certificate files are checked for changes.
    pub cert_check_every: Duration,
    /// The HTTPS port redirects name (the public one: 443 behind a plain
    /// port mapping); the TLS listener's own port when unset.
    pub public_https_port: Option<u16>,
    pub limits: Limits,
    /// Load balancers whose connections start with a PROXY protocol header
    /// (on every public listener); empty: none.
    pub proxy_protocol_from: Vec<proxy_protocol::Cidr>,
    /// Threads serving connections (each with its own runtime and upstream
    /// pool); 0: one per core.
    pub workers: usize,
    /// Pin worker *i* to the *i*-th CPU the edge may run on.
    pub pin_workers: bool,
}

/// The sockets the edge serves on.
pub struct Listeners {
    /// Plain HTTP: the proxy itself, or a redirect to HTTPS when TLS is on.
    pub http: TcpListener,
    /// TLS; required when certificates are configured.
    pub https: Option<TcpListener>,
    /// Metrics, health and the route table's status.
    pub admin: TcpListener,
}

/// Runs the edge until `shutdown` resolves.
pub async fn serve(
    cfg: EdgeConfig,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let handle = clawdeploy_common::metrics::install(telemetry::CATALOG, telemetry::BUCKETS)?;
    let table = Arc::new(routes::RouteTable::load(cfg.cache_file));
    let tls = match (cfg.certs.is_empty(), &listeners.https) {
        (true, None) => None,
        (false, Some(l)) => {
            let store = tls::CertStore::load(cfg.certs.clone(), Some(table.clone()))?;
            let port = match cfg.public_https_port {
                Some(p) => p,
                None => l
                    .local_addr()
                    .map_err(Error::io("the HTTPS listener"))?
                    .port(),
            };
            Some((store, port))
        }
        (true, Some(_)) => {
            return Err(Error::Config(
                "an HTTPS listener needs a certificate and key",
            ))
        }
        (false, None) => {
            return Err(Error::Config(
                "certificates are configured but no HTTPS listener",
            ))
        }
    };
    let mut background = vec![
        tokio::spawn(watch::run(cfg.watch, table.clone())),
        tokio::spawn(table.clone().persist_changes()),
    ];
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let status_table = table.clone();
    let admin_app =
        axum::Router::new()
            .route("/metrics", get(move || std::future::ready(handle.render())))
            .route("/healthz", get(|| async { "ok" }))
            .route(
                "/routes",
                get(move || {
                    let t = status_table.clone();
                    async move {
                        axum::Json(serde_json::json!({"routes": t.len(), "version": t.version()}))
                    }
                }),
            );
    let mut admin_stop = stop_rx.clone();
    let admin = listeners.admin;
    let mut tasks = vec![tokio::spawn(async move {
        let r = axum::serve(admin, admin_app)
            .with_graceful_shutdown(async move {
                let _ = admin_stop.changed().await;
            })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "admin listener failed");
        }
    })];
    // One worker per core, each with its own upstream pool; the per-address
    // connection limit is the edge's, whichever worker serves.
    let per_ip = conn::PerIpLimit::new(cfg.limits.max_conns_per_ip);
    let workers = if cfg.workers == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        cfg.workers
    };
    let fronts = (0..workers)
        .map(|_| {
            connection::Front::new(
                Arc::new(proxy::Proxy::new(table.clone(), cfg.limits.clone())),
                cfg.limits.clone(),
                cfg.proxy_protocol_from.clone(),
                per_ip.clone(),
            )
        })
        .collect();
    let (pool, threads) = workers::Workers::start(fronts, cfg.pin_workers, stop_rx.clone())
        .map_err(Error::io("starting the edge's workers"))?;
    tracing::info!(workers, "edge workers started");
    match (tls, listeners.https) {
        (Some((store, https_port)), Some(https)) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(store.server_config()?);
            background.push(tokio::spawn(store.watch(cfg.cert_check_every)));
            tasks.push(tokio::spawn(server::serve(
                pool.clone(),
                https,
                Some(acceptor),
                connection::Mode::Proxy,
                stop_rx.clone(),
            )));
            tasks.push(tokio::spawn(server::serve(
                pool,
                listeners.http,
                None,
                connection::Mode::RedirectTo { https_port },
                stop_rx,
            )));
        }
        _ => tasks.push(tokio::spawn(server::serve(
            pool,
            listeners.http,
            None,
            connection::Mode::Proxy,
            stop_rx,
        ))),
    }
    shutdown.await;
    let _ = stop_tx.send(true);
    for t in &background {
        t.abort();
    }
    if let Err(e) = table.save() {
        tracing::warn!(error = %e, "route cache not written at shutdown");
    }
    for t in tasks {
        let _ = t.await;
    }
    // The accept loops are done (and with them every handle on the
    // workers); the workers end at the stop signal.
    let _ = tokio::task::spawn_blocking(move || threads.into_iter().for_each(|t| t.join())).await;
    Ok(())
}
