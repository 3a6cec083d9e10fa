//! A soak of the whole system (local only, bounded): for `--minutes`,
//! signups, key changes and releases keep coming from `--clients`
//! concurrent customers; a node is drained and activated in turn; and every
//! `--fault-every-secs` one fault from the fault tests is injected for real
//! (PostgreSQL restarted, an agent's path silenced, the edge cut off, a
//! lossy and slow agent path). At the end, with every fault healed, the
//! invariants must hold: every ready instance answers at the edge with its
//! own token (and refuses another's), no container serves two instances,
//! Docker runs what the database says, no released name is routed. Prints
//! the figures; exits non-zero on any 500 or broken invariant.
//!
//! Run with `scripts/soak` (not part of `scripts/test`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use clawdeploy_e2e::invariants::{self, sign_up_retrying};
use clawdeploy_e2e::ops::{activate, drain};
use clawdeploy_e2e::pg::PgServer;
use clawdeploy_e2e::{machine_cpu, rss_kib, Cluster, ClusterOptions, BASE_DOMAIN};
use reqwest::Method;
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// How long the load and the faults go on.
    #[arg(long, default_value_t = 20)]
    minutes: u64,
    /// Concurrent customers.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// A fault this often (they take turns).
    #[arg(long, default_value_t = 120)]
    fault_every_secs: u64,
}

/// What the customers saw, by operation and HTTP status.
#[derive(Default)]
struct Tally {
    answers: BTreeMap<(&'static str, u16), u64>,
    signup_ms: Vec<f64>,
    released: Vec<String>,
    /// Subdomain and account token of the instances kept to the end.
    kept: Vec<(String, String)>,
}

impl Tally {
    fn count(&mut self, op: &'static str, status: u16) {
        *self.answers.entry((op, status)).or_default() += 1;
    }
}

/// A tiny deterministic generator (no dependency): xorshift.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Instances one customer keeps at once; beyond, its oldest is released
/// (the fleet stays below its capacity however long the soak runs).
const KEEP_PER_CUSTOMER: usize = 3;

/// Releases the caller's instance, retrying 503s.
async fn release(c: &Cluster, sub: &str, token: &str, tally: &Mutex<Tally>) -> Result<()> {
    loop {
        let (s, b) = c.my_instance(Method::DELETE, token, None).await?;
        tally.lock().unwrap().count("release", s);
        match s {
            200 => break,
            503 => tokio::time::sleep(Duration::from_secs(1)).await,
            _ => anyhow::bail!("release {sub}: {s} {b}"),
        }
    }
    tally.lock().unwrap().released.push(sub.to_owned());
    Ok(())
}

/// One customer's life, over and over until `stop`: sign up, change keys a
/// few times, release (or keep: at most `KEEP_PER_CUSTOMER` at once).
async fn customer(c: &Cluster, who: usize, stop: &AtomicBool, tally: &Mutex<Tally>) -> Result<()> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (who as u64 + 1));
    let mut round = 0;
    let mut kept: Vec<(String, String)> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        round += 1;
        let sub = format!("soak{who}r{round}");
        let token = loop {
            let r = c
                .client
                .post(c.api("/api/auth/register"))
                .json(&json!({"email": format!("{sub}@example.com"), "password": "correct-horse-battery"}))
                .send()
                .await?;
            let status = r.status().as_u16();
            tally.lock().unwrap().count("register", status);
            let body: serde_json::Value = r.json().await.unwrap_or_default();
            match status {
                201 => break body["token"].as_str().context("token")?.to_owned(),
                503 => tokio::time::sleep(Duration::from_secs(1)).await,
                _ => anyhow::bail!("register {sub}: {status} {body}"),
            }
        };
        let started = Instant::now();
        let (status, _, seen) = sign_up_retrying(c, &token, sub.clone()).await?;
        {
            let mut t = tally.lock().unwrap();
            for s in seen {
                t.count("signup", s);
            }
            if status == 201 {
                t.signup_ms.push(started.elapsed().as_secs_f64() * 1000.0);
            }
        }
        c.wait_ready_token(&token, Duration::from_secs(180)).await?;
        for k in 0..rng.below(3) + 1 {
            tokio::time::sleep(Duration::from_millis(500 + rng.below(1500))).await;
            let body = json!({"apiKeys": {"openai": format!("sk-soak-{who}-{round}-{k}-1234567")}});
            let (s, b) = c.my_instance(Method::PATCH, &token, Some(&body)).await?;
            tally.lock().unwrap().count("keys", s);
            anyhow::ensure!(matches!(s, 200 | 202 | 503), "key change {sub}: {s} {b}");
        }
        if rng.below(3) > 0 {
            // Two in three release at once; the others stay a while.
            release(c, &sub, &token, tally).await?;
        } else {
            kept.push((sub, token));
            if kept.len() > KEEP_PER_CUSTOMER {
                let (old_sub, old_token) = kept.remove(0);
                release(c, &old_sub, &old_token, tally).await?;
            }
        }
    }
    tally.lock().unwrap().kept.extend(kept);
    Ok(())
}

