//! Metering proxy benchmark: the proxy against calling the upstream
//! stand-in directly, in one run, on this machine (the load generator, the
//! proxy, the upstream and PostgreSQL share its cores). It sets up a fresh
//! database with `--tenants` paid instances holding credits (sealed gateway
//! tokens, so every request is authenticated as in production) and prints:
//!
//! - added latency p50/p99 at `--rate` requests/s (open loop, timed from
//!   each request's planned start), whole answers and streams' first byte;
//! - the most requests/s with `--concurrency` requests in flight;
//! - `--streams` streams open at once: the proxy's CPU and memory per
//!   stream.
//!
//! Run with `scripts/bench-llm-proxy`.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use clawdeploy_common::sealed::{aad, SecretBox};
use clawdeploy_e2e::{bin_dir, cpu_secs, free_addr, rss_kib, wait_for};
use serde_json::json;
use uuid::Uuid;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Seconds of each open-loop phase.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    #[arg(long, default_value_t = 2000)]
    streams: usize,
    #[arg(long, default_value_t = 100)]
    tenants: usize,
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

/// Latencies (ms) of requests started at `rate` a second for `secs`,
/// each timed from its planned start; `first_byte`: to the first chunk.
async fn open_loop(
    target: Arc<dyn Fn(u64) -> reqwest::RequestBuilder + Send + Sync>,
    rate: u64,
    secs: u64,
    first_byte: bool,
) -> (Vec<f64>, u64) {
    let total = rate * secs;
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for n in 0..total {
        let planned = start + Duration::from_nanos(n * 1_000_000_000 / rate);
        tokio::time::sleep_until(planned.into()).await;
        let req = target(n);
        tasks.push(tokio::spawn(async move {
            let r = req.send().await.ok()?;
            if !r.status().is_success() {
                return None;
            }
            let mut r = r;
            if first_byte {
                r.chunk().await.ok()??;
                let at = planned.elapsed();
                while let Ok(Some(_)) = r.chunk().await {}
                Some(at.as_secs_f64() * 1000.0)
            } else {
                r.bytes().await.ok()?;
                Some(planned.elapsed().as_secs_f64() * 1000.0)
            }
        }));
    }
    let mut ms = Vec::new();
    let mut failed = 0;
    for t in tasks {
        match t.await.ok().flatten() {
            Some(v) => ms.push(v),
            None => failed += 1,
        }
    }
    ms.sort_by(f64::total_cmp);
    (ms, failed)
}

