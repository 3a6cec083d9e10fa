//! Migration benchmark on the real system (processes, PostgreSQL, Docker,
//! mTLS, edge, the S3-compatible store): one tenant with `--state-mb` of
//! state moved back and forth `--moves` times while a client calls it
//! through the edge every 20 ms (downtime = the longest gap between two
//! answers), then a node with `--evacuate` tenants evacuated. Prints p50,
//! p99 and max, throughput, CPU and memory.
//!
//! Run with `scripts/bench-migration` (it starts PostgreSQL and the store).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use clawdeploy_e2e::ops::{
    downtime, drain, instance_of, migrate, placement, volume_dir, wait_migration, Poller,
};
use clawdeploy_e2e::{machine_cpu, rss_kib, Cluster, ClusterOptions, ADMIN_TOKEN, BASE_DOMAIN};
use reqwest::Method;
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// Migrations of the one tenant.
    #[arg(long, default_value_t = 10)]
    moves: usize,
    /// State written into that tenant's volume, in MB (random bytes).
    #[arg(long, default_value_t = 10)]
    state_mb: usize,
    /// Tenants on the evacuated node.
    #[arg(long, default_value_t = 15)]
    evacuate: usize,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn summary(label: &str, mut ms: Vec<f64>) {
    ms.sort_by(f64::total_cmp);
    println!(
        "{label}: n={} p50={:.0} ms p99={:.0} ms max={:.0} ms",
        ms.len(),
        percentile(&ms, 0.5),
        percentile(&ms, 0.99),
        ms.last().copied().unwrap_or(0.0)
    );
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let c = Cluster::start(ClusterOptions {
        nodes: 2,
        min_idle: 2,
        max_idle: 4,
        max_containers: (args.evacuate as u32 + 5).max(20),
        ..Default::default()
    })
    .await?;
    c.wait_idle_at_least(2, Duration::from_secs(120)).await?;
    let machine_before = machine_cpu();

    // One tenant with state, moved back and forth.
    let (_, gw) = c
        .sign_up(
            "bench-move@example.com",
            "benchmove",
            json!({"openai": "sk-bench"}),
        )
        .await?;
    let host = format!("benchmove.{BASE_DOMAIN}");
    let instance = instance_of(&c, "benchmove").await?;
    let (container, node) = placement(&c, instance).await?;
    let state: Vec<u8> = (0..args.state_mb << 20).map(|_| rand_byte()).collect();
    std::fs::write(volume_dir(&c, &node, container).join("state.bin"), &state)?;
    let mut total_ms = Vec::new();
    let mut downtime_ms = Vec::new();
    let mut archive_bytes = 0;
    for _ in 0..args.moves {
        let poller = Poller::start(&c, host.clone(), gw.clone(), Duration::from_millis(20));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = Instant::now();
        let (status, m) = migrate(&c, instance, None).await?;
        anyhow::ensure!(status == 202, "migrate answered {status}: {m}");
        let done = wait_migration(
            &c,
            m["id"].as_str().context("id")?,
            Duration::from_secs(120),
        )
        .await?;
        anyhow::ensure!(done["state"] == "done", "{done}");
        total_ms.push(started.elapsed().as_secs_f64() * 1e3);
        archive_bytes = done["archiveBytes"].as_i64().unwrap_or(0);
        // Until the tenant has answered for a while again.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let seen = poller.stop().await?;
        downtime_ms.push(downtime(&seen).0.as_secs_f64() * 1e3);
    }
    let (moved, node) = placement(&c, instance).await?;
    anyhow::ensure!(
        std::fs::read(volume_dir(&c, &node, moved).join("state.bin"))? == state,
        "the state arrived intact"
    );
    println!(
        "migration of one tenant with {} MB of state (archive {:.1} MB), {} moves:",
        args.state_mb,
        archive_bytes as f64 / 1e6,
        args.moves
    );
    summary(
        "  customer-visible downtime (client every 20 ms)",
        downtime_ms,
    );
    summary("  request to done", total_ms);

    // Evacuation: every tenant on node a moves to b.
    let (a, b) = (c.node_ids[0].clone(), c.node_ids[1].clone());
    drain(&c, &b, None).await?;
    for i in 0..args.evacuate {
        c.sign_up(
            &format!("bench-evac{i}@example.com"),
            &format!("benchevac{i}"),
            json!({"openai": "sk-bench"}),
        )
        .await?;
    }
    c.admin(
        Method::POST,
        &format!("/admin/nodes/{b}/activate"),
        None,
        Some(ADMIN_TOKEN),
    )
    .await?;
    let on_a = c
        .count(&format!(
            "SELECT count(*) FROM instances i JOIN containers c ON c.id = i.container_id WHERE c.node_id = '{a}' AND i.status = 'ready'"
        ))
        .await?;
    let started = Instant::now();
    let (status, body) = drain(&c, &a, Some(json!({"evacuate": true}))).await?;
    anyhow::ensure!(status == 200, "{body}");
    loop {
        let left = c
            .count(&format!(
                "SELECT count(*) FROM containers WHERE node_id = '{a}' AND state = 'assigned'"
            ))
            .await?;
        let live = c
            .count("SELECT count(*) FROM migrations WHERE kind = 'evacuate' AND state IN ('exporting', 'importing')")
            .await?;
        if left == 0 && live == 0 {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "evacuation stalled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = started.elapsed();
    let per_tenant: Vec<f64> = sqlx::query_scalar(
        "SELECT (extract(epoch FROM finished_at - created_at) * 1000)::float8 FROM migrations
          WHERE kind = 'evacuate' AND state = 'done'",
    )
    .fetch_all(&c.db)
    .await?;
    println!(
        "evacuation of {on_a} tenants: {:.1} s ({:.1} tenants/s, 2 at a time)",
        took.as_secs_f64(),
        on_a as f64 / took.as_secs_f64()
    );
    summary(
        "  per-tenant downtime (route paused to switched)",
        per_tenant,
    );

    let machine_after = machine_cpu();
    let busy = machine_after.0 - machine_before.0;
    let all = machine_after.1 - machine_before.1;
    println!(
        "machine CPU: {busy:.1} s busy of {all:.1} s ({:.0}% of all cores) over the run",
        busy / all.max(1e-9) * 100.0
    );
    for (name, pid) in c.pids() {
        println!("  {name}: rss {} KiB", rss_kib(pid).unwrap_or(0));
    }
    Ok(())
}

/// Random-looking bytes (xorshift), so the archive does not compress away.
fn rand_byte() -> u8 {
    use std::cell::Cell;
    thread_local!(static S: Cell<u64> = const { Cell::new(0x9E37_79B9_7F4A_7C15) });
    S.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        x as u8
    })
}
