//! `clawdeploy-agent`: parses configuration, sets up tracing, connects to
//! Docker and runs the agent library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use clawdeploy_agent::enroll::{self, TlsFiles};
use clawdeploy_agent::runtime::DockerRuntime;
use clawdeploy_agent::session::SessionConfig;
use clawdeploy_common::Backoff;
use clawdeploy_proto::client::SchedulerEndpoint;
use clawdeploy_proto::NodeCapacity;

#[derive(Parser)]
#[command(name = "clawdeploy-agent", version, about = "ClawDeploy node agent")]
struct Args {
    /// This node's id; must match the id in its certificate.
    #[arg(long, env = "CLAWDEPLOY_NODE_ID")]
    node_id: String,
    #[command(flatten)]
    scheduler: clawdeploy_common::endpoint::SchedulerArgs,
    /// Directory with ca.crt.pem, <node-id>.crt.pem and <node-id>.key.pem
    /// (written by the join when absent).
    #[arg(long, env = "CLAWDEPLOY_TLS_DIR")]
    tls_dir: PathBuf,
    /// One-time join token `<id>.<secret>` from the operator; used only when
    /// the TLS directory holds no certificate yet.
    #[arg(long, env = "CLAWDEPLOY_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// `sha256:<hex>` of the scheduler's CA, given with the join token; the
    /// agent trusts nothing else on its first contact.
    #[arg(long, env = "CLAWDEPLOY_CA_PIN")]
    ca_pin: Option<String>,
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
    /// Install the host firewall rules that isolate tenants (DOCKER-USER
    /// and INPUT); `false` only where another layer isolates them.
    #[arg(long, env = "CLAWDEPLOY_FIREWALL", default_value_t = true, action = clap::ArgAction::Set)]
    firewall: bool,
    /// Destinations tenants may not connect to (IPv4 CIDRs).
    #[arg(long, env = "CLAWDEPLOY_TENANT_BLOCKED_CIDRS", value_delimiter = ',',
          default_values_t = clawdeploy_agent::firewall::DEFAULT_BLOCKED.iter().map(|s| s.to_string()))]
    tenant_blocked_cidrs: Vec<String>,
    /// Endpoints tenants may reach although the rules above would block
    /// them (comma-separated `ip:port`): the metering proxy on a private
    /// address or on this host.
    #[arg(long, env = "CLAWDEPLOY_TENANT_ALLOW", value_delimiter = ',')]
    tenant_allow: Vec<std::net::SocketAddrV4>,
    /// Containers created at once; more wait their turn.
    #[arg(long, env = "CLAWDEPLOY_MAX_PARALLEL_CREATES", default_value_t = 2)]
    max_parallel_creates: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    clawdeploy_common::telemetry::init_tracing("info");
    let a = Args::parse();
    let tls = TlsFiles {
        dir: a.tls_dir.clone(),
        node_id: a.node_id.clone(),
    };
    let scheduler = a.scheduler.endpoint(&a.tls_dir, &a.node_id);
    tls.finish_rotation()
        .context("finishing an interrupted certificate rotation")?;
    if !tls.cert().exists() {
        let (Some(token), Some(pin)) = (a.join_token.as_deref(), a.ca_pin.as_deref()) else {
            anyhow::bail!(
                "no certificate in {} and no --join-token with --ca-pin to get one",
                a.tls_dir.display()
            );
        };
        join_with_retries(&scheduler, &tls, token, pin).await?;
    }
    if a.firewall {
        clawdeploy_agent::firewall::install(&a.tenant_blocked_cidrs, &a.tenant_allow)
            .await
            .context("installing the tenant firewall")?;
        tokio::spawn(clawdeploy_agent::firewall::keep_installed(
            a.tenant_blocked_cidrs.clone(),
            a.tenant_allow.clone(),
            Duration::from_secs(30),
        ));
    } else {
        tracing::warn!("--firewall=false: tenants are NOT isolated by this agent");
    }
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
        scheduler,
        tls,
        capacity: NodeCapacity {
            cpu_millis: cpus * 1000,
            memory_bytes: clawdeploy_agent::host::meminfo("MemTotal:").unwrap_or(0),
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
        clawdeploy_common::shutdown::signal(),
    )
    .await
}

/// Joins, retrying while the scheduler is unreachable; a refused token or a
/// CA that does not match the pin ends the process with the reason.
async fn join_with_retries(
    scheduler: &SchedulerEndpoint,
    tls: &TlsFiles,
    token: &str,
    pin: &str,
) -> anyhow::Result<()> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    for attempt in 1.. {
        match enroll::join(scheduler, tls, token, pin).await {
            Ok(()) => return Ok(()),
            Err(e) if enroll::is_final(&e) || attempt >= 30 => {
                return Err(anyhow::anyhow!(e).context("joining the cluster"))
            }
            Err(e) => {
                tracing::warn!(error = %e, attempt, "join failed; retrying");
                backoff.wait().await;
            }
        }
    }
    unreachable!("the loop returns")
}
