//! Migrations on the real system: a tenant's container moves to another
//! node with its state volume, through the S3-compatible store that
//! `scripts/test` starts (moto), while a client keeps calling it through the
//! edge; a scheduler killed mid-way resumes; a target agent that dies
//! mid-import leaves the tenant on its source.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clawdeploy_e2e::ops::{
    downtime, drain, instance_of, migrate, placement, volume_dir, wait_migration, Poller,
};
use clawdeploy_e2e::{wait_for, Cluster, ClusterOptions, ADMIN_TOKEN, BASE_DOMAIN};
use reqwest::Method;
use serde_json::json;
use uuid::Uuid;

fn docker_has(container: Uuid) -> bool {
    let out = std::process::Command::new("docker")
        .args(["ps", "-aq", "--filter"])
        .arg(format!("label=clawdeploy.container={container}"))
        .output()
        .expect("docker ps");
    !String::from_utf8_lossy(&out.stdout).trim().is_empty()
}

#[tokio::test]
async fn an_instance_moves_with_its_state_while_a_client_calls_it() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        nodes: 2,
        min_idle: 2,
        max_idle: 4,
        ..Default::default()
    })
    .await?;
    c.wait_idle_at_least(2, Duration::from_secs(120)).await?;
    let (_, gw) = c
        .sign_up("mover@example.com", "mover", json!({"openai": "sk-move-1"}))
        .await?;
    let host = format!("mover.{BASE_DOMAIN}");
    let instance = instance_of(&c, "mover").await?;
    let (source, from) = placement(&c, instance).await?;
    let to = c.node_ids.iter().find(|n| **n != from).unwrap().clone();

    // The tenant writes into its state.
    let note = format!("written on {from} at {:?}", Instant::now());
    let file = volume_dir(&c, &from, source).join("notes.txt");
    std::fs::write(&file, &note)?;

    let polling = Poller::start(&c, host.clone(), gw.clone(), Duration::from_millis(50));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, started) = migrate(&c, instance, Some(&to)).await?;
    assert_eq!(status, 202, "{started}");
    assert_eq!(started["state"], "exporting", "{started}");
    assert_eq!(started["sourceNode"], from.as_str());
    assert_eq!(started["targetNode"], to.as_str());
    // A second request for the same instance while the first runs: 409.
    let (status, again) = migrate(&c, instance, None).await?;
    assert_eq!(status, 409, "{again}");
    assert_eq!(again["error"]["code"], "migration_in_progress", "{again}");

    let id = started["id"].as_str().context("id")?;
    let done = wait_migration(&c, id, Duration::from_secs(90)).await?;
    assert_eq!(done["state"], "done", "{done}");
    let steps: Vec<&str> = done["steps"]
        .as_array()
        .context("steps")?
        .iter()
        .filter_map(|s| s["state"].as_str())
        .collect();
    assert_eq!(steps, ["exporting", "importing", "done"], "{done}");
    assert!(done["archiveBytes"].as_i64().unwrap_or(0) > note.len() as i64);
    // Long enough for a request that hung on the stopped source to give up.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let seen = polling.stop().await?;
    let (longest, failed) = downtime(&seen);
    println!(
        "migration downtime: {} ms between two answers ({failed} of {} requests, one every 50 ms, failed)",
        longest.as_millis(),
        seen.len()
    );
    let after: Vec<bool> = seen.iter().rev().take(10).map(|(_, ok)| *ok).collect();
    assert!(
        after.iter().all(|ok| *ok),
        "the tenant answers after the move: {after:?}"
    );

    // On the target now, with its state, the same gateway token and keys.
    let (target, node) = placement(&c, instance).await?;
    assert_eq!(node, to);
    assert_ne!(target, source);
    assert_eq!(
        std::fs::read_to_string(volume_dir(&c, &to, target).join("notes.txt"))?,
        note
    );
    let (status, models) = c.edge_get(&host, "/v1/models", Some(&gw)).await?;
    assert_eq!(status, 200, "{models}");
    assert!(models.contains("openai"), "{models}");
    // The source is gone from Docker and from disk.
    wait_for(
        Duration::from_secs(30),
        "the source container removed",
        || async { Ok(!docker_has(source) && !file.exists()) },
    )
    .await?;
    let audit: i64 = c
        .count(&format!(
            "SELECT count(*) FROM audit_log WHERE subject = '{instance}' AND action IN ('instance.migrate', 'instance.migrated')"
        ))
        .await?;
    assert_eq!(audit, 2);
    assert!(c.scheduler_metric(0, "clawdeploy_migrations_total").await? >= 1.0);
    Ok(())
}

