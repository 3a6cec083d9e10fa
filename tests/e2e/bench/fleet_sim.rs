//! Fleet simulation: many real agents in one process against one real
//! scheduler (PostgreSQL, mTLS gRPC, the real edge watching routes). Each
//! agent is the agent library itself (its session, ledger and reconciler)
//! with its own mTLS certificate; only the container runtime is simulated:
//! `FakeRuntime`, an in-memory engine that is also its containers' gateway,
//! so containers start at once and no traffic leaves the process.
//!
//! Measures the scheduler's CPU and memory under steady heartbeats, then the
//! claim throughput (signups answered 201 by the API while the simulated
//! agents confirm). Run with `scripts/bench-fleet`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clap::Parser;
use clawdeploy_agent::enroll::TlsFiles;
use clawdeploy_agent::ledger::Ledger;
use clawdeploy_agent::run_until;
use clawdeploy_agent::runtime::fake::FakeRuntime;
use clawdeploy_agent::runtime::{ContainerSpec, Limits};
use clawdeploy_agent::session::SessionConfig;
use clawdeploy_e2e::{cpu_secs, metric_value, rss_kib, Cluster, ClusterOptions};
use clawdeploy_proto::client::SchedulerEndpoint;
use clawdeploy_proto::{DesiredContainer, DesiredState, NodeCapacity, Resources};
use clawdeploy_scheduler::crypto::pki::{Ca, Identity};
use clawdeploy_scheduler::crypto::SecretBox;
use serde_json::json;
use uuid::Uuid;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Tenant containers already running on each node.
    #[arg(long, default_value_t = 20)]
    containers_per_node: usize,
    #[arg(long, default_value_t = 2000)]
    heartbeat_ms: u64,
    /// Seconds of steady heartbeats measured.
    #[arg(long, default_value_t = 30)]
    steady_secs: u64,
    /// Signups made at once after the steady phase.
    #[arg(long, default_value_t = 200)]
    signups: usize,
}

/// The upstream of the `n`-th container of node `index`: the address its
/// `FakeRuntime` gives it (see `runtime_of`).
fn upstream(index: usize, n: usize) -> String {
    format!("10.{}.{}.{}:18789", index / 250, index % 250, n % 250 + 2)
}

/// Node `index`'s runtime: its own addresses, `10.<index / 250>.<index % 250>.x`.
fn runtime_of(index: usize) -> FakeRuntime {
    FakeRuntime::on_network((index / 250) as u8, (index % 250) as u8)
}

const SIM_TOKEN: &[u8] = b"fleet-sim-gateway-token";

