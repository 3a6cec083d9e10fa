//! A full fleet queues signups instead of refusing them: with room for N,
//! N + 20 concurrent signups give N instances and 20 answers `202 queued`;
//! a release gives its slot to the first in line; a node joins (a join
//! token, a new agent) and the rest go live in arrival order, without the
//! clients retrying; beyond the queue's bound, 503.

use std::time::Duration;

use anyhow::{Context, Result};
use clawdeploy_e2e::{docker_cleanup_node, wait_for, Cluster, ClusterOptions, ADMIN_TOKEN};
use reqwest::Method;
use serde_json::{json, Value};

const N: usize = 6;
const QUEUED: usize = 20;

#[tokio::test]
async fn a_full_fleet_queues_signups_and_a_joining_node_takes_them_in_order() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        nodes: 1,
        min_idle: 2,
        max_idle: 4,
        max_containers: N as u32,
        claim_wait_secs: 30,
        scheduler_args: ["--signup-queue-max", &QUEUED.to_string()]
            .map(String::from)
            .to_vec(),
        ..Default::default()
    })
    .await?;
    c.wait_idle_at_least(2, Duration::from_secs(120)).await?;
    let tokens = c.register_many("queue", N + QUEUED + 1).await?;
    let max: i32 = sqlx::query_scalar("SELECT max_containers FROM nodes")
        .fetch_one(&c.db)
        .await?;
    assert_eq!(max, N as i32, "the node's capacity");

    // N + 20 at once: N get a container, 20 wait in line.
    let answers: Vec<(u16, Value)> =
        futures::future::join_all(tokens[..N + QUEUED].iter().enumerate().map(|(i, t)| {
            let c = &c;
            async move {
                let body = json!({"subdomain": format!("queue{i}"), "apiKeys": {"openai": "sk-q"}});
                c.create_instance(t, &body).await
            }
        }))
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    let live = answers
        .iter()
        .filter(|(s, v)| *s == 201 || (*s == 202 && v["instance"]["status"] != "queued"))
        .count();
    let queued: Vec<&Value> = answers
        .iter()
        .filter(|(s, v)| *s == 202 && v["instance"]["status"] == "queued")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(live, N, "{answers:?}");
    assert_eq!(queued.len(), QUEUED, "{answers:?}");
    assert!(
        queued
            .iter()
            .all(|v| v["instance"]["statusUrl"].is_string()),
        "{queued:?}"
    );
    // The queue is full: the next one is refused, retryably.
    let r = c
        .client
        .post(c.api("/api/instances"))
        .bearer_auth(&tokens[N + QUEUED])
        .json(&json!({"subdomain": "qlate"}))
        .send()
        .await?;
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let body: Value = r.json().await?;
    assert_eq!(body["error"]["code"], "no_capacity");
    wait_for(
        Duration::from_secs(10),
        "the queue depth exported",
        || async {
            Ok(c.scheduler_metric(0, "clawdeploy_signup_queue_depth")
                .await?
                == QUEUED as f64)
        },
    )
    .await?;
    let (_, nodes) = c
        .admin(Method::GET, "/admin/nodes", None, Some(ADMIN_TOKEN))
        .await?;
    assert_eq!(nodes["nodes"][0]["freeSlots"], 0, "{nodes}");

    // A customer with a container releases it: its slot goes to the first
    // in line at once (the stopped container keeps only its volume).
    let first_live = answers
        .iter()
        .position(|(s, _)| *s == 201)
        .context("a live signup")?;
    let (status, _) = c
        .my_instance(Method::DELETE, &tokens[first_live], None)
        .await?;
    assert_eq!(status, 200);
    wait_for(
        Duration::from_secs(60),
        "one queued signup live after a release",
        || async {
            Ok(
                c.count("SELECT count(*) FROM instances WHERE status = 'queued'")
                    .await?
                    == QUEUED as i64 - 1,
            )
        },
    )
    .await?;

    // A node joins with room for all of them.
    let node = format!("{}-z", c.name);
    let t = c.join_token(&node, None).await?;
    let tls = c.dir.join("tls-z");
    let env = [
        (
            "CLAWDEPLOY_JOIN_TOKEN",
            t["token"].as_str().context("token")?,
        ),
        ("CLAWDEPLOY_CA_PIN", t["caPin"].as_str().context("pin")?),
        ("CLAWDEPLOY_MAX_CONTAINERS", "30"),
    ];
    let (mut agent, _log) = c.spawn_agent_env_with(&node, &tls, &env)?;
    let result = async {
        wait_for(
            Duration::from_secs(180),
            "every queued signup ready",
            || async {
                let n = c
                    .count("SELECT count(*) FROM instances WHERE status = 'ready'")
                    .await?;
                Ok(n == (N + QUEUED - 1) as i64)
            },
        )
        .await?;
        // In arrival order: each queued instance got its container no later
        // than every one queued after it (the first after the release, on
        // the old node; the others on the new one).
        let ids: Vec<uuid::Uuid> = queued
            .iter()
            .filter_map(|v| v["instance"]["id"].as_str()?.parse().ok())
            .collect();
        let order: Vec<(String, bool)> = sqlx::query_as(
            "SELECT i.subdomain,
                    c.claimed_at <= ALL (SELECT c2.claimed_at FROM instances i2
                                          JOIN containers c2 ON c2.id = i2.container_id
                                         WHERE i2.id = ANY($1) AND i2.created_at > i.created_at)
               FROM instances i JOIN containers c ON c.id = i.container_id
              WHERE i.id = ANY($1) ORDER BY i.created_at",
        )
        .bind(&ids)
        .fetch_all(&c.db)
        .await?;
        assert_eq!(order.len(), QUEUED, "{order:?}");
        assert!(order.iter().all(|(_, in_order)| *in_order), "{order:?}");
        // Each answers through the edge with the token its status URL gives.
        for v in &queued {
            let url = v["instance"]["statusUrl"].as_str().context("statusUrl")?;
            let i = answers
                .iter()
                .position(|(_, a)| a["instance"]["statusUrl"] == url)
                .unwrap();
            let r = c
                .client
                .get(c.api(url))
                .bearer_auth(&tokens[i])
                .send()
                .await?;
            let inst: Value = r.json().await?;
            assert_eq!(inst["instance"]["status"], "ready", "{inst}");
            let host = format!("queue{i}.{}", clawdeploy_e2e::BASE_DOMAIN);
            let gw = inst["instance"]["gatewayToken"].as_str().context("token")?;
            let (status, body) = c.edge_get(&host, "/v1/models", Some(gw)).await?;
            assert_eq!(status, 200, "{host}: {body}");
        }
        assert_eq!(
            c.scheduler_metric(0, "clawdeploy_signup_queue_depth")
                .await?,
            0.0
        );
        anyhow::Ok(())
    }
    .await;
    let _ = agent.kill();
    let _ = agent.wait();
    docker_cleanup_node(&node);
    result
}
