//! Faults of the one source of truth, injected for real on a PostgreSQL
//! server of the test's own: a fast restart in the middle of a burst of
//! signups, and the server gone for 30 seconds. Clients see answers they
//! can act on (201, 202, or a 503 JSON with Retry-After they retry with the
//! same Idempotency-Key), never a 500; nothing is half-applied; every
//! process carries on without a restart when the database is back.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clawdeploy_e2e::invariants::sign_up_retrying;
use clawdeploy_e2e::pg::PgServer;
use clawdeploy_e2e::{wait_for, Cluster, ClusterOptions};
use reqwest::Method;
use serde_json::{json, Value};

const BURST: usize = 20;

/// Whether every process the cluster started is still the one it started
/// (alive, not a zombie).
fn all_alive(c: &Cluster) -> Vec<String> {
    c.pids()
        .into_iter()
        .filter(|(_, pid)| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| {
                    s.rsplit(')')
                        .next()
                        .unwrap_or("")
                        .trim_start()
                        .starts_with('Z')
                })
                .unwrap_or(true)
        })
        .map(|(name, _)| name)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_mid_burst_gives_no_500_and_loses_nothing() -> Result<()> {
    let pg = PgServer::for_test("restart")?;
    let c = Cluster::start(ClusterOptions {
        nodes: 2,
        min_idle: 10,
        max_idle: 12,
        max_containers: 20,
        admin_db_url: Some(pg.admin_url()),
        ..Default::default()
    })
    .await?;
    c.wait_idle_at_least(10, Duration::from_secs(120)).await?;
    let tokens = c.register_many("burst", BURST).await?;

    // 20 signups in flight; the database restarts under them.
    let signups = futures::future::join_all(
        tokens
            .iter()
            .enumerate()
            .map(|(i, t)| sign_up_retrying(&c, t, format!("burst{i}"))),
    );
    let restart = async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let started = Instant::now();
        let pg = &pg;
        tokio::task::block_in_place(|| pg.restart_fast())?;
        anyhow::Ok(started.elapsed())
    };
    let (answers, took) = tokio::join!(signups, restart);
    println!(
        "PostgreSQL restarted (pg_ctl restart -m fast) in {:?}",
        took?
    );
    let mut retried = 0;
    let mut statuses = BTreeMap::<u16, usize>::new();
    for a in &answers {
        let (_, _, seen) = a.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
        retried += usize::from(seen.len() > 1);
        for s in seen {
            *statuses.entry(*s).or_default() += 1;
        }
    }
    println!("answers seen across the burst: {statuses:?}; {retried} signups retried");
    assert!(!statuses.contains_key(&500), "no 500: {statuses:?}");

    // Every signup goes live and answers with its own token at the edge.
    for (i, t) in tokens.iter().enumerate() {
        let gw = c.wait_ready_token(t, Duration::from_secs(120)).await?;
        let host = format!("burst{i}.{}", clawdeploy_e2e::BASE_DOMAIN);
        let (status, _) = c.edge_get(&host, "/v1/models", Some(&gw)).await?;
        assert_eq!(status, 200, "{host} answers with its own token");
    }
    assert_eq!(
        c.count("SELECT count(*) FROM instances WHERE status = 'ready'")
            .await?,
        BURST as i64,
        "one instance per signup, no more"
    );
    clawdeploy_e2e::invariants::check(&c).await?;
    // The pool refills and Docker matches the database.
    c.wait_idle_at_least(10, Duration::from_secs(120)).await?;
    c.wait_docker_matches_db(Duration::from_secs(60)).await?;
    assert!(
        all_alive(&c).is_empty(),
        "no process died: {:?}",
        all_alive(&c)
    );
    Ok(())
}

