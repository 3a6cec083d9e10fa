//! `clawdeploy-edge`: parses configuration, sets up tracing and runs the
//! edge library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use clawdeploy_edge::{serve, CertFiles, EdgeConfig, Limits, Listeners};

/// mimalloc: per-thread heaps suit the edge's thread-per-core workers,
/// each allocating and freeing its own requests' memory.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "clawdeploy-edge", version, about = "ClawDeploy edge router")]
struct Args {
    #[arg(long, env = "CLAWDEPLOY_EDGE_ID")]
    edge_id: String,
    #[arg(long, env = "CLAWDEPLOY_EDGE_LISTEN", default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    #[arg(
        long,
        env = "CLAWDEPLOY_EDGE_ADMIN_LISTEN",
        default_value = "127.0.0.1:9102"
    )]
    admin_listen: SocketAddr,
    #[command(flatten)]
    scheduler: clawdeploy_common::endpoint::SchedulerArgs,
    /// Directory with ca.crt.pem, <edge-id>.crt.pem and <edge-id>.key.pem.
    #[arg(long, env = "CLAWDEPLOY_TLS_DIR")]
    tls_dir: PathBuf,
    /// Where the last route table is kept for starts without the scheduler.
    #[arg(long, env = "CLAWDEPLOY_ROUTE_CACHE")]
    route_cache: Option<PathBuf>,
    /// HTTPS listener; with it, `--listen` only redirects to HTTPS.
    #[arg(long, env = "CLAWDEPLOY_EDGE_TLS_LISTEN", requires = "tls_cert")]
    tls_listen: Option<SocketAddr>,
    /// PEM certificate chains (comma-separated; the first is the default
    /// when SNI names none), e.g. the `*.<base_domain>` wildcard.
    #[arg(
        long,
        env = "CLAWDEPLOY_EDGE_TLS_CERT",
        value_delimiter = ',',
        requires = "tls_key"
    )]
    tls_cert: Vec<PathBuf>,
    /// PEM private keys, one per certificate, in the same order.
    #[arg(long, env = "CLAWDEPLOY_EDGE_TLS_KEY", value_delimiter = ',')]
    tls_key: Vec<PathBuf>,
    /// How often the certificate files are checked for changes.
    #[arg(long, env = "CLAWDEPLOY_EDGE_CERT_CHECK_SECS", default_value_t = 2)]
    cert_check_secs: u64,
    /// The port HTTPS redirects name (443 when a load balancer maps it).
    #[arg(long, env = "CLAWDEPLOY_EDGE_PUBLIC_HTTPS_PORT")]
    public_https_port: Option<u16>,
    #[arg(long, env = "CLAWDEPLOY_EDGE_MAX_HEADER_BYTES", default_value_t = 32 * 1024)]
    max_header_bytes: usize,
    #[arg(long, env = "CLAWDEPLOY_EDGE_MAX_BODY_BYTES", default_value_t = 256 * 1024 * 1024)]
    max_body_bytes: u64,
    #[arg(long, env = "CLAWDEPLOY_EDGE_MAX_CONNS_PER_IP", default_value_t = 1024)]
    max_conns_per_ip: u32,
    #[arg(
        long,
        env = "CLAWDEPLOY_EDGE_CONNECT_TIMEOUT_MS",
        default_value_t = 3000
    )]
    connect_timeout_ms: u64,
    /// For the TLS handshake and for each request head.
    #[arg(
        long,
        env = "CLAWDEPLOY_EDGE_HEADER_TIMEOUT_SECS",
        default_value_t = 10
    )]
    header_timeout_secs: u64,
    #[arg(long, env = "CLAWDEPLOY_EDGE_IDLE_TIMEOUT_SECS", default_value_t = 120)]
    idle_timeout_secs: u64,
    #[arg(
        long,
        env = "CLAWDEPLOY_EDGE_WS_IDLE_TIMEOUT_SECS",
        default_value_t = 3600
    )]
    ws_idle_timeout_secs: u64,
    /// Load balancers in front of the edge (address ranges, comma-
    /// separated): their connections must start with a PROXY protocol
    /// header (v1 or v2) naming the client; connections from anywhere else
    /// are direct clients. Empty: no PROXY protocol.
    #[arg(
        long,
        env = "CLAWDEPLOY_EDGE_PROXY_PROTOCOL_FROM",
        value_delimiter = ','
    )]
    proxy_protocol_from: Vec<clawdeploy_edge::proxy_protocol::Cidr>,
    /// Threads serving client connections, each with its own runtime and
    /// upstream pool (0: one per core).
    #[arg(long, env = "CLAWDEPLOY_EDGE_WORKERS", default_value_t = 0)]
    workers: usize,
    /// Pin each worker to a CPU of its own (the i-th the edge may run on,
    /// wrapping round), as on a host that runs the edge alone.
    #[arg(
        long,
        env = "CLAWDEPLOY_EDGE_PIN_WORKERS",
        default_value_t = false,
        action = clap::ArgAction::Set
    )]
    pin_workers: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    clawdeploy_common::telemetry::init_tracing("info");
    let a = Args::parse();
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("binding {}", a.listen))?;
    let admin = tokio::net::TcpListener::bind(a.admin_listen)
        .await
        .with_context(|| format!("binding {}", a.admin_listen))?;
    let https = match a.tls_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {addr}"))?,
        ),
        None => None,
    };
    if a.tls_cert.len() != a.tls_key.len() {
        anyhow::bail!("--tls-cert and --tls-key must name as many files each");
    }
    tracing::info!(
        listen = %listener.local_addr()?,
        tls = ?https.as_ref().map(|l| l.local_addr()).transpose()?,
        admin = %admin.local_addr()?,
        "edge listening"
    );
    let cfg = EdgeConfig {
        watch: a.scheduler.endpoint(&a.tls_dir, &a.edge_id),
        cache_file: a.route_cache,
        certs: a
            .tls_cert
            .into_iter()
            .zip(a.tls_key)
            .map(|(cert, key)| CertFiles { cert, key })
            .collect(),
        cert_check_every: Duration::from_secs(a.cert_check_secs.max(1)),
        public_https_port: a.public_https_port,
        limits: Limits {
            max_header_bytes: a.max_header_bytes,
            max_body_bytes: a.max_body_bytes,
            max_conns_per_ip: a.max_conns_per_ip,
            connect_timeout: Duration::from_millis(a.connect_timeout_ms),
            header_timeout: Duration::from_secs(a.header_timeout_secs),
            idle_timeout: Duration::from_secs(a.idle_timeout_secs),
            ws_idle_timeout: Duration::from_secs(a.ws_idle_timeout_secs),
        },
        proxy_protocol_from: a.proxy_protocol_from,
        workers: a.workers,
        pin_workers: a.pin_workers,
    };
    let listeners = Listeners {
        http: listener,
        https,
        admin,
    };
    Ok(serve(cfg, listeners, clawdeploy_common::shutdown::signal()).await?)
}