/// Injects the faults in turn until `stop`; returns what it did.
async fn faults(
    c: &Cluster,
    pg: &PgServer,
    every: Duration,
    stop: &AtomicBool,
    began: Instant,
) -> Result<Vec<String>> {
    let mut done = Vec::new();
    let a = c.node_ids[0].clone();
    let b = c.node_ids[1].clone();
    let mut turn = 0;
    loop {
        let wake = Instant::now() + every;
        while Instant::now() < wake {
            if stop.load(Ordering::Relaxed) {
                return Ok(done);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let started = Instant::now();
        let what = match turn % 5 {
            0 => {
                tokio::task::block_in_place(|| pg.restart_fast())?;
                "PostgreSQL restarted (pg_ctl restart -m fast)"
            }
            1 => {
                let _cut = c.relay(&a).blackhole()?;
                tokio::time::sleep(Duration::from_secs(25)).await;
                "agent a's path silent for 25 s"
            }
            2 => {
                let _cut = c.relay("edge-1").blackhole()?;
                tokio::time::sleep(Duration::from_secs(30)).await;
                "the edge cut off for 30 s"
            }
            3 => {
                c.relay(&b).set_delay(Duration::from_millis(200));
                let lossy = c.relay(&b).lossy(0.3)?;
                tokio::time::sleep(Duration::from_secs(30)).await;
                drop(lossy);
                c.relay(&b).set_delay(Duration::ZERO);
                "agent b's path at 30% loss and 200 ms for 30 s"
            }
            _ => {
                // A node drained, then activated.
                let node = if turn % 2 == 0 { &a } else { &b };
                let (s, _) = drain(c, node, None).await?;
                anyhow::ensure!(s == 200, "drain {node}: {s}");
                tokio::time::sleep(Duration::from_secs(20)).await;
                activate(c, node).await?;
                "a node drained for 20 s, then activated"
            }
        };
        println!(
            "[{:>5.0} s] fault: {what} (took {:.1} s)",
            began.elapsed().as_secs_f64(),
            started.elapsed().as_secs_f64()
        );
        done.push(what.to_owned());
        turn += 1;
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let pg = PgServer::for_test("soak")?;
    let c = Cluster::start(ClusterOptions {
        nodes: 2,
        min_idle: 4,
        max_idle: 8,
        max_containers: 40,
        claim_wait_secs: 20,
        relays: true,
        admin_db_url: Some(pg.admin_url()),
        ..Default::default()
    })
    .await?;
    c.wait_idle_at_least(4, Duration::from_secs(120)).await?;
    let cpu0 = machine_cpu();
    let began = Instant::now();
    println!(
        "soak: {} min, {} customers, a fault every {} s",
        args.minutes, args.clients, args.fault_every_secs
    );
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Mutex::new(Tally::default());
    let deadline = async {
        tokio::time::sleep(Duration::from_secs(args.minutes * 60)).await;
        stop.store(true, Ordering::Relaxed);
    };
    let customers =
        futures::future::join_all((0..args.clients).map(|i| customer(&c, i, &stop, &tally)));
    let (results, injected, ()) = tokio::join!(
        customers,
        faults(
            &c,
            &pg,
            Duration::from_secs(args.fault_every_secs),
            &stop,
            began
        ),
        deadline
    );
    let mut failures: Vec<String> = results
        .into_iter()
        .filter_map(|r| r.err().map(|e| format!("{e:#}")))
        .collect();
    let injected = injected?;

    // Everything healed: the system settles, then the invariants.
    if let Err(e) = c.wait_nodes_connected(Duration::from_secs(120)).await {
        failures.push(format!("nodes: {e:#}"));
    }
    if let Err(e) = c.wait_idle_at_least(4, Duration::from_secs(180)).await {
        failures.push(format!("pool: {e:#}"));
    }
    if let Err(e) = invariants::check(&c).await {
        failures.push(format!("invariant: {e:#}"));
    }
    if let Err(e) = c.wait_docker_matches_db(Duration::from_secs(120)).await {
        failures.push(format!("Docker: {e:#}"));
    }
    // Each kept instance answers with its own token and refuses another's.
    let kept = tally.lock().unwrap().kept.clone();
    let mut tokens = Vec::new();
    for (sub, account) in &kept {
        tokens.push((
            sub.clone(),
            c.wait_ready_token(account, Duration::from_secs(60)).await?,
        ));
    }
    let mut answered = 0;
    for (i, (sub, token)) in tokens.iter().enumerate() {
        let host = format!("{sub}.{BASE_DOMAIN}");
        let (s, _) = c.edge_get(&host, "/v1/models", Some(token)).await?;
        if s == 200 {
            answered += 1;
        } else {
            failures.push(format!("{host} answered {s} with its own token"));
        }
        let (other_sub, other) = &tokens[(i + 1) % tokens.len()];
        if other_sub != sub {
            let (s, _) = c.edge_get(&host, "/v1/models", Some(other)).await?;
            if s != 401 {
                failures.push(format!("{host} answered {s} with another tenant's token"));
            }
        }
    }
    let released = tally.lock().unwrap().released.clone();
    for sub in &released {
        let (s, _) = c
            .edge_get(&format!("{sub}.{BASE_DOMAIN}"), "/v1/models", None)
            .await?;
        if s != 404 {
            failures.push(format!("released {sub} answered {s} at the edge"));
        }
    }

    let cpu1 = machine_cpu();
    let (busy, all) = (cpu1.0 - cpu0.0, cpu1.1 - cpu0.1);
    let t = tally.into_inner().unwrap();
    let mut ms = t.signup_ms.clone();
    ms.sort_by(f64::total_cmp);
    println!(
        "ran {:.0} s; faults injected: {}",
        began.elapsed().as_secs_f64(),
        injected.len()
    );
    for f in &injected {
        println!("  - {f}");
    }
    println!("answers by operation and status:");
    for ((op, status), n) in &t.answers {
        println!("  {op:>8} {status}: {n}");
    }
    println!(
        "signups answered 201: n={} p50={:.0} ms p99={:.0} ms max={:.0} ms",
        ms.len(),
        percentile(&ms, 0.5),
        percentile(&ms, 0.99),
        ms.last().copied().unwrap_or(0.0)
    );
    println!(
        "at the end: {answered} of {} kept instances answered with their own tokens, {} released names 404",
        tokens.len(),
        released.len()
    );
    println!(
        "machine CPU: {busy:.0} s busy of {all:.0} s ({:.0}% of all cores); scheduler RSS {} KiB",
        busy / all.max(1e-9) * 100.0,
        rss_kib(c.pids()[0].1).unwrap_or(0)
    );
    let five_hundreds: u64 = t
        .answers
        .iter()
        .filter(|((_, s), _)| *s >= 500 && *s != 503)
        .map(|(_, n)| n)
        .sum();
    if five_hundreds > 0 {
        failures.push(format!("{five_hundreds} answers were 5xx other than 503"));
    }
    if failures.is_empty() {
        println!("soak passed: every invariant holds");
        Ok(())
    } else {
        for f in &failures {
            eprintln!("FAILED: {f}");
        }
        anyhow::bail!("{} failures", failures.len())
    }
}