#[tokio::test]
async fn a_killed_scheduler_resumes_and_a_dead_target_leaves_the_tenant_on_its_source() -> Result<()>
{
    let mut c = Cluster::start(ClusterOptions {
        nodes: 2,
        min_idle: 2,
        max_idle: 4,
        ..Default::default()
    })
    .await?;
    c.wait_idle_at_least(2, Duration::from_secs(120)).await?;
    let (_, gw) = c
        .sign_up(
            "steady@example.com",
            "steady",
            json!({"anthropic": "sk-ant-1"}),
        )
        .await?;
    let host = format!("steady.{BASE_DOMAIN}");
    let instance = instance_of(&c, "steady").await?;

    // The scheduler is SIGKILLed right after the migration starts; the one
    // started in its place finishes it.
    let (source, from) = placement(&c, instance).await?;
    std::fs::write(volume_dir(&c, &from, source).join("keep.txt"), "kept")?;
    let (status, started) = migrate(&c, instance, None).await?;
    assert_eq!(status, 202, "{started}");
    c.kill_scheduler();
    let id = started["id"].as_str().context("id")?.to_owned();
    let state_at_kill: String =
        sqlx::query_scalar("SELECT state FROM migrations WHERE id = $1::uuid")
            .bind(&id)
            .fetch_one(&c.db)
            .await?;
    assert!(
        state_at_kill == "exporting" || state_at_kill == "importing",
        "killed mid-way: {state_at_kill}"
    );
    c.start_scheduler()?;
    c.wait_http_up().await?;
    let done = wait_migration(&c, &id, Duration::from_secs(90)).await?;
    assert_eq!(done["state"], "done", "{done}");
    let (moved, to) = placement(&c, instance).await?;
    assert_ne!(to, from);
    assert_eq!(
        std::fs::read_to_string(volume_dir(&c, &to, moved).join("keep.txt"))?,
        "kept"
    );
    wait_for(
        Duration::from_secs(30),
        "the tenant answering on its new node",
        || async { Ok(c.edge_get(&host, "/v1/models", Some(&gw)).await?.0 == 200) },
    )
    .await?;

    // Now the target's agent dies in the middle of the import (a crash
    // point just before the archive is unpacked): the migration rolls back
    // and the tenant runs again where it was, with its state.
    let back = c.node_ids.iter().position(|n| *n == from).unwrap();
    c.kill_agent(back);
    c.start_agent_env(back, &[("CLAWDEPLOY_AGENT_CRASH_AT", "import")])?;
    c.wait_nodes_connected(Duration::from_secs(60)).await?;
    let (status, started) = migrate(&c, instance, Some(&from)).await?;
    assert_eq!(status, 202, "{started}");
    let id = started["id"].as_str().context("id")?.to_owned();
    c.wait_agent_exit(back, Duration::from_secs(60)).await?;
    let ended = wait_migration(&c, &id, Duration::from_secs(90)).await?;
    assert_eq!(ended["state"], "rolled_back", "{ended}");
    assert!(
        ended["error"]
            .as_str()
            .unwrap_or("")
            .contains("target node"),
        "{ended}"
    );
    assert_eq!(placement(&c, instance).await?, (moved, to.clone()));
    wait_for(
        Duration::from_secs(60),
        "the tenant answering on its source",
        || async { Ok(c.edge_get(&host, "/v1/models", Some(&gw)).await?.0 == 200) },
    )
    .await?;
    assert_eq!(
        std::fs::read_to_string(volume_dir(&c, &to, moved).join("keep.txt"))?,
        "kept"
    );
    Ok(())
}

