//! Signup benchmarks: `POST /api/instances` → first authenticated 200
//! through the edge, on the real system (processes, PostgreSQL, Docker,
//! mTLS, edge). Scenarios:
//! - `burst`: the cost curve: for each burst size (10, 25, 50, 100 unless
//!   told), a fresh system whose pool is that size and one concurrent burst;
//!   p50, p99 and CPU seconds per signup by part of the system (scheduler,
//!   agents, PostgreSQL, dockerd, containers, …), resident memory, and the
//!   floor (the time the rest of the work needs if the scheduler cost
//!   nothing). A sequential run goes before the largest burst;
//! - `empty`: signups with an empty pool (every container made on demand);
//! - `trickle`: signups at a steady rate against `min_idle` 5, sampling the
//!   idle count throughout and timing the refill after the last one.
//!
//! Run with `scripts/bench` (it sets up PostgreSQL and the image).

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clap::Parser;
use clawdeploy_e2e::cgroup::{self, CpuGroup};
use clawdeploy_e2e::{
    cpu_by_command, cpu_secs, machine_cpu, rss_kib, Cluster, ClusterOptions, BASE_DOMAIN,
};
use serde_json::json;

mod burst;
mod cost;
use burst::*;
use cost::*;

#[derive(Parser)]
struct Args {
    /// burst, empty, trickle or all.
    #[arg(long, default_value = "all")]
    scenario: String,
    /// Signups one after the other before the largest burst.
    #[arg(long, default_value_t = 20)]
    sequential: usize,
    /// Burst sizes, each against a fresh system with a pool of that size:
    /// the cost curve (`--concurrent 100` for one).
    #[arg(long, value_delimiter = ',', default_value = "10,25,50,100")]
    concurrent: Vec<usize>,
    /// Signups with an empty pool: this many one after the other, then
    /// half as many at once.
    #[arg(long, default_value_t = 20)]
    empty: usize,
    /// Trickle: this many signups…
    #[arg(long, default_value_t = 50)]
    trickle: usize,
    /// …at this many per second.
    #[arg(long, default_value_t = 5.0)]
    rate: f64,
    /// The scheduler's database connections (`--db-max-connections`). On
    /// two cores shared with PostgreSQL more connections only queue inside
    /// PostgreSQL: a 100-signup burst ran at p50 706 ms with 40 and 601 ms
    /// with 12.
    #[arg(long, default_value_t = 12)]
    db_connections: u32,
    /// A flag for the scheduler, as it takes it (repeatable), e.g.
    /// `--scheduler-arg=--claim-batch-max=1`.
    #[arg(long = "scheduler-arg", allow_hyphen_values = true)]
    scheduler_args: Vec<String>,
    /// Profile the whole machine (`perf record -a`) during the largest
    /// burst and print where the CPU went.
    #[arg(long)]
    perf: bool,
    /// Leave the system's processes in the benchmark's own cgroup instead
    /// of one CPU group each (see `clawdeploy_e2e::cgroup`).
    #[arg(long)]
    shared_cgroup: bool,
}

/// One signup, timed from the POST until the gateway answers an
/// authenticated request through the edge.
/// One signup's timings from its request: the API's answer, and the first
/// 200 through the edge (what the figures report).
#[derive(Clone)]
struct Timing {
    answered: Duration,
    live: Duration,
    /// The first request through the edge that did not answer 200, if
    /// any: its status and the start of its body.
    first_miss: Option<(u16, String)>,
}

async fn signup(c: &Cluster, token: &str, sub: &str) -> Result<Timing> {
    let started = Instant::now();
    let (status, body) = c
        .create_instance(
            token,
            &json!({"subdomain": sub, "apiKeys": {"openai": "sk-bench"}}),
        )
        .await?;
    ensure!(status == 201, "signup answered {status}: {body}");
    let answered = started.elapsed();
    let gw = body["instance"]["gatewayToken"]
        .as_str()
        .context("gateway token")?
        .to_owned();
    let host = format!("{sub}.{BASE_DOMAIN}");
    let mut first_miss = None;
    loop {
        let (s, body) = c.edge_get(&host, "/v1/models", Some(&gw)).await?;
        if s == 200 {
            return Ok(Timing {
                answered,
                live: started.elapsed(),
                first_miss,
            });
        }
        first_miss.get_or_insert_with(|| (s, body.chars().take(160).collect()));
        ensure!(
            started.elapsed() < Duration::from_secs(30),
            "{sub} never answered 200 (last {s})"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn report(name: &str, mut samples: Vec<Duration>, wall: Duration) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{name:<24} n={:<4} p50={:>7.1} ms  p99={:>7.1} ms  max={:>7.1} ms  throughput={:>6.1} signups/s",
        samples.len(),
        ms(percentile(&samples, 0.50)),
        ms(percentile(&samples, 0.99)),
        ms(*samples.last().unwrap()),
        samples.len() as f64 / wall.as_secs_f64()
    );
}

/// (histogram, sum, count) for the stage histograms in a Prometheus text page.
fn histogram_means(text: &str) -> Vec<(String, f64, f64)> {
    const STAGES: &[&str] = &[
        "clawdeploy_claim_commit_seconds",
        "clawdeploy_assignment_duration_seconds",
        "clawdeploy_agent_config_apply_seconds",
        "clawdeploy_route_propagation_seconds",
    ];
    let value = |suffix: &str, name: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{suffix}")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    STAGES
        .iter()
        .map(|n| (n.to_string(), value("_sum", n), value("_count", n)))
        .collect()
}

/// Signs each account up for `<prefix>-<i>`, one after the other; returns
/// the timings and the wall time.
async fn run_sequential(
    c: &Cluster,
    prefix: &str,
    tokens: &[String],
) -> Result<(Vec<Duration>, Duration)> {
    let t = Instant::now();
    let mut samples = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        samples.push(signup(c, token, &format!("{prefix}-{i}")).await?.live);
    }
    Ok((samples, t.elapsed()))
}

