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
    /// wrk threads (the issue's outsider run used one).
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

const PROXIES: [&str; 3] = ["edge", "nginx", "caddy"];

struct Peer {
    name: &'static str,
    addr: SocketAddr,
    child: Option<Child>,
}

impl Drop for Peer {
    /// SIGTERM first, so nginx's master stops its workers (a SIGKILLed
    /// master leaves them running, and serving, behind it); SIGKILL if the
    /// process is still there after a few seconds.
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn nginx(dir: &Path, upstream: &str, tls: &Path, pin: bool) -> Result<Peer> {
    let addr = free_addr();
    let conf = format!(
        r#"worker_processes 2;
{affinity}
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 16384; }}
http {{
  access_log off;
  # nginx closes a connection after 1000 requests by default (HTTP/2
  # included), which h2load does not reopen: lift it, as for a proxy.
  keepalive_requests 1000000;
  upstream tenant {{ server {upstream}; keepalive 64; }}
  server {{
    listen {addr} ssl http2;
    ssl_certificate {crt};
    ssl_certificate_key {key};
    location / {{
      proxy_pass http://tenant;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $remote_addr;
    }}
  }}
}}
"#,
        dir = dir.display(),
        crt = tls.join("edge.crt.pem").display(),
        key = tls.join("edge.key.pem").display(),
        affinity = if pin { "worker_cpu_affinity auto;" } else { "" },
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    let child = Command::new("nginx")
        .arg("-c")
        .arg(&path)
        .arg("-e")
        .arg(dir.join("nginx-error.log"))
        .args(["-g", "daemon off;"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting nginx (apt-get install nginx-light)")?;
    Ok(Peer {
        name: "nginx",
        addr,
        child: Some(child),
    })
}

fn caddy(dir: &Path, upstream: &str, tls: &Path) -> Result<Peer> {
    let addr = free_addr();
    let conf = format!(
        r#"{{
  admin off
  auto_https off
  default_sni alice.{BASE_DOMAIN}
  storage file_system {data}
}}
https://:{port} {{
  bind 127.0.0.1
  tls {crt} {key}
  reverse_proxy {upstream}
}}
"#,
        port = addr.port(),
        data = dir.join("caddy-data").display(),
        crt = tls.join("edge.crt.pem").display(),
        key = tls.join("edge.key.pem").display(),
    );
    let path = dir.join("Caddyfile");
    std::fs::write(&path, conf)?;
    let child = Command::new("caddy")
        .args(["run", "--adapter", "caddyfile", "--config"])
        .arg(&path)
        .env("XDG_DATA_HOME", dir.join("caddy-data"))
        .env("XDG_CONFIG_HOME", dir.join("caddy-config"))
        .stdout(std::fs::File::create(dir.join("caddy.log"))?)
        .stderr(std::fs::File::create(dir.join("caddy.err.log"))?)
        .spawn()
        .context("starting Caddy (apt-get install caddy)")?;
    Ok(Peer {
        name: "caddy",
        addr,
        child: Some(child),
    })
}

/// A duration in wrk's notation (`950.00us`, `1.23ms`, `2.00s`), in ms.
fn wrk_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, scale) = if let Some(v) = s.strip_suffix("us") {
        (v, 0.001)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1000.0)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|n| n * scale)
}

#[derive(Clone, Copy, Debug, Default)]
struct Run {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
    /// The proxy's own CPU time per request, in microseconds: what it costs
    /// whatever else shares the machine.
    cpu_us: f64,
    /// Of which in the kernel: its system calls and the network stack
    /// work they do, which a proxy's own code can only avoid by making
    /// fewer of them.
    kernel_us: f64,
    /// Packets per request on the tenant's bridge (both ways) and on
    /// loopback (the client's side), when the counters could be read.
    packets: Option<Packets>,
}

/// Packets per request, or packet counts, on the two links a request
/// crosses: the bridge to the tenant and loopback to the client.
#[derive(Clone, Copy, Debug, Default)]
struct Packets {
    bridge: f64,
    loopback: f64,
}

/// The interfaces whose counters say how many packets a proxy sent and
/// received for its requests.
struct Links {
    /// The interface the route to the tenant leaves by (its Docker bridge).
    bridge: String,
}

