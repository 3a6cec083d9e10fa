//! The burst scenario: a pool of warm containers, N signups at once, and the
//! cost curve over burst sizes.

use super::*;

/// One point of the cost curve.
pub(crate) struct Point {
    pub(crate) n: usize,
    pub(crate) p50: Duration,
    pub(crate) p99: Duration,
    pub(crate) wall: Duration,
    /// CPU seconds during the burst, by part, and the machine's busy total.
    pub(crate) cpu: Vec<(&'static str, f64)>,
    pub(crate) busy: f64,
}

/// A burst of each size against a fresh system whose pool is that size;
/// the sequential run goes before the largest.
pub(crate) async fn burst(a: &Args) -> Result<()> {
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
pub(crate) fn place(c: &Cluster) -> Vec<CpuGroup> {
    let mut services: Vec<(String, Vec<u32>)> =
        c.pids().into_iter().map(|(n, p)| (n, vec![p])).collect();
    services.push(("postgres".into(), cgroup::pids_of("postgres")));
    cgroup::own_groups(&services)
}

/// Optionally sequential signups, then a concurrent burst of `n`, with the
/// pool as large as the burst.
pub(crate) async fn burst_of(
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
