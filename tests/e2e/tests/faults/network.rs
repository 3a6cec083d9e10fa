//! A network that goes silent or bad between one part and the scheduler,
//! made for real: every agent and the edge reach the scheduler through a
//! relay port of their own, and the kernel drops that port's packets
//! (`iptables -j DROP`: nothing is refused, nothing closes) or a random
//! share of them, while the relay adds latency.
//!
//! - An agent cut off is marked unreachable within the TTL; its tenants keep
//!   serving through the edge (the data path does not cross the cut); no
//!   tenant is destroyed or restarted; when the path heals the session
//!   resumes and the node is healthy again.
//! - On a link with 30% loss and 200 ms of latency each way, claims still
//!   complete and nothing is duplicated.
//! - An edge cut off serves its table; the route changes made meanwhile (a
//!   new tenant, a released one) reach it when it reconnects, in order.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clawdeploy_e2e::ops::{activate, drain};
use clawdeploy_e2e::{wait_for, Cluster, ClusterOptions, BASE_DOMAIN};
use reqwest::Method;
use serde_json::{json, Value};

async fn node_state(c: &Cluster, node: &str) -> Result<String> {
    Ok(
        sqlx::query_scalar("SELECT state::text FROM nodes WHERE id = $1")
            .bind(node)
            .fetch_one(&c.db)
            .await?,
    )
}

/// Docker's start time and restart count of the instance's container.
async fn started(c: &Cluster, subdomain: &str) -> Result<(String, String, Value)> {
    let (node, docker_id): (String, String) = sqlx::query_as(
        "SELECT c.node_id, c.docker_id FROM instances i JOIN containers c ON c.id = i.container_id
          WHERE i.subdomain = $1 AND i.status = 'ready'",
    )
    .bind(subdomain)
    .fetch_one(&c.db)
    .await?;
    let d = c.docker_inspect(&docker_id)?;
    Ok((
        node,
        d["State"]["StartedAt"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        d["RestartCount"].clone(),
    ))
}

#[tokio::test]
async fn a_silent_agent_is_unreachable_keeps_its_tenants_and_resumes() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        nodes: 2,
        min_idle: 4,
        max_idle: 6,
        relays: true,
        ..Default::default()
    })
    .await?;
    let (a, b) = (c.node_ids[0].clone(), c.node_ids[1].clone());
    c.wait_idle(4, true, Duration::from_secs(120)).await?;
    // Two tenants on node a (b drained while they sign up).
    assert_eq!(drain(&c, &b, None).await?.0, 200);
    let mut tenants = Vec::new();
    for name in ["cut1", "cut2"] {
        let (_, gw) = c
            .sign_up(
                &format!("{name}@example.com"),
                name,
                json!({"openai": "sk-cut-1234567"}),
            )
            .await?;
        let (node, at, restarts) = started(&c, name).await?;
        assert_eq!(node, a);
        tenants.push((name, gw, at, restarts));
    }
    activate(&c, &b).await?;
    let agent_pid = c
        .pids()
        .into_iter()
        .find(|(n, _)| *n == a)
        .context("agent a")?
        .1;

    // The path between agent a and the scheduler goes silent.
    let cut = c.relay(&a).blackhole()?;
    let since = Instant::now();
    wait_for(
        Duration::from_secs(30),
        "node a to be unreachable",
        || async { Ok(node_state(&c, &a).await? == "unreachable") },
    )
    .await?;
    println!(
        "node a unreachable {:?} after its path went silent",
        since.elapsed()
    );
    // Its tenants keep serving through the edge for the whole cut, and
    // signups meanwhile land on b.
    let (_, gw3) = c
        .sign_up(
            "during@example.com",
            "during",
            json!({"openai": "sk-cut-1234567"}),
        )
        .await?;
    assert_eq!(
        started(&c, "during").await?.0,
        b,
        "a signup avoids the silent node"
    );
    while since.elapsed() < Duration::from_secs(45) {
        for (name, gw, ..) in &tenants {
            let host = format!("{name}.{BASE_DOMAIN}");
            assert_eq!(
                c.edge_get(&host, "/v1/models", Some(gw)).await?.0,
                200,
                "{host} during the cut"
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(node_state(&c, &a).await?, "unreachable");

    drop(cut);
    let healed = Instant::now();
    c.wait_nodes_connected(Duration::from_secs(60)).await?;
    println!(
        "node a active again {:?} after the path healed",
        healed.elapsed()
    );
    // Nothing was destroyed or restarted; the same agent process resumed.
    for (name, gw, at, restarts) in &tenants {
        let (node, at2, restarts2) = started(&c, name).await?;
        assert_eq!(
            (&node, &at2, &restarts2),
            (&a, at, restarts),
            "{name} was not restarted"
        );
        let host = format!("{name}.{BASE_DOMAIN}");
        assert_eq!(c.edge_get(&host, "/v1/models", Some(gw)).await?.0, 200);
    }
    let host3 = format!("during.{BASE_DOMAIN}");
    assert_eq!(c.edge_get(&host3, "/v1/models", Some(&gw3)).await?.0, 200);
    assert_eq!(
        c.pids().into_iter().find(|(n, _)| *n == a).map(|p| p.1),
        Some(agent_pid),
        "the agent was not restarted"
    );
    assert_eq!(
        c.count("SELECT count(*) FROM instances WHERE status = 'ready'")
            .await?,
        3
    );
    c.wait_docker_matches_db(Duration::from_secs(60)).await?;
    Ok(())
}

#[tokio::test]
async fn claims_complete_over_a_lossy_slow_link_without_duplicates() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        nodes: 2,
        min_idle: 6,
        max_idle: 8,
        claim_wait_secs: 30,
        relays: true,
        ..Default::default()
    })
    .await?;
    let (a, b) = (c.node_ids[0].clone(), c.node_ids[1].clone());
    c.wait_idle(6, true, Duration::from_secs(120)).await?;
    assert_eq!(drain(&c, &b, None).await?.0, 200);
    let tokens = c.register_many("lossy", 4).await?;

    // 200 ms each way and 30% of the packets lost, between a and the
    // scheduler.
    c.relay(&a).set_delay(Duration::from_millis(200));
    let _loss = c.relay(&a).lossy(0.3)?;
    let started = Instant::now();
    let c = &c;
    let answers = futures::future::join_all(tokens.iter().enumerate().map(|(i, t)| {
        let body =
            json!({"subdomain": format!("lossy{i}"), "apiKeys": {"openai": "sk-lossy-1234567"}});
        async move { c.create_instance(t, &body).await }
    }))
    .await;
    for a in &answers {
        let (status, body) = a.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
        assert!(
            matches!(status, 201 | 202),
            "signup over a bad link: {status} {body}"
        );
    }
    let mut gws = Vec::new();
    for t in &tokens {
        gws.push(c.wait_ready_token(t, Duration::from_secs(180)).await?);
    }
    println!(
        "4 claims over 30% loss and 200 ms each way: ready after {:?}; answers {:?}",
        started.elapsed(),
        answers
            .iter()
            .map(|a| a.as_ref().map(|x| x.0).unwrap_or(0))
            .collect::<Vec<_>>()
    );
    for (i, gw) in gws.iter().enumerate() {
        let host = format!("lossy{i}.{BASE_DOMAIN}");
        assert_eq!(
            c.edge_get(&host, "/v1/models", Some(gw)).await?.0,
            200,
            "{host}"
        );
        assert_eq!(started_node(c, &format!("lossy{i}")).await?, a);
    }
    // Nothing duplicated: one instance per account, one container per
    // instance, Docker as the database says.
    assert_eq!(
        c.count("SELECT count(*) FROM instances WHERE status <> 'deleted'")
            .await?,
        4
    );
    assert_eq!(
        c.count("SELECT count(*) FROM containers WHERE state = 'assigned'")
            .await?,
        4
    );
    drop(_loss);
    c.relay(&a).set_delay(Duration::ZERO);
    c.wait_docker_matches_db(Duration::from_secs(90)).await?;
    Ok(())
}