impl Links {
    /// The links to `upstream` (`ip:port`), found with `ip route get`.
    fn to(upstream: &str) -> Option<Self> {
        let ip = upstream.rsplit_once(':')?.0;
        let out = Command::new("ip")
            .args(["-o", "route", "get", ip])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut words = text.split_whitespace();
        words.find(|w| *w == "dev")?;
        Some(Self {
            bridge: words.next()?.to_owned(),
        })
    }

    fn count(&self) -> Option<Packets> {
        let read = |dev: &str, dir: &str| -> Option<f64> {
            std::fs::read_to_string(format!("/sys/class/net/{dev}/statistics/{dir}_packets"))
                .ok()?
                .trim()
                .parse()
                .ok()
        };
        Some(Packets {
            // Received and sent: the bridge carries both ways.
            bridge: read(&self.bridge, "rx")? + read(&self.bridge, "tx")?,
            // Loopback receives every packet it sends: count one side.
            loopback: read("lo", "rx")?,
        })
    }
}

fn wrk(addr: SocketAddr, gw: &str, path: &str, a: &Args) -> Result<Run> {
    let out = Command::new("wrk")
        .args([
            &format!("-t{}", a.wrk_threads),
            &format!("-c{}", a.concurrency),
        ])
        .arg(format!("-d{}s", a.duration))
        .arg("--latency")
        .args(["-H", &format!("Host: alice.{BASE_DOMAIN}")])
        .args(["-H", &format!("Authorization: Bearer {gw}")])
        .arg(format!("https://{addr}{path}"))
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line_value = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix))
            .map(str::trim)
    };
    let rps = line_value("Requests/sec:")
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("wrk output: {text}"))?;
    let p50_ms = line_value("50%").and_then(wrk_ms).context("wrk p50")?;
    let p99_ms = line_value("99%").and_then(wrk_ms).context("wrk p99")?;
    let non_2xx = line_value("Non-2xx or 3xx responses:")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let socket_errors = text.lines().any(|l| l.contains("Socket errors"));
    Ok(Run {
        rps,
        p50_ms,
        p99_ms,
        errors: non_2xx + u64::from(socket_errors),
        cpu_us: 0.0,
        kernel_us: 0.0,
        packets: None,
    })
}

fn h2load(addr: SocketAddr, gw: &str, path: &str, a: &Args, log: &Path) -> Result<Run> {
    let streams = a.h2_streams.max(1);
    let conns = a.h2_connections.max(1);
    let out = Command::new("h2load")
        .args([
            &format!("-t{}", a.wrk_threads),
            &format!("-c{conns}"),
            &format!("-m{streams}"),
        ])
        .args(["-D", &a.duration.to_string()])
        .args(["-H", &format!(":authority: alice.{BASE_DOMAIN}")])
        .args(["-H", &format!("authorization: Bearer {gw}")])
        .arg("--log-file")
        .arg(log)
        .arg(format!("https://{addr}{path}"))
        .output()
        .context("running h2load (apt-get install nghttp2-client)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find(|l| l.starts_with("finished in"))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|v| v.strip_suffix(" req/s"))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("h2load output: {text}"))?;
    // status\tduration per request: percentiles from the log.
    let mut durations = Vec::new();
    let mut errors = 0;
    for line in std::fs::read_to_string(log)?.lines() {
        let cols: Vec<&str> = line.split('\t').collect();
        if cols.len() < 3 {
            continue;
        }
        if cols[1] != "200" {
            errors += 1;
        }
        if let Ok(us) = cols[2].parse::<f64>() {
            durations.push(us / 1000.0);
        }
    }
    ensure!(!durations.is_empty(), "h2load logged no requests: {text}");
    durations.sort_by(f64::total_cmp);
    let pick = |p: f64| durations[((durations.len() as f64 * p) as usize).min(durations.len() - 1)];
    Ok(Run {
        rps,
        p50_ms: pick(0.50),
        p99_ms: pick(0.99),
        errors,
        cpu_us: 0.0,
        kernel_us: 0.0,
        packets: None,
    })
}

fn median(mut v: Vec<Run>) -> Run {
    v.sort_by(|a, b| a.rps.total_cmp(&b.rps));
    let mut m = v[v.len() / 2];
    let mut p99: Vec<f64> = v.iter().map(|r| r.p99_ms).collect();
    p99.sort_by(f64::total_cmp);
    m.p99_ms = p99[p99.len() / 2];
    m.errors = v.iter().map(|r| r.errors).sum();
    let middle = |f: fn(&Run) -> f64| {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        x.sort_by(f64::total_cmp);
        x[x.len() / 2]
    };
    m.cpu_us = middle(|r| r.cpu_us);
    m.kernel_us = middle(|r| r.kernel_us);
    m.packets = v.iter().all(|r| r.packets.is_some()).then(|| Packets {
        bridge: middle(|r| r.packets.map_or(0.0, |p| p.bridge)),
        loopback: middle(|r| r.packets.map_or(0.0, |p| p.loopback)),
    });
    m
}

/// A process and its children (nginx's workers).
fn tree(root: u32) -> Vec<u32> {
    let mut pids = vec![root];
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(root) {
                pids.push(pid);
            }
        }
    }
    pids
}