/// Signs every account up at once; returns the timings and the wall time.
async fn run_concurrent(
    c: &Cluster,
    prefix: &str,
    tokens: &[String],
) -> Result<(Vec<Timing>, Duration)> {
    let t = Instant::now();
    let results = futures::future::join_all(
        tokens
            .iter()
            .enumerate()
            .map(|(i, token)| async move { signup(c, token, &format!("{prefix}-{i}")).await }),
    )
    .await;
    let wall = t.elapsed();
    Ok((results.into_iter().collect::<Result<Vec<_>>>()?, wall))
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    let all = a.scenario == "all";
    ensure!(
        all || ["burst", "empty", "trickle"].contains(&a.scenario.as_str()),
        "unknown scenario {:?} (burst, empty, trickle, all)",
        a.scenario
    );
    if all || a.scenario == "burst" {
        burst(&a).await?;
    }
    if all || a.scenario == "empty" {
        empty_pool(&a).await?;
    }
    if all || a.scenario == "trickle" {
        trickle(&a).await?;
    }
    Ok(())
}

/// Signups with no pool at all: each waits for a container made for it.
async fn empty_pool(a: &Args) -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        nodes: 2,
        min_idle: 0,
        max_idle: 0,
        max_containers: (a.empty * 2) as u32,
        claim_wait_secs: 30,
        ..Default::default()
    })
    .await?;
    let seq_users = c.register_many("empty", a.empty).await?;
    let (samples, wall) = run_sequential(&c, "empty", &seq_users).await?;
    report("empty pool, sequential", samples, wall);
    let n = (a.empty / 2).max(1);
    let burst_users = c.register_many("emptyburst", n).await?;
    let (timings, wall) = run_concurrent(&c, "emptyburst", &burst_users).await?;
    let samples = timings.iter().map(|t| t.live).collect();
    report(&format!("empty pool, {n} at once"), samples, wall);
    Ok(())
}

/// Signups at a steady rate against min_idle 5: the lowest idle count seen
/// while they run, and how long the pool takes to get back to 5.
async fn trickle(a: &Args) -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        nodes: 2,
        min_idle: 5,
        max_idle: 20,
        max_containers: (a.trickle + 30) as u32,
        ..Default::default()
    })
    .await?;
    c.wait_idle(5, false, Duration::from_secs(300)).await?;
    let accounts = c.register_many("trickle", a.trickle).await?;
    let done = std::sync::atomic::AtomicBool::new(false);
    let sampler = async {
        let mut lowest = i64::MAX;
        let mut samples = 0;
        while !done.load(std::sync::atomic::Ordering::Relaxed) {
            let idle = c
                .count("SELECT count(*) FROM containers WHERE state = 'idle'")
                .await?;
            lowest = lowest.min(idle);
            samples += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        anyhow::Ok((lowest, samples))
    };
    let gap = Duration::from_secs_f64(1.0 / a.rate.max(0.01));
    let t = Instant::now();
    let signups = async {
        let results = futures::future::join_all(accounts.iter().enumerate().map(|(i, token)| {
            let c = &c;
            async move {
                tokio::time::sleep(gap * i as u32).await;
                signup(c, token, &format!("trickle-{i}"))
                    .await
                    .map(|t| t.live)
            }
        }))
        .await;
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        results
    };
    let (results, lowest) = tokio::join!(signups, sampler);
    let wall = t.elapsed();
    let (lowest, n_samples) = lowest?;
    report(
        &format!("trickle {} at {}/s", a.trickle, a.rate),
        results.into_iter().collect::<Result<Vec<_>>>()?,
        wall,
    );
    let t = Instant::now();
    c.wait_idle_at_least(5, Duration::from_secs(60)).await?;
    println!(
        "trickle pool: lowest idle {lowest} ({n_samples} samples every 20 ms); back to 5 idle {:.1} s after the last signup; target at the end {}",
        t.elapsed().as_secs_f64(),
        c.scheduler_metric(0, "clawdeploy_pool_target").await?
    );
    Ok(())
}