async fn started_node(c: &Cluster, subdomain: &str) -> Result<String> {
    Ok(started(c, subdomain).await?.0)
}

#[tokio::test]
async fn an_edge_cut_off_serves_its_table_and_catches_up_in_order() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        nodes: 1,
        min_idle: 4,
        max_idle: 5,
        relays: true,
        ..Default::default()
    })
    .await?;
    c.wait_idle_at_least(4, Duration::from_secs(120)).await?;
    let (old_account, old_gw) = c
        .sign_up(
            "old@example.com",
            "old",
            json!({"openai": "sk-old-1234567"}),
        )
        .await?;
    let old_host = format!("old.{BASE_DOMAIN}");
    assert_eq!(
        c.edge_get(&old_host, "/v1/models", Some(&old_gw)).await?.0,
        200
    );
    let (_, stay_gw) = c
        .sign_up(
            "stay@example.com",
            "stay",
            json!({"openai": "sk-stay-1234567"}),
        )
        .await?;
    let stay_host = format!("stay.{BASE_DOMAIN}");

    let cut = c.relay("edge-1").blackhole()?;
    let since = Instant::now();
    // Route changes while the edge hears nothing: a new tenant, and the old
    // one released (a tombstone).
    let (_, new_gw) = c
        .sign_up(
            "new@example.com",
            "new",
            json!({"openai": "sk-new-1234567"}),
        )
        .await?;
    let new_host = format!("new.{BASE_DOMAIN}");
    assert_eq!(
        c.my_instance(Method::DELETE, &old_account, None).await?.0,
        200
    );
    let latest: i64 = sqlx::query_scalar("SELECT max(version) FROM routes")
        .fetch_one(&c.db)
        .await?;
    // The edge serves the table it has for the whole cut.
    while since.elapsed() < Duration::from_secs(60) {
        assert_eq!(
            c.edge_get(&stay_host, "/v1/models", Some(&stay_gw))
                .await?
                .0,
            200,
            "the edge serves its table while cut off"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let before = c.edge_metric("clawdeploy_edge_route_version").await?;
    assert!(
        (before as i64) < latest,
        "the edge heard nothing while cut off"
    );

    drop(cut);
    let healed = Instant::now();
    wait_for(Duration::from_secs(60), "the edge to catch up", || async {
        Ok(c.edge_metric("clawdeploy_edge_route_version").await? as i64 >= latest)
    })
    .await?;
    println!(
        "the edge caught up {:?} after the path healed (route version {latest})",
        healed.elapsed()
    );
    assert_eq!(
        c.edge_get(&new_host, "/v1/models", Some(&new_gw)).await?.0,
        200
    );
    assert_eq!(
        c.edge_get(&stay_host, "/v1/models", Some(&stay_gw))
            .await?
            .0,
        200
    );
    assert_eq!(
        c.edge_get(&old_host, "/v1/models", Some(&old_gw)).await?.0,
        404,
        "the tombstone arrived"
    );
    assert_eq!(
        c.edge_metric("clawdeploy_edge_scheduler_connected").await?,
        1.0
    );
    Ok(())
}
