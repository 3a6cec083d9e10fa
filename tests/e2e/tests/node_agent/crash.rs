//! Crash consistency at each step of a claim, and tenants serving without
//! the scheduler.

use super::*;

/// Kills the agent (SIGKILL) at `point` during a claim, restarts it, and
/// checks the claim completes with no container duplicated.
async fn claim_survives_agent_kill_at(point: &str) -> Result<()> {
    let mut c = Cluster::start(ClusterOptions {
        nodes: 1,
        min_idle: 2,
        claim_wait_secs: 3,
        ..Default::default()
    })
    .await?;
    c.wait_idle(2, false, Duration::from_secs(120)).await?;
    let running_before = start_times(&c);
    c.kill_agent(0);
    c.start_agent_env(0, &[("CLAWDEPLOY_AGENT_CRASH_AT", point)])?;
    c.wait_nodes_connected(Duration::from_secs(30)).await?;

    let sub = format!("crash-{point}");
    let account = c.register(&email(point)).await?;
    let (status, body) = c
        .create_instance(
            &account,
            &json!({"subdomain": sub, "apiKeys": {"anthropic": "sk-ant-crash"}}),
        )
        .await?;
    // The agent died before confirming: the customer is told to wait, and
    // gets the gateway token from the status URL once the instance is live.
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["instance"]["status"], "pending");
    assert!(body["instance"]["gatewayToken"].is_null(), "{body}");
    let status_url = body["instance"]["statusUrl"]
        .as_str()
        .context("status URL")?
        .to_owned();
    let st = c.wait_agent_exit(0, Duration::from_secs(30)).await?;
    assert!(
        !st.success(),
        "the agent should have been killed at {point}"
    );
    assert!(log_of(&c, &c.node_ids[0]).contains("crash point reached"));

    c.start_agent(0)?;
    wait_for(Duration::from_secs(60), "instance ready", || async {
        let r = c
            .client
            .get(c.api(&status_url))
            .bearer_auth(&account)
            .send()
            .await?;
        let v: Value = r.json().await?;
        Ok(v["instance"]["status"] == "ready")
    })
    .await?;
    let me: Value = c
        .client
        .get(c.api(&status_url))
        .bearer_auth(&account)
        .send()
        .await?
        .json()
        .await?;
    let gw = me["instance"]["gatewayToken"]
        .as_str()
        .context("gateway token once ready")?
        .to_owned();
    let host = format!("{sub}.clawdeploy.localhost");
    // The status URL shows `ready` once the route is committed; the edge
    // applies it a moment later.
    wait_for(Duration::from_secs(10), "the edge routing it", || async {
        Ok(models_through_edge(&c, &host, &gw).await?.0 == 200)
    })
    .await?;
    let (status, models) = models_through_edge(&c, &host, &gw).await?;
    assert_eq!(status, 200, "{models}");
    assert!(models.contains("anthropic"), "{models}");

    // Converged: Docker runs exactly the containers the database wants, the
    // claimed one once, and the pool is back.
    c.wait_idle(2, false, Duration::from_secs(60)).await?;
    c.wait_docker_matches_db(Duration::from_secs(30)).await?;
    let (container, _) = container_of(&c, &sub).await?;
    let named = Command::new("docker")
        .args([
            "ps",
            "-aq",
            "--filter",
            &format!("label=clawdeploy.container={container}"),
        ])
        .output()?;
    assert_eq!(
        String::from_utf8_lossy(&named.stdout).lines().count(),
        1,
        "the claimed container exists once"
    );
    // Two agent restarts adopted the running containers: none restarted.
    for (id, at) in &running_before {
        if let Ok(now) = started_at(&c, id) {
            assert_eq!(&now, at, "container {id} was restarted");
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_after_desired_state_arrives_converges() -> Result<()> {
    claim_survives_agent_kill_at("desired").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_after_config_write_converges() -> Result<()> {
    claim_survives_agent_kill_at("config").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_before_report_converges() -> Result<()> {
    claim_survives_agent_kill_at("report").await
}

// --------------------------------------------------- scheduler away 30 s ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_keep_serving_for_30s_without_the_scheduler() -> Result<()> {
    let mut c = Cluster::single_node_warm(1).await?;
    let (_, gw) = c
        .sign_up(&email("away"), "away", json!({"openai": "sk-away-1234"}))
        .await?;
    c.wait_idle(1, false, Duration::from_secs(60)).await?;
    let host = "away.clawdeploy.localhost";
    let before = start_times(&c);

    c.kill_scheduler();
    let started = std::time::Instant::now();
    let mut answered = 0;
    while started.elapsed() < Duration::from_secs(30) {
        let (status, body) = models_through_edge(&c, host, &gw).await?;
        assert_eq!(status, 200, "tenant stopped answering: {body}");
        answered += 1;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert!(answered >= 10);

    c.start_scheduler()?;
    c.wait_http_up().await?;
    wait_for(Duration::from_secs(30), "agent reconnected", || async {
        Ok(c.agent_metric(0, "clawdeploy_agent_sessions_opened_total")
            .await?
            >= 2.0)
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // No churn: the same containers, never restarted.
    assert_eq!(before, start_times(&c));
    let (status, _) = models_through_edge(&c, host, &gw).await?;
    assert_eq!(status, 200);
    Ok(())
}

// ------------------------------------------- orphans and crashed tenants ---