fn tree_rss_kib(root: u32) -> u64 {
    tree(root).into_iter().filter_map(rss_kib).sum()
}

fn tree_cpu_secs(root: u32) -> CpuSplit {
    tree(root)
        .into_iter()
        .filter_map(cpu_split_secs)
        .fold(CpuSplit::default(), |a, c| CpuSplit {
            user: a.user + c.user,
            kernel: a.kernel + c.kernel,
        })
}

async fn route_lag(c: &Cluster, n: usize) -> Result<()> {
    for i in 0..n {
        let token = c.register(&format!("lag{i}@example.com")).await?;
        let (status, body) = c
            .create_instance(&token, &json!({"subdomain": format!("lag{i}")}))
            .await?;
        ensure!(status == 201, "signup answered {status}: {body}");
        let (status, body) = c.my_instance(reqwest::Method::DELETE, &token, None).await?;
        ensure!(status == 200, "release answered {status}: {body}");
    }
    let text = c
        .client
        .get(format!("http://{}/metrics", c.edge_admin))
        .send()
        .await?
        .text()
        .await?;
    let name = "clawdeploy_edge_route_update_lag_seconds";
    let value = |suffix: &str| clawdeploy_e2e::metric_value(&text, &format!("{name}{suffix}"));
    let (sum, count) = (value("_sum").unwrap_or(0.0), value("_count").unwrap_or(0.0));
    let buckets: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{name}_bucket{{le=\"")))
        .filter_map(|rest| {
            let (le, v) = rest.split_once("\"} ")?;
            Some((le.parse().ok()?, v.parse().ok()?))
        })
        .collect();
    let bound = |q: f64| {
        buckets
            .iter()
            .find(|(_, c)| *c >= q * count)
            .map_or(f64::INFINITY, |(le, _)| *le)
    };
    println!(
        "\nroute update lag (scheduler sends → edge applied), {count} changes: mean {:.2} ms, p50 ≤ {} ms, p99 ≤ {} ms",
        sum / count.max(1.0) * 1000.0,
        bound(0.5) * 1000.0,
        bound(0.99) * 1000.0
    );
    Ok(())
}

