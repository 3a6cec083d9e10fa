//! A node whose disk fills: its agent's state directory (ledger and tenant
//! volumes) is on a small tmpfs the test fills to the last byte. The agent
//! reports it at its next heartbeat; the scheduler stops placing there; a
//! claim that reached the node just before fails over to another node
//! with no error for the customer; the ledger is left whole (atomic
//! writes); the tenants already there keep serving; freeing the disk
//! brings the node back.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clawdeploy_e2e::ops::{activate, drain};
use clawdeploy_e2e::{wait_for, Cluster, ClusterOptions, BASE_DOMAIN};
use serde_json::json;

const MIN_DISK: u64 = 16 << 20;

async fn node_of(c: &Cluster, subdomain: &str) -> Result<Option<String>> {
    Ok(sqlx::query_scalar(
        "SELECT c.node_id FROM instances i JOIN containers c ON c.id = i.container_id WHERE i.subdomain = $1",
    )
    .bind(subdomain)
    .fetch_optional(&c.db)
    .await?)
}

async fn disk_available(c: &Cluster, node: &str) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT disk_available_bytes FROM nodes WHERE id = $1")
            .bind(node)
            .fetch_one(&c.db)
            .await?,
    )
}

/// Writes zeros into `dir/filler` until the file system refuses.
fn fill(dir: &std::path::Path) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(dir.join("filler"))?;
    let chunk = vec![0u8; 1 << 20];
    loop {
        if let Err(e) = f.write_all(&chunk).and_then(|_| f.sync_data()) {
            anyhow::ensure!(e.raw_os_error() == Some(28), "filling: {e}");
            break;
        }
    }
    // The last bytes too.
    while f.write_all(&[0u8; 512]).is_ok() {}
    Ok(())
}

#[tokio::test]
async fn a_full_disk_stops_placement_fails_claims_over_and_keeps_the_ledger() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        nodes: 2,
        min_idle: 4,
        max_idle: 6,
        small_state_disk: Some((0, 64)),
        scheduler_args: vec!["--node-min-disk-bytes".into(), MIN_DISK.to_string()],
        ..Default::default()
    })
    .await?;
    let (a, b) = (c.node_ids[0].clone(), c.node_ids[1].clone());
    c.wait_idle(4, true, Duration::from_secs(120)).await?;
    // A tenant on a, before anything fills.
    assert_eq!(drain(&c, &b, None).await?.0, 200);
    let (_, resident_gw) = c
        .sign_up(
            "resident@example.com",
            "resident",
            json!({"openai": "sk-res-1234567"}),
        )
        .await?;
    assert_eq!(node_of(&c, "resident").await?.as_deref(), Some(a.as_str()));
    let resident = format!("resident.{BASE_DOMAIN}");
    let token = c.register("racer@example.com").await?;
    let ledger_path = c.state_dir(0).join("desired-state.pb");

    // The disk fills while the scheduler has not heard of it yet (the agent
    // paused between two heartbeats), and a claim lands on a.
    c.pause_agent(0, true)?;
    fill(&c.state_dir(0))?;
    let ledger_before = std::fs::read(&ledger_path)?;
    let racer = json!({"subdomain": "racer", "apiKeys": {"openai": "sk-race-1234567"}});
    let signup = c.create_instance(&token, &racer);
    let steer = async {
        wait_for(
            Duration::from_secs(10),
            "the claim to land on a",
            || async { Ok(node_of(&c, "racer").await?.as_deref() == Some(a.as_str())) },
        )
        .await?;
        // Now b may take it, and a hears of the claim.
        activate(&c, &b).await?;
        c.pause_agent(0, false)?;
        anyhow::Ok(Instant::now())
    };
    let ((status, body), resumed) = {
        let (s, r) = tokio::join!(signup, steer);
        (s?, r?)
    };
    assert!(
        matches!(status, 201 | 202),
        "the customer sees no error: {status} {body}"
    );
    let gw = if status == 201 {
        body["instance"]["gatewayToken"]
            .as_str()
            .context("token")?
            .to_owned()
    } else {
        c.wait_ready_token(&token, Duration::from_secs(60)).await?
    };
    println!(
        "a claim sent to the full node answered {status} and went live on the other node {:?} after the agent resumed",
        resumed.elapsed()
    );
    assert_eq!(
        node_of(&c, "racer").await?.as_deref(),
        Some(b.as_str()),
        "failed over"
    );
    assert_eq!(
        c.edge_get(&format!("racer.{BASE_DOMAIN}"), "/v1/models", Some(&gw))
            .await?
            .0,
        200
    );

    // The agent reported the disk; the ledger is whole and unchanged (the
    // new state was refused, not half written).
    assert!(disk_available(&c, &a).await? < MIN_DISK as i64);
    let known_full: String = sqlx::query_scalar("SELECT now()::text")
        .fetch_one(&c.db)
        .await?;
    assert_eq!(
        std::fs::read(&ledger_path)?,
        ledger_before,
        "the ledger is intact"
    );
    let leftovers: Vec<_> = std::fs::read_dir(c.state_dir(0))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .map(|e| e.file_name())
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    assert!(
        c.agent_metric(0, "clawdeploy_agent_ledger_write_failures_total")
            .await?
            >= 1.0
    );

    // Nothing new lands on a; its tenant keeps serving.
    for i in 0..3 {
        let sub = format!("later{i}");
        c.sign_up(
            &format!("{sub}@example.com"),
            &sub,
            json!({"openai": "sk-later-1234567"}),
        )
        .await?;
        assert_eq!(
            node_of(&c, &sub).await?.as_deref(),
            Some(b.as_str()),
            "{sub}"
        );
    }
    assert_eq!(
        c.edge_get(&resident, "/v1/models", Some(&resident_gw))
            .await?
            .0,
        200
    );
    let pool_on_a: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM containers WHERE node_id = $1 AND created_at > $2::timestamptz",
    )
    .bind(&a)
    .bind(known_full)
    .fetch_one(&c.db)
    .await?;
    assert_eq!(
        pool_on_a, 0,
        "no pool container is created on the full node"
    );

    // Space again: a heartbeat reports it, the agent takes its desired
    // state, and the node takes claims again.
    std::fs::remove_file(c.state_dir(0).join("filler"))?;
    wait_for(
        Duration::from_secs(30),
        "a to report free space",
        || async { Ok(disk_available(&c, &a).await? >= MIN_DISK as i64) },
    )
    .await?;
    wait_for(
        Duration::from_secs(30),
        "a to apply its desired state",
        || async {
            let want: i64 = sqlx::query_scalar("SELECT generation FROM nodes WHERE id = $1")
                .bind(&a)
                .fetch_one(&c.db)
                .await?;
            Ok(c.agent_metric(0, "clawdeploy_agent_desired_generation")
                .await? as i64
                >= want)
        },
    )
    .await?;
    assert_ne!(
        std::fs::read(&ledger_path)?,
        ledger_before,
        "the ledger moves on"
    );
    assert_eq!(
        c.edge_get(&resident, "/v1/models", Some(&resident_gw))
            .await?
            .0,
        200
    );
    c.wait_docker_matches_db(Duration::from_secs(60)).await?;
    Ok(())
}
