//! Clock skew between the scheduler and its agents: one agent's wall clock
//! runs 3 minutes ahead, the other's 3 minutes behind (libfaketime; their
//! monotonic clocks are real). With one-minute node certificates, both
//! renew on schedule (no storm ahead, no lapse behind), neither is ever
//! marked unreachable (heartbeats are judged by the database's clock, not
//! the agent's), claims land on both, and after a scheduler restart both
//! reconnect with the certificates they hold.

use std::time::{Duration, Instant};

use anyhow::Result;
use clawdeploy_e2e::ops::{activate, drain};
use clawdeploy_e2e::{Cluster, ClusterOptions, BASE_DOMAIN};
use serde_json::json;

#[tokio::test]
async fn agents_three_minutes_off_renew_heartbeat_and_reconnect() -> Result<()> {
    let mut c = Cluster::start(ClusterOptions {
        nodes: 2,
        min_idle: 2,
        max_idle: 4,
        join: true,
        node_cert_ttl_secs: Some(60),
        clock_skew: vec![(0, "+3m".into()), (1, "-3m".into())],
        ..Default::default()
    })
    .await?;
    c.wait_idle(2, true, Duration::from_secs(120)).await?;
    let (a, b) = (c.node_ids[0].clone(), c.node_ids[1].clone());

    // A claim on each node.
    for (name, drained, on) in [("ahead", &b, &a), ("behind", &a, &b)] {
        assert_eq!(drain(&c, drained, None).await?.0, 200);
        let (_, gw) = c
            .sign_up(
                &format!("{name}@example.com"),
                name,
                json!({"openai": "sk-skew-1234567"}),
            )
            .await?;
        let node: String = sqlx::query_scalar(
            "SELECT c.node_id FROM instances i JOIN containers c ON c.id = i.container_id WHERE i.subdomain = $1",
        )
        .bind(name)
        .fetch_one(&c.db)
        .await?;
        assert_eq!(&node, on);
        assert_eq!(
            c.edge_get(&format!("{name}.{BASE_DOMAIN}"), "/v1/models", Some(&gw))
                .await?
                .0,
            200
        );
        activate(&c, drained).await?;
    }

    // Over 100 s (well past a certificate lifetime) each agent renews about every
    // half-span (37.5 s) by its own monotonic clock.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(100) {
        let live = c
            .count("SELECT count(*) FROM nodes WHERE state = 'active' AND last_heartbeat > now() - interval '5 seconds'")
            .await?;
        assert_eq!(live, 2, "both nodes heartbeat throughout");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    for i in 0..2 {
        let renewals = c
            .agent_metric(i, "clawdeploy_agent_cert_renewals_total")
            .await?;
        println!(
            "agent {} ({}) renewed {renewals} times in 100 s",
            i,
            ["+3m", "-3m"][i]
        );
        assert!(
            (1.0..=8.0).contains(&renewals),
            "agent {i}: {renewals} renewals in 100 s of one-minute certificates"
        );
    }
    assert_eq!(
        c.count("SELECT count(*) FROM audit_log WHERE action = 'node.unreachable'")
            .await?,
        0,
        "no node was ever marked unreachable"
    );

    // Every connection made again, with the certificates the agents hold
    // now.
    c.kill_scheduler();
    c.start_scheduler()?;
    c.wait_http_up().await?;
    c.wait_nodes_connected(Duration::from_secs(60)).await?;
    Ok(())
}
