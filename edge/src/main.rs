//! `clawdeploy-edge`: parses configuration, sets up tracing and runs the
//! edge library.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use clawdeploy_edge::{serve, EdgeConfig, WatchConfig};

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
    /// Scheduler gRPC addresses, comma-separated: the edge fails over
    /// down the list when the one it watches stops answering.
    #[arg(
        long,
        env = "CLAWDEPLOY_SCHEDULER_URL",
        value_delimiter = ',',
        default_value = "https://127.0.0.1:7443"
    )]
    scheduler_url: Vec<String>,
    #[arg(long, env = "CLAWDEPLOY_SCHEDULER_NAME", default_value = "localhost")]
    scheduler_name: String,
    /// Directory with ca.crt.pem, <edge-id>.crt.pem and <edge-id>.key.pem.
    #[arg(long, env = "CLAWDEPLOY_TLS_DIR")]
    tls_dir: PathBuf,
    /// Where the last route table is kept for starts without the scheduler.
    #[arg(long, env = "CLAWDEPLOY_ROUTE_CACHE")]
    route_cache: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let a = Args::parse();
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("binding {}", a.listen))?;
    let admin = tokio::net::TcpListener::bind(a.admin_listen)
        .await
        .with_context(|| format!("binding {}", a.admin_listen))?;
    tracing::info!(listen = %listener.local_addr()?, admin = %admin.local_addr()?, "edge listening");
    let cfg = EdgeConfig {
        watch: WatchConfig {
            urls: a.scheduler_url,
            current: Default::default(),
            server_name: a.scheduler_name,
            ca_file: a.tls_dir.join("ca.crt.pem"),
            cert_file: a.tls_dir.join(format!("{}.crt.pem", a.edge_id)),
            key_file: a.tls_dir.join(format!("{}.key.pem", a.edge_id)),
        },
        cache_file: a.route_cache,
    };
    serve(cfg, listener, admin, async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    })
    .await
}
