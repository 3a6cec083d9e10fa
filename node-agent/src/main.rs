//! `clawdeploy-agent`: parses configuration, sets up tracing, connects to
//! Docker and runs the agent library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use clawdeploy_agent::runtime::DockerRuntime;
use clawdeploy_agent::session::SessionConfig;
use clawdeploy_proto::client::SchedulerEndpoint;
use clawdeploy_proto::NodeCapacity;

#[derive(Parser)]
#[command(name = "clawdeploy-agent", version, about = "ClawDeploy node agent")]
struct Args {
    /// This node's id; must match the id in its certificate.
    #[arg(long, env = "CLAWDEPLOY_NODE_ID")]
    node_id: String,
    #[arg(
        long,
        env = "CLAWDEPLOY_SCHEDULER_URL",
        default_value = "https://127.0.0.1:7443"
    )]
    scheduler_url: String,
    /// Name the scheduler's certificate must carry.
    #[arg(long, env = "CLAWDEPLOY_SCHEDULER_NAME", default_value = "localhost")]
    scheduler_name: String,
    /// Directory with ca.crt.pem, <node-id>.crt.pem and <node-id>.key.pem.
    #[arg(long, env = "CLAWDEPLOY_TLS_DIR")]
    tls_dir: PathBuf,
    /// Ledger and tenant state volumes live here.
    #[arg(long, env = "CLAWDEPLOY_STATE_DIR")]
    state_dir: PathBuf,
    #[arg(long, env = "DOCKER_SOCKET", default_value = "/var/run/docker.sock")]
    docker_socket: String,
    /// Tenant network on this node (default clawdeploy-<node-id>).
    #[arg(long, env = "CLAWDEPLOY_NETWORK")]
    network: Option<String>,
    /// Subnet for the tenant network (default: Docker picks one).
    #[arg(long, env = "CLAWDEPLOY_SUBNET")]
    subnet: Option<String>,
    #[arg(
        long,
        env = "CLAWDEPLOY_METRICS_LISTEN",
        default_value = "127.0.0.1:9101"
    )]
    metrics_listen: SocketAddr,
    #[arg(long, env = "CLAWDEPLOY_MAX_CONTAINERS", default_value_t = 20)]
    max_containers: u32,
    #[arg(long, env = "CLAWDEPLOY_PRIVATE_ADDRESS", default_value = "")]
    private_address: String,
    #[arg(long, env = "CLAWDEPLOY_HEARTBEAT_MS", default_value_t = 2000)]
    heartbeat_ms: u64,
    /// Containers created at once; more wait their turn.
    #[arg(long, env = "CLAWDEPLOY_MAX_PARALLEL_CREATES", default_value_t = 2)]
    max_parallel_creates: usize,
}

fn memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let a = Args::parse();
    let network = a
        .network
        .unwrap_or_else(|| format!("clawdeploy-{}", a.node_id));
    let runtime = DockerRuntime::connect(
        &a.docker_socket,
        &a.node_id,
        network,
        a.subnet,
        a.state_dir.join("volumes"),
    )
    .await
    .context("connecting to Docker")?;
    let metrics = tokio::net::TcpListener::bind(a.metrics_listen)
        .await
        .with_context(|| format!("binding {}", a.metrics_listen))?;
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let session = SessionConfig {
        scheduler: SchedulerEndpoint {
            url: a.scheduler_url,
            server_name: a.scheduler_name,
            ca_file: a.tls_dir.join("ca.crt.pem"),
            cert_file: a.tls_dir.join(format!("{}.crt.pem", a.node_id)),
            key_file: a.tls_dir.join(format!("{}.key.pem", a.node_id)),
        },
        capacity: NodeCapacity {
            cpu_millis: cpus * 1000,
            memory_bytes: memory_bytes(),
            max_containers: a.max_containers,
        },
        private_address: a.private_address,
        heartbeat_every: Duration::from_millis(a.heartbeat_ms),
        node_id: a.node_id,
    };
    clawdeploy_agent::run(
        session,
        a.state_dir,
        runtime,
        a.max_parallel_creates,
        metrics,
        shutdown_signal(),
    )
    .await
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
