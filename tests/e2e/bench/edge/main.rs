//! Edge benchmark on the real system: one tenant container (the stand-in),
//! reached through the ClawDeploy edge, through nginx and through Caddy
//! (Debian's packages, plain reverse proxies with the same certificate),
//! all over TLS, in the same run and in alternating rounds:
//! - `wrk` (HTTP/1.1) and `h2load` (HTTP/2): requests per second, p99;
//! - route update lag: signups and releases, as the edge measured them;
//! - concurrent WebSockets through the edge: how many, memory per connection.
//!
//! Run with `scripts/bench-edge` (it installs the tools and raises the
//! descriptor limit).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clap::Parser;
use clawdeploy_e2e::cgroup::{self, CpuGroup};
use clawdeploy_e2e::{
    cpu_split_secs, free_addr, rss_kib, wait_for, Cluster, ClusterOptions, CpuSplit, BASE_DOMAIN,
};
use futures::{SinkExt, StreamExt};
use serde_json::json;

mod load;
mod peers;
mod series;
mod traffic;
use load::*;
use peers::*;
use series::*;
use traffic::*;

#[derive(Parser)]
struct Args {
    /// Seconds per load run.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// wrk connections (HTTP/1.1: one request in flight on each).
    #[arg(long, default_value_t = 32)]
    concurrency: u32,
    /// h2load connections (HTTP/2), each with `--h2-streams` in flight.
    #[arg(long, default_value_t = 16)]
    h2_connections: u32,
    /// Rounds of (edge, nginx, Caddy); each figure is the median.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Concurrent WebSockets to hold through the edge.
    #[arg(long, default_value_t = 10_000)]
    websockets: usize,
    /// Paths to load, each in its own series: `/healthz` is the cheap
    /// route (the proxy's own cost shows), `/v1/models` the heavier one (an
    /// authenticated answer; the backend dominates).
    #[arg(long, value_delimiter = ',', default_value = "/healthz,/v1/models")]
    paths: Vec<String>,
    /// wrk threads (the outsider run used one).
    #[arg(long, default_value_t = 1)]
    wrk_threads: u32,
    /// h2load streams in flight per connection.
    #[arg(long, default_value_t = 8)]
    h2_streams: u32,
    /// Pin each proxy's two workers to a core each (the edge's
    /// `--pin-workers`, nginx's `worker_cpu_affinity auto`), as on a host
    /// that runs the proxy alone.
    #[arg(long)]
    pin: bool,
    /// Profile the edge with `perf` during one more run on the first path.
    #[arg(long)]
    perf: bool,
    /// Signup + release pairs for the route update lag.
    #[arg(long, default_value_t = 20)]
    route_changes: usize,
    /// Leave the proxies in the benchmark's own cgroup instead of one CPU
    /// group each (see `clawdeploy_e2e::cgroup` for what that shows).
    #[arg(long)]
    shared_cgroup: bool,
    /// Print the three proxies' addresses and the gateway token, and keep
    /// them up until stdin closes, to load and profile them by hand.
    #[arg(long)]
    hold: bool,
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    let c = Cluster::start(ClusterOptions {
        nodes: 1,
        min_idle: 3,
        max_idle: 3,
        // Released containers keep their slot (stopped, for the grace period).
        max_containers: a.route_changes as u32 + 10,
        edge_tls: true,
        edge_args: ["--pin-workers", if a.pin { "true" } else { "false" }]
            .map(String::from)
            .to_vec(),
        ..Default::default()
    })
    .await?;
    c.wait_idle_at_least(3, Duration::from_secs(120)).await?;
    route_lag(&c, a.route_changes).await?;

    let token = c.register("alice@example.com").await?;
    let (status, body) = c
        .create_instance(
            &token,
            &json!({"subdomain": "alice", "apiKeys": {"openai": "sk-bench"}}),
        )
        .await?;
    ensure!(status == 201, "signup answered {status}: {body}");
    let gw = body["instance"]["gatewayToken"]
        .as_str()
        .context("gateway token")?
        .to_owned();
    let (container, upstream): (uuid::Uuid, String) = sqlx::query_as(
        "SELECT container_id, upstream FROM routes WHERE hostname = $1 AND removed_at IS NULL",
    )
    .bind(format!("alice.{BASE_DOMAIN}"))
    .fetch_one(&c.db)
    .await?;
    let links = Links::to(&upstream);
    match &links {
        Some(l) => println!("packets counted on {} (to the tenant) and lo", l.bridge),
        None => println!("packets not counted: no interface found for {upstream}"),
    }
    // The stand-in spends a thread on each connection: room for every
    // proxy's upstream connections (a short limit answers 502s that would
    // count against whichever proxy opens more), and for the WebSockets.
    make_room(&c, container, ((a.websockets as i32) * 2 + 256).max(4096)).await?;
    let tls = c.public_tls_dir();
    let peers = [
        Peer {
            name: "edge",
            addr: c.edge_tls,
            child: None,
        },
        nginx(&c.dir, &upstream, &tls, a.pin)?,
        caddy(&c.dir, &upstream, &tls)?,
    ];
    for p in &peers {
        wait_for(
            Duration::from_secs(20),
            &format!("{} answering", p.name),
            || async { Ok(answers(p.addr, &gw)) },
        )
        .await?;
    }
    let _groups = if a.shared_cgroup {
        println!("placement: the proxies share the benchmark's cgroup");
        Vec::new()
    } else {
        own_groups(&c, &peers)
    };
    println!(
        "upstream: one stand-in container at {upstream}; {}s runs; wrk -t{} -c{}, h2load -c{} -m{}; {} rounds; TLS everywhere",
        a.duration, a.wrk_threads, a.concurrency, a.h2_connections, a.h2_streams, a.rounds
    );
    if a.hold {
        for p in &peers {
            println!("{} https://{}", p.name, p.addr);
        }
        println!("Host: alice.{BASE_DOMAIN}\nAuthorization: Bearer {gw}\nheld until stdin closes");
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
    }
    for path in &a.paths {
        series(&c, &peers, &gw, path, &a, links.as_ref())?;
    }
    if a.perf {
        profile(&c, &peers[0], &gw, &a)?;
    }
    drop(peers);

    if a.websockets > 0 {
        websockets(&c, &gw, a.websockets).await?;
    }
    Ok(())
}