/// Writes the fleet's existing tenants straight into the database (users,
/// instances, assigned containers, routes), as if they had signed up
/// earlier; returns each node's container ids in order.
async fn seed_tenants(
    c: &Cluster,
    secrets: &SecretBox,
    nodes: &[String],
    per_node: usize,
) -> Result<HashMap<String, Vec<Uuid>>> {
    let mut by_node = HashMap::new();
    for chunk in nodes.chunks(100) {
        let mut tx = c.db.begin().await?;
        sqlx::query(
            "INSERT INTO nodes (id, name, max_containers, state, last_heartbeat, memory_bytes)
             SELECT id, id, 30, 'active', NULL, 68719476736 FROM UNNEST($1::text[]) AS t(id)",
        )
        .bind(chunk)
        .execute(&mut *tx)
        .await?;
        let (
            mut users,
            mut emails,
            mut instances,
            mut subs,
            mut containers,
            mut node_ids,
            mut tokens,
            mut upstreams,
        ) = (
            vec![],
            vec![],
            vec![],
            vec![],
            vec![],
            vec![],
            vec![],
            vec![],
        );
        for node in chunk {
            let index: usize = node
                .rsplit('-')
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let mut ids = Vec::new();
            for n in 0..per_node {
                let (u, i, cid) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
                users.push(u);
                emails.push(format!("{u}@fleet.example.com"));
                instances.push(i);
                subs.push(format!("t{}", &i.simple().to_string()[..16]));
                containers.push(cid);
                node_ids.push(node.clone());
                tokens.push(secrets.seal(
                    &clawdeploy_scheduler::crypto::aad::gateway_token(cid),
                    SIM_TOKEN,
                )?);
                upstreams.push(upstream(index, n));
                ids.push(cid);
            }
            by_node.insert(node.clone(), ids);
        }
        sqlx::query("INSERT INTO users (id, email, password_hash) SELECT u, e, '!' FROM UNNEST($1::uuid[], $2::text[]) AS t(u, e)")
            .bind(&users)
            .bind(&emails)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO containers (id, node_id, image, gateway_token_enc, state, cpu_millis, memory_bytes, pids, upstream, docker_id)
             SELECT c, n, 'clawdeploy/openclaw-standin:dev', t, 'assigned', 500, 536870912, 256, up, 'sim-' || c
               FROM UNNEST($1::uuid[], $2::text[], $3::bytea[], $4::text[]) AS x(c, n, t, up)",
        )
        .bind(&containers)
        .bind(&node_ids)
        .bind(&tokens)
        .bind(&upstreams)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO instances (id, user_id, subdomain, container_id, status, config_version, ready_at)
             SELECT i, u, s, c, 'ready', 1, now() FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::uuid[]) AS x(i, u, s, c)",
        )
        .bind(&instances)
        .bind(&users)
        .bind(&subs)
        .bind(&containers)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO routes (hostname, instance_id, container_id, upstream, version)
             SELECT s || '.clawdeploy.localhost', i, c, up, nextval('route_version')
               FROM UNNEST($1::text[], $2::uuid[], $3::uuid[], $4::text[]) AS x(s, i, c, up)",
        )
        .bind(&subs)
        .bind(&instances)
        .bind(&containers)
        .bind(&upstreams)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
    }
    Ok(by_node)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    let c = Cluster::start(ClusterOptions {
        nodes: 0,
        min_idle: 5,
        max_idle: 20,
        ..Default::default()
    })
    .await?;
    let scheduler_pid = c
        .pids()
        .into_iter()
        .find(|(n, _)| n == "scheduler")
        .map(|(_, p)| p)
        .context("scheduler pid")?;
    let data = c.dir.join("scheduler");
    let secrets = SecretBox::from_hex(std::fs::read_to_string(data.join("secret.key"))?.trim())?;
    let ca = Ca::load_or_create(&data)?;

    let t = Instant::now();
    let node_ids: Vec<String> = (0..a.nodes).map(|i| format!("sim-{i}")).collect();
    let tls = c.dir.join("sim-tls");
    for id in &node_ids {
        let issued = ca.issue(
            &Identity::Node(id.clone()),
            &[],
            Duration::from_secs(24 * 3600),
        )?;
        ca.write_bundle(&tls, id, &issued)?;
    }
    let seeded = seed_tenants(&c, &secrets, &node_ids, a.containers_per_node).await?;
    eprintln!(
        "{} simulated nodes with {} tenants each: certificates and database ready in {:.1} s",
        a.nodes,
        a.containers_per_node,
        t.elapsed().as_secs_f64()
    );

    // The agents' own metrics, summed over the fleet in this process.
    let agents_metrics = clawdeploy_common::metrics::install(
        clawdeploy_agent::telemetry::CATALOG,
        clawdeploy_agent::telemetry::BUCKETS,
    )?;
    let fleet_metric = |name: &str| metric_value(&agents_metrics.render(), name).unwrap_or(0.0);
    let every = Duration::from_millis(a.heartbeat_ms);
    let t = Instant::now();
    // Database time as text: the harness needs no time crate.
    let t0: String = sqlx::query_scalar("SELECT now()::text")
        .fetch_one(&c.db)
        .await?;
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    for (index, id) in node_ids.iter().enumerate() {
        // The node starts out running the tenants the database says it has,
        // and its ledger holds them, as after an agent restart: an agent
        // whose ledger does not name a running container removes it as an
        // orphan.
        let runtime = runtime_of(index);
        let state_dir = c.dir.join("sim-state").join(id);
        let mut ledger = Ledger::open(&state_dir)?;
        ledger.accept(DesiredState {
            generation: 1,
            containers: seeded[id]
                .iter()
                .map(|cid| DesiredContainer {
                    container_id: cid.to_string(),
                    image: "clawdeploy/openclaw-standin:dev".into(),
                    gateway_token: String::from_utf8_lossy(SIM_TOKEN).into_owned(),
                    resources: Some(Resources {
                        cpu_millis: 500,
                        memory_bytes: 512 << 20,
                        pids: 256,
                    }),
                    tenant: None,
                    stopped: false,
                    export: None,
                    import: None,
                })
                .collect(),
        })?;
        drop(ledger);
        for cid in &seeded[id] {
            runtime.insert_running(ContainerSpec {
                container_id: cid.to_string(),
                image: "clawdeploy/openclaw-standin:dev".into(),
                gateway_token: String::from_utf8_lossy(SIM_TOKEN).into_owned(),
                limits: Limits {
                    cpu_millis: 500,
                    memory_bytes: 512 << 20,
                    pids: 256,
                },
                generation: 0,
            });
        }
        let session = SessionConfig {
            node_id: id.clone(),
            scheduler: SchedulerEndpoint {
                urls: vec![format!("https://{}", c.grpc)],
                current: Default::default(),
                server_name: "localhost".into(),
                ca_file: tls.join("ca.crt.pem"),
                cert_file: tls.join(format!("{id}.crt.pem")),
                key_file: tls.join(format!("{id}.key.pem")),
            },
            capacity: NodeCapacity {
                cpu_millis: 16_000,
                memory_bytes: 64 << 30,
                max_containers: 30,
            },
            private_address: String::new(),
            heartbeat_every: every,
            tls: TlsFiles {
                dir: tls.clone(),
                node_id: id.clone(),
            },
        };
        let stop = stop_rx.clone();
        let probe = runtime.clone();
        tokio::spawn(async move {
            if let Err(e) = run_until(session, state_dir, runtime, probe, 2, stop).await {
                eprintln!("agent {index} stopped: {e:#}");
            }
        });
        if index % 50 == 49 {
            // Do not open a thousand TLS handshakes in the same millisecond.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let connected = loop {
        let live: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM nodes WHERE state = 'active' AND last_heartbeat > $1::timestamptz AND id LIKE 'sim-%'",
        )
        .bind(&t0)
        .fetch_one(&c.db)
        .await?;
        if live as usize >= a.nodes {
            break t.elapsed();
        }
        ensure!(
            t.elapsed() < Duration::from_secs(300),
            "only {live} of {} nodes connected",
            a.nodes
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!(
        "all {} simulated agents connected in {:.1} s",
        a.nodes,
        connected.as_secs_f64()
    );
    c.wait_idle_at_least(5, Duration::from_secs(60)).await?;
    // Let the connection burst settle before measuring.
    tokio::time::sleep(Duration::from_secs(5)).await;

    let cpu0 = cpu_secs(scheduler_pid).unwrap_or(0.0);
    let hb0 = fleet_metric("clawdeploy_agent_heartbeats_total");
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(a.steady_secs)).await;
    let wall = t.elapsed().as_secs_f64();
    let cpu = cpu_secs(scheduler_pid).unwrap_or(0.0) - cpu0;
    let beats = fleet_metric("clawdeploy_agent_heartbeats_total") - hb0;
    let unreachable: i64 = sqlx::query_scalar("SELECT count(*) FROM nodes WHERE state <> 'active'")
        .fetch_one(&c.db)
        .await?;
    println!(
        "fleet (real agents over an in-memory runtime, real scheduler/PostgreSQL/mTLS): {} nodes x {} containers, heartbeat every {} ms",
        a.nodes, a.containers_per_node, a.heartbeat_ms
    );
    println!(
        "steady: {:.0} heartbeats/s for {wall:.0} s; scheduler CPU {:.1}% of one core; RSS {} KiB; nodes not active: {unreachable}; sessions opened: {}",
        beats / wall,
        100.0 * cpu / wall,
        rss_kib(scheduler_pid).unwrap_or(0),
        fleet_metric("clawdeploy_agent_sessions_opened_total")
    );

    // Claim throughput: register first (not timed), then sign up at once.
    let accounts = c.register_many("claim", a.signups).await?;
    let cpu0 = cpu_secs(scheduler_pid).unwrap_or(0.0);
    let bodies: Vec<serde_json::Value> = (0..a.signups)
        .map(|i| json!({"subdomain": format!("claim-{i}"), "apiKeys": {"openai": "sk-fleet"}}))
        .collect();
    let t = Instant::now();
    let results = futures::future::join_all(accounts.iter().zip(&bodies).map(|(tok, body)| {
        let c = &c;
        async move {
            let started = Instant::now();
            let (status, answer) = c.create_instance(tok, body).await?;
            ensure!(status == 201, "signup answered {status}: {answer}");
            anyhow::Ok(started.elapsed())
        }
    }))
    .await;
    let wall = t.elapsed().as_secs_f64();
    let cpu = cpu_secs(scheduler_pid).unwrap_or(0.0) - cpu0;
    let mut samples = results.into_iter().collect::<Result<Vec<_>>>()?;
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "claims: {} signups at once answered 201 in {wall:.2} s: {:.0} signups/s, p50 {:.0} ms, p99 {:.0} ms; scheduler CPU {:.2} s; fallbacks (on-demand) {}",
        samples.len(),
        samples.len() as f64 / wall,
        ms(percentile(&samples, 0.5)),
        ms(percentile(&samples, 0.99)),
        cpu,
        c.scheduler_metric(0, "clawdeploy_claim_fallbacks_total").await?
    );
    println!(
        "scheduler RSS after claims: {} KiB; tenant configs proven live by the agents: {}",
        rss_kib(scheduler_pid).unwrap_or(0),
        fleet_metric("clawdeploy_agent_config_apply_seconds_count")
    );
    Ok(())
}
