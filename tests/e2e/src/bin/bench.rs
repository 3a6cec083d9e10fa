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

/// Which part of the system a process belongs to, by its command name
/// (as `/proc/<pid>/stat` shows it, at most 15 characters).
fn part_of(command: &str) -> &'static str {
    match command {
        c if c.starts_with("clawdeploy-sche") => "scheduler",
        c if c.starts_with("clawdeploy-agen") => "agents",
        c if c.starts_with("clawdeploy-edge") => "edge",
        c if c.starts_with("clawdeploy-benc") => "bench client",
        "postgres" => "PostgreSQL",
        "dockerd" | "containerd" | "docker-proxy" | "runc" | "docker-init" => "dockerd",
        c if c.starts_with("containerd-shim") || c.starts_with("fuse-overlayfs") => "dockerd",
        c if c.starts_with("openclaw") => "containers",
        _ => "other",
    }
}

/// The CPU seconds each part used between two `cpu_by_part` readings.
/// A part whose processes exited in between reads less afterwards than
/// before: it counts as nothing here, and what its exited processes used
/// shows under "exited + kernel".
fn cpu_between(
    before: &std::collections::BTreeMap<&'static str, f64>,
    after: &std::collections::BTreeMap<&'static str, f64>,
) -> Vec<(&'static str, f64)> {
    after
        .iter()
        .map(|(part, a)| {
            let used = a - before.get(part).copied().unwrap_or(0.0);
            (*part, used.max(0.0))
        })
        .collect()
}

/// CPU seconds used so far, by part of the system.
fn cpu_by_part() -> std::collections::BTreeMap<&'static str, f64> {
    let mut parts = std::collections::BTreeMap::new();
    for (command, secs) in cpu_by_command() {
        if command.ends_with("(write MB)") {
            continue;
        }
        *parts.entry(part_of(&command)).or_insert(0.0) += secs;
    }
    parts
}

/// The database's own account of a burst (pg_stat_statements, which
/// scripts/lib.sh loads): statements run per signup and the costliest.
struct Statements(bool);

impl Statements {
    async fn start(c: &Cluster) -> Self {
        let ok = sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .execute(&c.db)
            .await
            .is_ok()
            && sqlx::query("SELECT pg_stat_statements_reset()")
                .execute(&c.db)
                .await
                .is_ok();
        if !ok {
            eprintln!("pg_stat_statements is not loaded: no statement counts (scripts/lib.sh starts PostgreSQL with it)");
        }
        Self(ok)
    }

    /// The statements run since `start`: text, calls, milliseconds.
    async fn read(&self, c: &Cluster) -> Result<Vec<(String, i64, f64)>> {
        if !self.0 {
            return Ok(Vec::new());
        }
        Ok(sqlx::query_as(
            "SELECT regexp_replace(query, '\\s+', ' ', 'g'), calls, total_exec_time
               FROM pg_stat_statements
              WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
                AND query NOT LIKE '%pg_stat_statements%'
              ORDER BY total_exec_time DESC",
        )
        .fetch_all(&c.db)
        .await?)
    }

    fn report(&self, rows: &[(String, i64, f64)], n: usize) {
        if !self.0 {
            return;
        }
        let calls: i64 = rows.iter().map(|r| r.1).sum();
        let ms: f64 = rows.iter().map(|r| r.2).sum();
        println!(
            "statements during the burst: {calls} ({:.1} per signup), {ms:.0} ms executing in all; the costliest:",
            calls as f64 / n as f64
        );
        for (query, calls, total) in rows.iter().take(8) {
            let short: String = query.chars().take(110).collect();
            println!("  {total:>7.1} ms {calls:>5}× {short}");
        }
        let mut by_calls = rows.to_vec();
        by_calls.sort_by_key(|r| std::cmp::Reverse(r.1));
        println!("the most frequent:");
        for (query, calls, total) in by_calls.iter().take(30) {
            let short: String = query.chars().take(110).collect();
            println!("  {calls:>5}× {total:>7.1} ms {short}");
        }
    }
}