#[tokio::test]
async fn thirty_seconds_without_postgres_answer_503_serve_tenants_and_resume() -> Result<()> {
    let pg = PgServer::for_test("outage")?;
    let c = Cluster::start(ClusterOptions {
        nodes: 1,
        min_idle: 2,
        max_idle: 3,
        admin_db_url: Some(pg.admin_url()),
        ..Default::default()
    })
    .await?;
    c.wait_idle_at_least(2, Duration::from_secs(120)).await?;
    let (account, gw) = c
        .sign_up(
            "before@example.com",
            "before",
            json!({"openai": "sk-before-1234567"}),
        )
        .await?;
    let host = format!("before.{}", clawdeploy_e2e::BASE_DOMAIN);
    assert_eq!(c.edge_get(&host, "/v1/models", Some(&gw)).await?.0, 200);
    let pids = c.pids();

    pg.stop_fast()?;
    let outage = Instant::now();
    // The API: 503 JSON with Retry-After, within a bound (the pool's
    // acquire timeout), for reads, writes and the health check.
    for (method, path, body) in [
        (Method::GET, "/healthz", None),
        (Method::GET, "/api/instances/me", None),
        (
            Method::POST,
            "/api/auth/register",
            Some(json!({"email": "during@example.com", "password": "correct-horse-battery"})),
        ),
    ] {
        let started = Instant::now();
        let mut req = c
            .client
            .request(method.clone(), c.api(path))
            .bearer_auth(&account);
        if let Some(b) = &body {
            req = req.json(b);
        }
        let r = req.send().await?;
        let took = started.elapsed();
        let status = r.status().as_u16();
        let retry_after = r.headers().get("retry-after").cloned();
        let answer: Value = r
            .json()
            .await
            .with_context(|| format!("{method} {path}: JSON"))?;
        println!(
            "{method} {path} with the database down: {status} {} in {took:?}",
            answer["error"]["code"]
        );
        assert_eq!(status, 503, "{method} {path}: {answer}");
        assert_eq!(
            answer["error"]["code"], "database_unavailable",
            "{method} {path}"
        );
        assert!(retry_after.is_some(), "{method} {path}: Retry-After");
        assert!(
            took < Duration::from_secs(10),
            "{method} {path} took {took:?}"
        );
    }
    // The edge keeps serving the tenant for the whole outage.
    let mut served = 0;
    while outage.elapsed() < Duration::from_secs(30) {
        let (status, _) = c.edge_get(&host, "/v1/models", Some(&gw)).await?;
        assert_eq!(
            status, 200,
            "the edge serves its tenant with the database down"
        );
        served += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!("the edge answered {served} requests during a 30 s outage");
    assert!(
        all_alive(&c).is_empty(),
        "no process died: {:?}",
        all_alive(&c)
    );

    pg.start_again()?;
    let back = Instant::now();
    wait_for(
        Duration::from_secs(30),
        "the health check to pass",
        || async { Ok(c.client.get(c.api("/healthz")).send().await?.status() == 200) },
    )
    .await?;
    println!("healthy {:?} after the database returned", back.elapsed());
    // Everything resumes without a restart: the node reconnects, a new
    // signup goes live end to end, the old tenant still answers.
    c.wait_nodes_connected(Duration::from_secs(60)).await?;
    let (_, gw2) = c
        .sign_up(
            "after@example.com",
            "after",
            json!({"openai": "sk-after-1234567"}),
        )
        .await?;
    let host2 = format!("after.{}", clawdeploy_e2e::BASE_DOMAIN);
    wait_for(
        Duration::from_secs(30),
        "the new tenant at the edge",
        || async { Ok(c.edge_get(&host2, "/v1/models", Some(&gw2)).await?.0 == 200) },
    )
    .await?;
    assert_eq!(c.edge_get(&host, "/v1/models", Some(&gw)).await?.0, 200);
    println!(
        "a new signup went live {:?} after the database returned",
        back.elapsed()
    );
    assert_eq!(c.pids(), pids, "no process was restarted");
    clawdeploy_e2e::invariants::check(&c).await?;
    c.wait_idle_at_least(2, Duration::from_secs(60)).await?;
    Ok(())
}