#[tokio::test]
async fn evacuating_a_node_moves_every_tenant_and_removal_waits_for_it() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        nodes: 2,
        min_idle: 4,
        max_idle: 12,
        ..Default::default()
    })
    .await?;
    let (a, b) = (c.node_ids[0].clone(), c.node_ids[1].clone());
    // Every tenant on node a: b drains while they sign up.
    assert_eq!(drain(&c, &b, None).await?.0, 200);
    c.wait_idle_at_least(4, Duration::from_secs(120)).await?;
    let mut tenants = Vec::new();
    for i in 0..10 {
        let (_, gw) = c
            .sign_up(
                &format!("evac{i}@example.com"),
                &format!("evac{i}"),
                json!({"openai": format!("sk-evac-{i}")}),
            )
            .await?;
        let instance = instance_of(&c, &format!("evac{i}")).await?;
        assert_eq!(placement(&c, instance).await?.1, a);
        tenants.push((format!("evac{i}.{BASE_DOMAIN}"), gw, instance));
    }
    let (status, _) = c
        .admin(
            Method::POST,
            &format!("/admin/nodes/{b}/activate"),
            None,
            Some(ADMIN_TOKEN),
        )
        .await?;
    assert_eq!(status, 200);

    // Removing a node with tenants is refused; a bad body or query is a 400.
    let remove = |q: &str| format!("/admin/nodes/{a}{q}");
    let (status, body) = c
        .admin(Method::DELETE, &remove(""), None, Some(ADMIN_TOKEN))
        .await?;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "node_has_tenants");
    let (status, _) = c
        .admin(Method::DELETE, &remove("?forse=1"), None, Some(ADMIN_TOKEN))
        .await?;
    assert_eq!(status, 400);
    assert_eq!(
        drain(&c, &a, Some(json!({"evacuate": "yes"}))).await?.0,
        400
    );

    let started = Instant::now();
    let (status, body) = drain(&c, &a, Some(json!({"evacuate": true}))).await?;
    assert_eq!(status, 200, "{body}");
    // Progress shows on the node while it runs; never more than the
    // bound (2) migrate at once.
    let mut most = 0;
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let (_, v) = c
            .admin(Method::GET, "/admin/nodes", None, Some(ADMIN_TOKEN))
            .await?;
        let node = v["nodes"]
            .as_array()
            .context("nodes")?
            .iter()
            .find(|n| n["id"] == a.as_str())
            .cloned()
            .context("node a")?;
        let e = &node["evacuation"];
        most = most.max(e["migrating"].as_i64().unwrap_or(0));
        if e["remaining"] == 0 && e["migrating"] == 0 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "node a not evacuated: {node}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = started.elapsed();
    assert!(most <= 2, "{most} migrated at once");
    let mut downtimes: Vec<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM finished_at - created_at)::float8 FROM migrations
          WHERE kind = 'evacuate' AND state = 'done' ORDER BY 1",
    )
    .fetch_all(&c.db)
    .await?;
    assert_eq!(downtimes.len(), 10, "{downtimes:?}");
    downtimes.sort_by(f64::total_cmp);
    println!(
        "evacuated 10 tenants in {:.1} s; per-tenant downtime p50 {:.0} ms, max {:.0} ms",
        took.as_secs_f64(),
        downtimes[4] * 1e3,
        downtimes[9] * 1e3
    );
    for (host, gw, instance) in &tenants {
        assert_eq!(placement(&c, *instance).await?.1, b);
        let (status, models) = c.edge_get(host, "/v1/models", Some(gw)).await?;
        assert_eq!(status, 200, "{host}: {models}");
    }
    // Empty now: the node goes.
    let (status, body) = c
        .admin(Method::DELETE, &remove(""), None, Some(ADMIN_TOKEN))
        .await?;
    assert_eq!(status, 200, "{body}");
    Ok(())
}