/// Requests a second with `concurrency` in flight for `secs`.
async fn closed_loop(
    target: Arc<dyn Fn(u64) -> reqwest::RequestBuilder + Send + Sync>,
    concurrency: usize,
    secs: u64,
) -> f64 {
    let until = Instant::now() + Duration::from_secs(secs);
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let workers: Vec<_> = (0..concurrency)
        .map(|w| {
            let (target, done) = (target.clone(), done.clone());
            tokio::spawn(async move {
                let mut n = w as u64;
                while Instant::now() < until {
                    if let Ok(r) = target(n).send().await {
                        if r.status().is_success() && r.bytes().await.is_ok() {
                            done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                    n += concurrency as u64;
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.await;
    }
    done.load(std::sync::atomic::Ordering::Relaxed) as f64 / secs as f64
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    let admin = std::env::var("CLAWDEPLOY_TEST_PG").context("CLAWDEPLOY_TEST_PG")?;
    let base = admin
        .rsplit_once('/')
        .context("a database URL")?
        .0
        .to_owned();
    let name = format!("cd_bench_llm_{}", &Uuid::new_v4().simple().to_string()[..8]);
    let pool = sqlx::PgPool::connect(&admin).await?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&pool)
        .await?;
    let db_url = format!("{base}/{name}");
    let db = sqlx::PgPool::connect(&db_url).await?;
    clawdeploy_scheduler::db::migrate(&db).await?;

    // Tenants: paid, with credits, each on a container whose gateway token
    // is sealed under the KEK, so the proxy checks tokens as in production.
    let key_hex = SecretBox::generate_key_hex();
    let kek = SecretBox::from_hex(&key_hex)?;
    let dir = std::env::temp_dir().join(&name);
    std::fs::create_dir_all(&dir)?;
    let key_file = dir.join("secret.key");
    std::fs::write(&key_file, &key_hex)?;
    sqlx::query("INSERT INTO nodes (id, name) VALUES ('bench', 'bench')")
        .execute(&db)
        .await?;
    let mut tokens = Vec::new();
    for t in 0..a.tenants {
        let (user, instance, container) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let gateway = clawdeploy_common::sealed::random_token(32);
        sqlx::query("INSERT INTO users (id, email, password_hash) VALUES ($1, $2, 'x')")
            .bind(user)
            .bind(format!("bench{t}@example.com"))
            .execute(&db)
            .await?;
        sqlx::query("INSERT INTO billing_accounts (user_id, tier) VALUES ($1, 'pro')")
            .bind(user)
            .execute(&db)
            .await?;
        sqlx::query(
            "INSERT INTO credit_balances (user_id, balance_micros) VALUES ($1, 1000000000000)",
        )
        .bind(user)
        .execute(&db)
        .await?;
        sqlx::query(
            "INSERT INTO containers (id, node_id, image, state, gateway_token_enc, cpu_millis, memory_bytes, pids)
             VALUES ($1, 'bench', 'bench', 'assigned', $2, 500, 536870912, 256)",
        )
        .bind(container)
        .bind(kek.seal(&aad::gateway_token(container), gateway.as_bytes())?)
        .execute(&db)
        .await?;
        sqlx::query("INSERT INTO instances (id, user_id, subdomain, status, container_id) VALUES ($1, $2, $3, 'ready', $4)")
            .bind(instance)
            .bind(user)
            .bind(format!("bench{t}"))
            .bind(container)
            .execute(&db)
            .await?;
        tokens.push(clawdeploy_common::proxy_token::derive(
            &instance.to_string(),
            &gateway,
        ));
    }

    let upstream = free_addr();
    let _upstream = Kill(
        Command::new(bin_dir().join("clawdeploy-llm-standin"))
            .args([
                "--listen",
                &upstream.to_string(),
                "--api-key",
                "sk-bench",
                "--models",
                "openai/gpt-4o-mini",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let proxy = free_addr();
    let proxy_child = Command::new(bin_dir().join("clawdeploy-llm-proxy"))
        .args([
            "--listen",
            &proxy.to_string(),
            "--metrics-listen",
            &free_addr().to_string(),
        ])
        .args(["--database-url", &db_url])
        .arg("--secret-key-file")
        .arg(&key_file)
        .args([
            "--credits-upstream-url",
            &format!("http://{upstream}/v1"),
            "--credits-upstream-key",
            "sk-bench",
        ])
        .args(["--rate-per-sec", "1000000", "--rate-burst", "1000000"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let pid = proxy_child.id();
    let _proxy = Kill(proxy_child);
    wait_for(
        Duration::from_secs(20),
        "the proxy and upstream up",
        || async {
            Ok(reqwest::get(format!("http://{proxy}/healthz"))
                .await
                .is_ok()
                && reqwest::get(format!("http://{upstream}/v1/models"))
                    .await
                    .is_ok())
        },
    )
    .await?;

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(4096)
        .build()?;
    let tokens = Arc::new(tokens);
    let body = |stream: bool, words: usize| {
        let text = (0..words)
            .map(|i| format!("w{i}"))
            .collect::<Vec<_>>()
            .join(" ");
        json!({"model": "openai/gpt-4o-mini", "stream": stream, "messages": [{"role": "user", "content": text}]})
    };
    let direct =
        |stream: bool, words: usize| -> Arc<dyn Fn(u64) -> reqwest::RequestBuilder + Send + Sync> {
            let (client, b) = (client.clone(), body(stream, words));
            Arc::new(move |_| {
                client
                    .post(format!("http://{upstream}/v1/chat/completions"))
                    .bearer_auth("sk-bench")
                    .json(&b)
            })
        };
    let proxied =
        |stream: bool, words: usize| -> Arc<dyn Fn(u64) -> reqwest::RequestBuilder + Send + Sync> {
            let (client, b, tokens) = (client.clone(), body(stream, words), tokens.clone());
            let mut b = b;
            b["model"] = json!("gpt-4o-mini");
            Arc::new(move |n| {
                client
                    .post(format!("http://{proxy}/p/openai/v1/chat/completions"))
                    .bearer_auth(&tokens[n as usize % tokens.len()])
                    .json(&b)
            })
        };
    // Warm the proxy's caches, leases and connection pools.
    let _ = closed_loop(proxied(false, 8), 32, 2).await;
    let _ = closed_loop(direct(false, 8), 32, 1).await;

    println!(
        "# metering proxy vs the upstream directly ({} tenants)",
        a.tenants
    );
    for (label, stream) in [("whole answer", false), ("stream, first byte", true)] {
        let (d, df) = open_loop(direct(stream, 8), a.rate, a.secs, stream).await;
        let cpu0 = cpu_secs(pid).unwrap_or(0.0);
        let (p, pf) = open_loop(proxied(stream, 8), a.rate, a.secs, stream).await;
        let cpu = cpu_secs(pid).unwrap_or(0.0) - cpu0;
        println!(
            "{label:<20} at {} req/s: direct p50 {:.2} ms p99 {:.2} ms | proxy p50 {:.2} ms p99 {:.2} ms | added p50 {:.2} ms p99 {:.2} ms | proxy CPU {:.0} µs/req | failed {df}/{pf}",
            a.rate,
            pct(&d, 0.5),
            pct(&d, 0.99),
            pct(&p, 0.5),
            pct(&p, 0.99),
            pct(&p, 0.5) - pct(&d, 0.5),
            pct(&p, 0.99) - pct(&d, 0.99),
            cpu * 1e6 / (a.rate * a.secs) as f64,
        );
    }
    let d = closed_loop(direct(false, 8), a.concurrency, a.secs).await;
    let cpu0 = cpu_secs(pid).unwrap_or(0.0);
    let p = closed_loop(proxied(false, 8), a.concurrency, a.secs).await;
    let cpu = cpu_secs(pid).unwrap_or(0.0) - cpu0;
    println!(
        "throughput, {} in flight: direct {d:.0} req/s | proxy {p:.0} req/s | proxy CPU {:.0}% of a core",
        a.concurrency,
        cpu * 100.0 / a.secs as f64
    );

    // Streams held open at once: a long answer (1,500 words, ~3 s).
    let idle_rss = rss_kib(pid).unwrap_or(0);
    let cpu0 = cpu_secs(pid).unwrap_or(0.0);
    let target = proxied(true, 1500);
    let opened = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let streams: Vec<_> = (0..a.streams as u64)
        .map(|n| {
            let (req, opened) = (target(n), opened.clone());
            tokio::spawn(async move {
                let mut r = req.send().await.ok()?;
                r.chunk().await.ok()??;
                opened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let mut bytes = 0usize;
                while let Ok(Some(c)) = r.chunk().await {
                    bytes += c.len();
                }
                Some(bytes)
            })
        })
        .collect();
    let mut peak_rss = idle_rss;
    let mut peak_open = 0;
    while started.elapsed() < Duration::from_secs(30) {
        let open = opened.load(std::sync::atomic::Ordering::Relaxed);
        peak_open = peak_open.max(open);
        peak_rss = peak_rss.max(rss_kib(pid).unwrap_or(0));
        if streams.iter().all(|s| s.is_finished()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut completed = 0;
    for s in streams {
        if s.await.ok().flatten().is_some() {
            completed += 1;
        }
    }
    let cpu = cpu_secs(pid).unwrap_or(0.0) - cpu0;
    println!(
        "{} streams at once: {completed} completed, {peak_open} open together | proxy RSS {} → {} KiB ({:.1} KiB per stream) | CPU {:.2} ms per stream",
        a.streams,
        idle_rss,
        peak_rss,
        (peak_rss.saturating_sub(idle_rss)) as f64 / a.streams.max(1) as f64,
        cpu * 1000.0 / a.streams.max(1) as f64,
    );
    drop(_proxy);
    db.close().await;
    sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .execute(&pool)
        .await?;
    Ok(())
}