/// Gives the tenant container the whole machine (a pool container gets half
/// a core, which would cap every proxy alike) and room for many connections
/// (the stand-in spends a thread on each). Through the desired state, as a
/// resize.
async fn make_room(c: &Cluster, container: uuid::Uuid, pids: i32) -> Result<()> {
    sqlx::query(
        "UPDATE containers SET pids = $2, memory_bytes = $3, cpu_millis = 2000 WHERE id = $1",
    )
    .bind(container)
    .bind(pids)
    .bind(4_i64 << 30)
    .execute(&c.db)
    .await?;
    sqlx::query("UPDATE nodes SET generation = generation + 1")
        .execute(&c.db)
        .await?;
    // The scheduler pushes a node's desired state on this event.
    sqlx::query("SELECT pg_notify('clawdeploy_events', $1)")
        .bind(format!("bench\nn {}", c.node_ids[0]))
        .execute(&c.db)
        .await?;
    let docker_id: String = sqlx::query_scalar("SELECT docker_id FROM containers WHERE id = $1")
        .bind(container)
        .fetch_one(&c.db)
        .await?;
    wait_for(Duration::from_secs(30), "the container resized", || async {
        Ok(c.docker_inspect(&docker_id)?["HostConfig"]["PidsLimit"] == i64::from(pids))
    })
    .await
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// A WebSocket over TLS (`wss://`), as customers open them.
async fn open_ws(
    edge: SocketAddr,
    source: std::net::IpAddr,
    gw: &str,
    tls: &tokio_rustls::TlsConnector,
) -> Result<Ws> {
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    let tcp = socket.connect(edge).await?;
    let name = rustls::pki_types::ServerName::try_from(format!("alice.{BASE_DOMAIN}"))?;
    let stream = tls.connect(name, tcp).await?;
    let mut req = format!("wss://alice.{BASE_DOMAIN}/ws").into_client_request()?;
    req.headers_mut()
        .insert("host", format!("alice.{BASE_DOMAIN}").parse()?);
    let (mut ws, _) = tokio_tungstenite::client_async(req, stream).await?;
    ws.send(Message::text(gw)).await?;
    let hello = ws.next().await.context("no hello")??;
    ensure!(hello.to_text()?.contains("\"ok\":true"), "refused: {hello}");
    Ok(ws)
}

async fn websockets(c: &Cluster, gw: &str, n: usize) -> Result<()> {
    let pid = c.edge_pid().context("edge pid")?;
    let tls = clawdeploy_e2e::edge_client::tls_connector(
        &c.public_tls_dir().join("ca.crt.pem"),
        &["http/1.1"],
    )?;
    let before = rss_kib(pid).unwrap_or(0);
    let started = Instant::now();
    // 500 per source address keeps each under the per-address limit.
    let opened: Vec<Result<Ws>> = futures::stream::iter(0..n)
        .map(|i| {
            let source = std::net::Ipv4Addr::new(127, 0, 1, 10 + (i / 500) as u8).into();
            let tls = &tls;
            async move {
                // A client retries once, as browsers' reconnect logic does:
                // the stand-in's accept backlog is small.
                match open_ws(c.edge_tls, source, gw, tls).await {
                    Ok(ws) => Ok(ws),
                    Err(_) => open_ws(c.edge_tls, source, gw, tls).await,
                }
            }
        })
        .buffer_unordered(128)
        .collect()
        .await;
    let took = started.elapsed();
    let failures: Vec<String> = opened
        .iter()
        .filter_map(|r| r.as_ref().err().map(|e| e.to_string()))
        .take(3)
        .collect();
    let mut live: Vec<Ws> = opened.into_iter().filter_map(Result::ok).collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(pid).unwrap_or(0);
    let gauge = c.edge_metric("clawdeploy_edge_websockets").await?;
    // They are live: a sample echoes.
    let mut echoed = 0;
    for ws in live.iter_mut().step_by((n / 100).max(1)) {
        use tokio_tungstenite::tungstenite::Message;
        ws.send(Message::text("still there?")).await?;
        if let Some(Ok(m)) = ws.next().await {
            echoed += usize::from(m.to_text().unwrap_or_default() == "still there?");
        }
    }
    let held = live.len();
    println!(
        "\nWebSockets through the edge: {held}/{n} open (edge gauge {gauge}) in {:.1} s; \
         sample echo {echoed}/{}; edge RSS {} → {} MiB: {:.1} KiB per connection{}",
        took.as_secs_f64(),
        live.iter().step_by((n / 100).max(1)).count(),
        before / 1024,
        after / 1024,
        (after.saturating_sub(before)) as f64 / held.max(1) as f64,
        if failures.is_empty() {
            String::new()
        } else {
            format!("; first failures: {failures:?}")
        }
    );
    drop(live);
    Ok(())
}

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

/// Each proxy in a CPU cgroup of its own, as its systemd service is on a
/// real host.
fn own_groups(c: &Cluster, peers: &[Peer; 3]) -> Vec<CpuGroup> {
    let services: Vec<(String, Vec<u32>)> = peers
        .iter()
        .filter_map(|p| {
            let pid = p.child.as_ref().map(Child::id).or(c.edge_pid())?;
            Some((p.name.to_owned(), tree(pid)))
        })
        .collect();
    cgroup::own_groups(&services)
}

/// `clawdeploy_edge_upstream_connects_total` as the edge's metrics show it.
fn upstream_connects(c: &Cluster) -> Option<f64> {
    let out = Command::new("curl")
        .args(["-sf", &format!("http://{}/metrics", c.edge_admin)])
        .output()
        .ok()?;
    clawdeploy_e2e::metric_value(
        &String::from_utf8_lossy(&out.stdout),
        "clawdeploy_edge_upstream_connects_total",
    )
}

/// Rounds of (edge, nginx, Caddy) on `path`, HTTP/1.1 then HTTP/2, and
/// the medians. Each round runs one protocol through every proxy back to
/// back, edge and nginx swapping places every other round, so that a
/// machine whose speed drifts (a shared virtual machine's does, by 10–20%
/// over seconds) favours neither; the edge/nginx ratio is also taken round
/// by round, from runs seconds apart, and its median reported.
fn series(
    c: &Cluster,
    peers: &[Peer; 3],
    gw: &str,
    path: &str,
    a: &Args,
    links: Option<&Links>,
) -> Result<()> {
    println!("\n## {path}");
    let mut h1: Vec<Vec<Run>> = vec![Vec::new(); 3];
    let mut h2: Vec<Vec<Run>> = vec![Vec::new(); 3];
    for round in 0..a.rounds {
        let order = if round % 2 == 0 { [0, 1, 2] } else { [1, 0, 2] };
        for http2 in [false, true] {
            for i in order {
                let p = &peers[i];
                let pid = p
                    .child
                    .as_ref()
                    .map(Child::id)
                    .or(c.edge_pid())
                    .context("pid")?;
                let cpu_before = tree_cpu_secs(pid);
                let connects_before = upstream_connects(c);
                let packets_before = links.and_then(Links::count);
                let mut r = if http2 {
                    let log = c.dir.join(format!("h2load-{}.log", p.name));
                    h2load(p.addr, gw, path, a, &log)?
                } else {
                    wrk(p.addr, gw, path, a)?
                };
                let cpu_after = tree_cpu_secs(pid);
                let requests = r.rps * a.duration as f64;
                r.kernel_us = (cpu_after.kernel - cpu_before.kernel) * 1e6 / requests;
                r.cpu_us = (cpu_after.user - cpu_before.user) * 1e6 / requests + r.kernel_us;
                r.packets = match (packets_before, links.and_then(Links::count)) {
                    (Some(before), Some(after)) => Some(Packets {
                        bridge: (after.bridge - before.bridge) / requests,
                        loopback: (after.loopback - before.loopback) / requests,
                    }),
                    _ => None,
                };
                // The edge's own count: a pool that kept its connections
                // opens none during a run.
                let connects = match (i, connects_before, upstream_connects(c)) {
                    (0, Some(b), Some(a)) => format!(", {:.0} upstream connections opened", a - b),
                    _ => String::new(),
                };
                println!(
                    "round {round} {:<6} {:<6} {:>6.0} req/s p99 {:>6.2} ms {:>4.0} µs CPU/req ({:.0} in the kernel){connects}",
                    p.name,
                    if http2 { "h2load" } else { "wrk" },
                    r.rps,
                    r.p99_ms,
                    r.cpu_us,
                    r.kernel_us
                );
                let runs = if http2 { &mut h2 } else { &mut h1 };
                runs[i].push(r);
            }
        }
    }
    let memory: Vec<u64> = peers
        .iter()
        .map(|p| match &p.child {
            Some(child) => tree_rss_kib(child.id()),
            None => c.edge_pid().and_then(rss_kib).unwrap_or(0),
        })
        .collect();
    for (label, runs) in [("HTTP/1.1 (wrk)", &h1), ("HTTP/2 (h2load)", &h2)] {
        let m: Vec<Run> = runs.iter().map(|r| median(r.clone())).collect();
        println!("\n{path}, {label}, medians of {} rounds:", a.rounds);
        println!(
            "| proxy | req/s | p50 ms | p99 ms | CPU µs/req | of which kernel | packets/req bridge, loopback | errors | RSS MiB |\n|---|---|---|---|---|---|---|---|---|"
        );
        for (i, name) in PROXIES.iter().enumerate() {
            let packets = m[i].packets.map_or("-".into(), |p| {
                format!("{:.2}, {:.2}", p.bridge, p.loopback)
            });
            println!(
                "| {name} | {:.0} | {:.2} | {:.2} | {:.0} | {:.0} | {packets} | {} | {} |",
                m[i].rps,
                m[i].p50_ms,
                m[i].p99_ms,
                m[i].cpu_us,
                m[i].kernel_us,
                m[i].errors,
                memory[i] / 1024
            );
        }
        println!(
            "{path} {label}: edge/nginx throughput {:.2}×, p99 {:.2}×, CPU per request {:.2}×; edge/Caddy throughput {:.2}×, p99 {:.2}×, CPU per request {:.2}×",
            m[0].rps / m[1].rps,
            m[0].p99_ms / m[1].p99_ms,
            m[0].cpu_us / m[1].cpu_us,
            m[0].rps / m[2].rps,
            m[0].p99_ms / m[2].p99_ms,
            m[0].cpu_us / m[2].cpu_us
        );
        let mut paired: Vec<f64> = runs[0]
            .iter()
            .zip(&runs[1])
            .map(|(edge, nginx)| edge.rps / nginx.rps)
            .collect();
        paired.sort_by(f64::total_cmp);
        println!(
            "{path} {label}: edge/nginx throughput round by round: median {:.2}× (from {:.2}× to {:.2}×, {} of {} rounds at or above 1.0×)",
            paired[paired.len() / 2],
            paired[0],
            paired[paired.len() - 1],
            paired.iter().filter(|r| **r >= 1.0).count(),
            paired.len()
        );
    }
    Ok(())
}

/// `perf record` of the edge during a wrk run on the first path, and the
/// top of its report (by symbol, children excluded).
fn profile(c: &Cluster, edge: &Peer, gw: &str, a: &Args) -> Result<()> {
    let pid = c.edge_pid().context("edge pid")?;
    let data = c.dir.join("edge.perf.data");
    let rec = Command::new("perf")
        // DWARF call graphs (release builds keep no frame pointers), so the
        // kept recording can be read with its callers.
        .args(["record", "-F", "999", "--call-graph", "dwarf,16384", "-o"])
        .arg(&data)
        .args(["-p", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("perf (apt-get install linux-perf)")?;
    std::thread::sleep(Duration::from_millis(500));
    let path = a.paths.first().map_or("/healthz", String::as_str);
    let run = wrk(edge.addr, gw, path, a)?;
    println!(
        "\nperf profile of the edge under wrk on {path} ({:.0} req/s while recorded):",
        run.rps
    );
    // Where the time goes by binary (kernel, the edge, libc), then the
    // hottest functions, the edge's threads taken together.
    clawdeploy_e2e::perf_report(rec, &data, &[("dso", "1", 8), ("sym", "0.5", 40)])?;
    // Kept past the system's own directory, to read further (`perf report
    // -i target/bench/edge.perf.data --children`).
    let keep = Path::new("target/bench");
    std::fs::create_dir_all(keep)?;
    std::fs::copy(&data, keep.join("edge.perf.data"))?;
    println!(
        "recording kept at {}",
        keep.join("edge.perf.data").display()
    );
    Ok(())
}

/// One request through `addr`; whether it answered 200.
fn answers(addr: SocketAddr, gw: &str) -> bool {
    Command::new("curl")
        .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}"])
        .args(["-H", &format!("authorization: Bearer {gw}")])
        .args([
            "--resolve",
            &format!("alice.{BASE_DOMAIN}:{}:{}", addr.port(), addr.ip()),
        ])
        .arg(format!(
            "https://alice.{BASE_DOMAIN}:{}/v1/models",
            addr.port()
        ))
        .output()
        .map(|o| o.stdout == b"200")
        .unwrap_or(false)
}