/// `perf record` of every CPU, until `report_perf`.
fn start_perf(dir: &std::path::Path) -> Result<std::process::Child> {
    let child = std::process::Command::new("perf")
        .args(["record", "-a", "-F", "1999", "-o"])
        .arg(dir.join("burst.perf.data"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("perf (apt-get install linux-perf)")?;
    std::thread::sleep(Duration::from_millis(300));
    Ok(child)
}

/// Stops the recording and prints where the machine's CPU went: by
/// command, then the hottest functions.
fn report_perf(rec: std::process::Child, dir: &std::path::Path) -> Result<()> {
    println!("perf profile of the whole machine during the burst:");
    let data = dir.join("burst.perf.data");
    clawdeploy_e2e::perf_report(
        rec,
        &data,
        &[("comm", "1", 12), ("comm,dso,sym", "0.7", 25)],
    )?;
    // Kept past the system's own directory, to read further (`perf report
    // -i target/bench/burst.perf.data --comm postgres`).
    let keep = std::path::Path::new("target/bench");
    std::fs::create_dir_all(keep)?;
    std::fs::copy(&data, keep.join("burst.perf.data"))?;
    println!(
        "recording kept at {}",
        keep.join("burst.perf.data").display()
    );
    Ok(())
}

/// One point of the cost curve.
struct Point {
    n: usize,
    p50: Duration,
    p99: Duration,
    wall: Duration,
    /// CPU seconds during the burst, by part, and the machine's busy total.
    cpu: Vec<(&'static str, f64)>,
    busy: f64,
}

/// A burst of each size against a fresh system whose pool is that size;
/// the sequential run goes before the largest.
async fn burst(a: &Args) -> Result<()> {
    let mut sizes = a.concurrent.clone();
    sizes.sort_unstable();
    ensure!(
        !sizes.is_empty() && sizes[0] > 0,
        "--concurrent wants sizes above 0"
    );
    let largest = *sizes.last().unwrap();
    let mut curve = Vec::new();
    for &n in &sizes {
        let (sequential, perf) = if n == largest {
            (a.sequential, a.perf)
        } else {
            (0, false)
        };
        curve.push(
            burst_of(
                n,
                sequential,
                perf,
                Some(a.db_connections),
                &a.scheduler_args,
                !a.shared_cgroup,
            )
            .await?,
        );
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    println!("\ncost curve ({cores} cores; CPU seconds per signup by part, during the burst):");
    let parts: Vec<&str> = {
        let mut names: Vec<&str> = curve
            .iter()
            .flat_map(|p| p.cpu.iter().map(|(n, _)| *n))
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    };
    println!(
        "| burst | p50 ms | p99 ms | wall s | machine CPU s/signup | {} |",
        parts.join(" | ")
    );
    println!("|---|---|---|---|---|{}", "---|".repeat(parts.len()));
    for p in &curve {
        let per = |name: &str| {
            p.cpu
                .iter()
                .find(|(n, _)| *n == name)
                .map_or(0.0, |(_, s)| s / p.n as f64)
        };
        println!(
            "| {} | {:.0} | {:.0} | {:.2} | {:.4} | {} |",
            p.n,
            p.p50.as_secs_f64() * 1e3,
            p.p99.as_secs_f64() * 1e3,
            p.wall.as_secs_f64(),
            p.busy / p.n as f64,
            parts
                .iter()
                .map(|name| format!("{:.4}", per(name)))
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
    // The floor: the work that is neither the scheduler's nor the
    // database's it asks for (agents, containers, Docker, the edge, the
    // clients), spread over every core, is the least time the burst's last
    // signup can take if the scheduler cost nothing; its median, half.
    for p in &curve {
        let of = |part: &str| -> f64 {
            p.cpu
                .iter()
                .filter(|(n, _)| *n == part)
                .map(|(_, s)| s)
                .sum()
        };
        let (scheduler, database) = (of("scheduler"), of("PostgreSQL"));
        let rest = (p.busy - scheduler - database).max(0.0);
        println!(
            "floor at {}: {rest:.2} CPU s besides the scheduler's {scheduler:.2} s and PostgreSQL's {database:.2} s → ≥ {:.0} ms for the last signup on {cores} cores (median ≈ {:.0} ms) if the scheduler cost nothing",
            p.n,
            rest / cores * 1e3,
            rest / cores / 2.0 * 1e3
        );
    }
    Ok(())
}

/// The scheduler, each agent, the edge and PostgreSQL each in a CPU group of
/// its own, as each is a service of its own on a real host (and the
/// containers are in Docker's); in one group with the benchmark, each of
/// their threads and backends weighs as much as every container together.
fn place(c: &Cluster) -> Vec<CpuGroup> {
    let mut services: Vec<(String, Vec<u32>)> =
        c.pids().into_iter().map(|(n, p)| (n, vec![p])).collect();
    services.push(("postgres".into(), cgroup::pids_of("postgres")));
    cgroup::own_groups(&services)
}

/// Optionally sequential signups, then a concurrent burst of `n`, with the
/// pool as large as the burst.
async fn burst_of(
    n: usize,
    sequential: usize,
    perf: bool,
    db_connections: Option<u32>,
    scheduler_args: &[String],
    own_groups: bool,
) -> Result<Point> {
    let pool = sequential.max(n) as u32;
    let opts = ClusterOptions {
        nodes: 2,
        min_idle: pool,
        max_idle: pool,
        max_containers: pool,
        claim_wait_secs: 20,
        // All of them kept open: a burst otherwise opens new ones, each a
        // new PostgreSQL backend starting cold, while it is busiest.
        scheduler_args: db_connections
            .map(|n| {
                vec![
                    "--db-max-connections".to_owned(),
                    n.to_string(),
                    "--db-min-connections".to_owned(),
                    n.to_string(),
                ]
            })
            .unwrap_or_default()
            .into_iter()
            .chain(scheduler_args.iter().cloned())
            .collect(),
        ..Default::default()
    };
    eprintln!("starting the system with a pool of {pool} (2 nodes)…");
    let c = Cluster::start(opts).await?;
    let t = Instant::now();
    c.wait_idle(i64::from(pool), false, Duration::from_secs(600))
        .await?;
    eprintln!(
        "pool of {pool} idle after {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let _groups = if own_groups {
        place(&c)
    } else {
        println!("placement: every process in the benchmark's own cgroup");
        Vec::new()
    };
    let rss = |label: &str| {
        let pid = c
            .pids()
            .into_iter()
            .find(|(n, _)| n == "scheduler")
            .map(|(_, p)| p)
            .unwrap_or(0);
        eprintln!("scheduler rss {label}: {} KiB", rss_kib(pid).unwrap_or(0));
    };
    if sequential > 0 {
        rss("after the pool filled");
        let seq_users = c.register_many("seq", sequential).await?;
        rss("after registrations");
        let (samples, wall) = run_sequential(&c, "seq", &seq_users).await?;
        report("sequential", samples, wall);
        rss("after sequential signups");
        c.wait_idle(i64::from(pool), false, Duration::from_secs(600))
            .await?;
    }
    let burst_users = c.register_many("burst", n).await?;
    // Let registration's hashing and the pool's last starts settle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    // What the system costs with nothing to do (heartbeats, probes,
    // Docker's own upkeep of the containers): the burst's figures include
    // as much for as long as it lasts.
    let quiet_before = cpu_by_part();
    let quiet = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let quiet_after = cpu_by_part();
    let quiet_secs = quiet.elapsed().as_secs_f64();
    println!(
        "quiet cpu by part, per second before the burst: {}",
        cpu_between(&quiet_before, &quiet_after)
            .iter()
            .map(|(part, d)| format!("{part} {:.3}s", d / quiet_secs))
            .collect::<Vec<_>>()
            .join(", ")
    );
    // Reset before the CPU is first read: the reset (and the bench's own
    // connection to do it) is not the burst's work.
    let statements = Statements::start(&c).await;
    let cpu_before: Vec<(String, f64)> = c
        .pids()
        .into_iter()
        .map(|(n, p)| (n, cpu_secs(p).unwrap_or(0.0)))
        .collect();
    let machine_before = machine_cpu();
    let by_command_before = cpu_by_command();
    let parts_before = cpu_by_part();
    let pushes = "clawdeploy_desired_pushes_total";
    let pushes_before = c.scheduler_metric(0, pushes).await.unwrap_or(0.0);
    let batches = "clawdeploy_claim_batch_size_count";
    let batches_before = c.scheduler_metric(0, batches).await.unwrap_or(0.0);
    let recording = perf.then(|| start_perf(&c.dir)).transpose()?;
    let (timings, wall) = run_concurrent(&c, "burst", &burst_users).await?;
    let mut samples: Vec<Duration> = timings.iter().map(|t| t.live).collect();
    let machine_after = machine_cpu();
    let parts_after = cpu_by_part();
    // Read at once: the pool's refill starts as soon as the burst is over.
    let pushes_during = c.scheduler_metric(0, pushes).await.unwrap_or(0.0) - pushes_before;
    let batches_during = c.scheduler_metric(0, batches).await.unwrap_or(0.0) - batches_before;
    let fallbacks = c
        .scheduler_metric(0, "clawdeploy_claim_fallbacks_total")
        .await
        .unwrap_or(0.0);
    let statement_rows = statements.read(&c).await?;
    if let Some(rec) = recording {
        report_perf(rec, &c.dir)?;
    }
    statements.report(&statement_rows, n);
    println!("claims that created a container on demand (the pool had none for them): {fallbacks}");
    println!(
        "warm-claim batches: {batches_during} for {n} signups ({:.1} claims per batch)",
        n as f64 / batches_during.max(1.0)
    );
    report(&format!("concurrent ({n})"), samples.clone(), wall);
    let mut answered: Vec<Duration> = timings.iter().map(|t| t.answered).collect();
    answered.sort();
    println!(
        "  of which the API's answer: p50={:.1} ms p99={:.1} ms (the rest: the edge's first 200)",
        percentile(&answered, 0.5).as_secs_f64() * 1e3,
        percentile(&answered, 0.99).as_secs_f64() * 1e3
    );
    let mut after: Vec<Duration> = timings.iter().map(|t| t.live - t.answered).collect();
    after.sort();
    println!(
        "  from the answer to the edge's first 200: p50={:.1} ms p99={:.1} ms; {} of {n} signups met a non-200 first",
        percentile(&after, 0.5).as_secs_f64() * 1e3,
        percentile(&after, 0.99).as_secs_f64() * 1e3,
        timings.iter().filter(|t| t.first_miss.is_some()).count()
    );
    let mut misses = std::collections::BTreeMap::<_, usize>::new();
    for miss in timings.iter().filter_map(|t| t.first_miss.as_ref()) {
        *misses.entry(miss).or_default() += 1;
    }
    for ((status, body), count) in misses {
        println!("    {count}× first answered {status}: {body}");
    }
    let (busy, total) = (
        machine_after.0 - machine_before.0,
        machine_after.1 - machine_before.1,
    );
    println!(
        "burst cpu: machine {:.0}% busy over {:.2} s wall; {pushes_during} desired-state pushes to {} nodes",
        100.0 * busy / total.max(1e-9),
        wall.as_secs_f64(),
        c.node_ids.len()
    );
    let mut by_command: Vec<(String, f64)> = cpu_by_command()
        .into_iter()
        .map(|(n, after)| {
            let d = after - by_command_before.get(&n).copied().unwrap_or(0.0);
            (n, d)
        })
        .filter(|(_, d)| *d >= 0.02)
        .collect();
    by_command.sort_by(|a, b| b.1.total_cmp(&a.1));
    let top: Vec<String> = by_command
        .iter()
        .take(8)
        // Writes are in MB (see `cpu_by_command`), CPU in seconds.
        .map(|(n, d)| {
            if n.ends_with("(write MB)") {
                format!("{n} {d:.2}")
            } else {
                format!("{n} {d:.2}s")
            }
        })
        .collect();
    println!("burst cpu by command: {}", top.join(", "));
    for ((name, before), (_, pid)) in cpu_before.iter().zip(c.pids()) {
        println!(
            "burst cpu {name:<12} {:>6.2} s",
            cpu_secs(pid).unwrap_or(0.0) - before
        );
    }
    let mut cpu = cpu_between(&parts_before, &parts_after);
    // What no live process accounts for: processes that came and went
    // (runc, docker-init) and the kernel's own threads.
    let accounted: f64 = cpu.iter().map(|(_, s)| s).sum();
    cpu.push(("exited + kernel", (busy - accounted).max(0.0)));
    println!(
        "burst cpu by part: {}",
        cpu.iter()
            .map(|(n, s)| format!("{n} {s:.2}s"))
            .collect::<Vec<_>>()
            .join(", ")
    );

    // Where the time goes, from the processes' own histograms (means over
    // every signup of the run).
    let mut scrapes = vec![c.api("/metrics")];
    scrapes.extend(
        c.agent_metrics
            .iter()
            .map(|a| format!("http://{a}/metrics")),
    );
    for url in scrapes {
        let text = c.client.get(&url).send().await?.text().await?;
        for (name, sum, count) in histogram_means(&text) {
            if count > 0.0 {
                println!(
                    "stage {name:<48} mean={:>7.1} ms  n={count}",
                    sum / count * 1e3
                );
            }
        }
    }
    for (name, pid) in c.pids() {
        println!("rss {name:<12} {:>7} KiB", rss_kib(pid).unwrap_or(0));
    }
    samples.sort();
    Ok(Point {
        n,
        p50: percentile(&samples, 0.50),
        p99: percentile(&samples, 0.99),
        wall,
        cpu,
        busy,
    })
}
