//! The fleet under change: a lost node, a pool roll to a new image, and
//! the pool leader killed with a second scheduler standing by.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_node_is_marked_unreachable_and_the_pool_refills_elsewhere() -> Result<()> {
    let mut c = Cluster::start(ClusterOptions {
        min_idle: 4,
        ..Default::default()
    })
    .await?;
    c.wait_idle(4, true, Duration::from_secs(120)).await?;
    let (account, gw) = c
        .sign_up("tenant@example.com", "survivor", json!({"openai": "sk"}))
        .await?;
    let _ = account;
    let (container, lost) = placement_of(&c, "survivor").await?;
    let lost_i = c.node_ids.iter().position(|n| *n == lost).context("node")?;
    let other = c.node_ids[1 - lost_i].clone();

    let killed = Instant::now();
    c.kill_agent(lost_i);
    wait_for(Duration::from_secs(20), "node unreachable", || async {
        let state: String = sqlx::query_scalar("SELECT state FROM nodes WHERE id = $1")
            .bind(&lost)
            .fetch_one(&c.db)
            .await?;
        Ok(state == "unreachable")
    })
    .await?;
    let took = killed.elapsed();
    // TTL 10 s after the last heartbeat (at most 2 s before the kill), seen
    // by the once-a-second pool pass.
    assert!(
        took <= Duration::from_secs(12),
        "unreachable after {took:?}"
    );
    eprintln!("node marked unreachable {took:?} after its agent was killed");
    // Its idle containers stop counting: the other node refills the pool.
    wait_for(
        Duration::from_secs(30),
        "pool refilled on the other node",
        || async { Ok(c.idle_by_node().await?.get(&other).copied().unwrap_or(0) >= 4) },
    )
    .await?;
    // A silent node is not a dead one: its tenant keeps its container and
    // still answers through the edge.
    let state: String = sqlx::query_scalar("SELECT state FROM containers WHERE id::text = $1")
        .bind(&container)
        .fetch_one(&c.db)
        .await?;
    assert_eq!(state, "assigned");
    models_ok(&c, "survivor", &gw).await?;
    assert_eq!(audit_count(&c, "node.unreachable").await?, 1);
    let (_, nodes) = c
        .admin(
            reqwest::Method::GET,
            "/admin/nodes",
            None,
            Some(ADMIN_TOKEN),
        )
        .await?;
    let listed = nodes["nodes"]
        .as_array()
        .context("nodes")?
        .iter()
        .find(|n| n["id"] == lost.as_str())
        .context("lost node listed")?;
    assert_eq!(listed["state"], "unreachable", "{listed}");
    assert_eq!(listed["heartbeatFresh"], false, "{listed}");
    assert!(listed["assigned"].as_i64() >= Some(1), "{listed}");
    assert_eq!(
        c.scheduler_metric(0, "clawdeploy_nodes{state=\"unreachable\"}")
            .await?,
        1.0
    );
    // New signups go to the live node only.
    let (_, gw2) = c
        .sign_up(
            "meanwhile@example.com",
            "meanwhile",
            json!({"openai": "sk"}),
        )
        .await?;
    assert_eq!(placement_of(&c, "meanwhile").await?.1, other);
    models_ok(&c, "meanwhile", &gw2).await?;

    // It comes back and reconciles: active again, Docker matches the database.
    c.start_agent(lost_i)?;
    c.wait_nodes_connected(Duration::from_secs(30)).await?;
    c.wait_docker_matches_db(Duration::from_secs(60)).await?;
    models_ok(&c, "survivor", &gw).await?;

    // Draining the other node: no new containers there, the pool moves.
    let (status, body) = c
        .admin(
            reqwest::Method::POST,
            &format!("/admin/nodes/{other}/drain"),
            None,
            Some(ADMIN_TOKEN),
        )
        .await?;
    assert_eq!(status, 200, "{body}");
    let on_other = format!("SELECT count(*) FROM containers WHERE node_id = '{other}'");
    let before_drain = c.count(&on_other).await?;
    wait_for(
        Duration::from_secs(60),
        "pool refilled on the returned node",
        || async { Ok(c.idle_by_node().await?.get(&lost).copied().unwrap_or(0) >= 4) },
    )
    .await?;
    let (_, gw3) = c
        .sign_up(
            "drained@example.com",
            "after-drain",
            json!({"openai": "sk"}),
        )
        .await?;
    assert_eq!(placement_of(&c, "after-drain").await?.1, lost);
    models_ok(&c, "after-drain", &gw3).await?;
    assert_eq!(
        c.count(&on_other).await?,
        before_drain,
        "nothing new on a draining node"
    );
    let (status, body) = c
        .admin(
            reqwest::Method::POST,
            "/admin/nodes/no-such-node/drain",
            None,
            Some(ADMIN_TOKEN),
        )
        .await?;
    assert_eq!(status, 404, "{body}");
    let (status, body) = c
        .admin(
            reqwest::Method::POST,
            &format!("/admin/nodes/{other}/activate"),
            None,
            Some(ADMIN_TOKEN),
        )
        .await?;
    assert_eq!((status, body["state"].as_str()), (200, Some("active")));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_rolls_to_a_new_image_without_failing_signups() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        min_idle: 4,
        max_idle: 8,
        ..Default::default()
    })
    .await?;
    c.wait_idle(4, false, Duration::from_secs(120)).await?;
    // The "new release": the same stand-in under another tag.
    let image = format!("clawdeploy/openclaw-standin:{}", c.name);
    let st = std::process::Command::new("docker")
        .args(["tag", "clawdeploy/openclaw-standin:dev", &image])
        .status()?;
    anyhow::ensure!(st.success(), "docker tag failed");
    let untag = scopeguard(&image);

    let put = |body: Value| {
        c.admin(
            reqwest::Method::PUT,
            "/admin/pool",
            Some(body),
            Some(ADMIN_TOKEN),
        )
    };
    for bad in [
        json!({"generation": 0}),
        json!({"minIdle": 9}),
        json!({"image": ""}),
    ] {
        let (status, body) = put(bad.clone()).await?;
        assert_eq!(status, 422, "{bad}: {body}");
    }
    let (status, _) = put(json!({"replicas": 3})).await?;
    assert_eq!(status, 400);
    let (status, _) = c
        .admin(
            reqwest::Method::PUT,
            "/admin/pool",
            Some(json!({"generation": 2})),
            None,
        )
        .await?;
    assert_eq!(status, 401);

    let (status, body) = put(json!({"image": image})).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["settings"]["generation"], 2);
    // Signups keep coming while the pool rolls; every one succeeds.
    let accounts = c.register_many("roll", 8).await?;
    for (i, account) in accounts.iter().enumerate() {
        let (status, body) = c
            .create_instance(
                account,
                &json!({"subdomain": format!("roll-{i}"), "apiKeys": {"openai": "sk"}}),
            )
            .await?;
        assert_eq!(status, 201, "signup {i} during the roll: {body}");
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    wait_for(Duration::from_secs(90), "the pool rolled", || async {
        let stale = c
            .count("SELECT count(*) FROM containers WHERE state IN ('creating', 'warming', 'idle') AND pool_generation <> 2")
            .await?;
        let fresh = c
            .count("SELECT count(*) FROM containers WHERE state = 'idle' AND pool_generation = 2")
            .await?;
        Ok(stale == 0 && fresh >= 4)
    })
    .await?;
    // Fresh containers run the new image.
    let docker_id: String = sqlx::query_scalar(
        "SELECT docker_id FROM containers WHERE state = 'idle' AND pool_generation = 2 LIMIT 1",
    )
    .fetch_one(&c.db)
    .await?;
    let inspect = c.docker_inspect(&docker_id)?;
    assert_eq!(inspect["Config"]["Image"], image.as_str());
    assert!(audit_count(&c, "pool.settings").await? >= 1);
    let (status, pool) = c
        .admin(reqwest::Method::GET, "/admin/pool", None, Some(ADMIN_TOKEN))
        .await?;
    assert_eq!(status, 200);
    assert_eq!(pool["settings"]["image"], image.as_str());
    c.wait_docker_matches_db(Duration::from_secs(30)).await?;
    drop(untag);
    Ok(())
}

/// Removes a test image tag when dropped.
fn scopeguard(tag: &str) -> impl Drop + '_ {
    struct Untag<'a>(&'a str);
    impl Drop for Untag<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("docker")
                .args(["rmi", "--no-prune", self.0])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
    Untag(tag)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_pool_leader_hands_over_and_signups_keep_working() -> Result<()> {
    let mut c = Cluster::start(ClusterOptions {
        schedulers: 2,
        min_idle: 4,
        ..Default::default()
    })
    .await?;
    c.wait_idle(4, false, Duration::from_secs(120)).await?;
    assert_eq!(
        c.scheduler_metric(0, "clawdeploy_pool_manager_leader")
            .await?,
        1.0
    );
    assert_eq!(
        c.scheduler_metric(1, "clawdeploy_pool_manager_leader")
            .await?,
        0.0
    );
    // Both serve the API: a signup on the second goes live although the
    // agents and the edge talk to the first.
    c.http = c.https[1];
    let (_, gw) = c
        .sign_up("before@example.com", "before", json!({"openai": "sk"}))
        .await?;
    models_ok(&c, "before", &gw).await?;

    let killed = Instant::now();
    c.kill_scheduler_n(0);
    wait_for(
        Duration::from_secs(15),
        "the second scheduler leads",
        || async {
            Ok(c.scheduler_metric(1, "clawdeploy_pool_manager_leader")
                .await?
                == 1.0)
        },
    )
    .await?;
    let took = killed.elapsed();
    eprintln!("pool manager handed over {took:?} after the leader was killed");
    // Agents and the edge fail over to the second address.
    c.wait_nodes_connected(Duration::from_secs(30)).await?;
    let accounts = c.register_many("after", 5).await?;
    for (i, account) in accounts.iter().enumerate() {
        let sub = format!("after-{i}");
        let (status, body) = c
            .create_instance(
                account,
                &json!({"subdomain": sub, "apiKeys": {"openai": "sk"}}),
            )
            .await?;
        assert_eq!(status, 201, "{body}");
        let gw = body["instance"]["gatewayToken"].as_str().context("token")?;
        models_ok(&c, &sub, gw).await?;
    }
    // The new leader refills what the signups took.
    c.wait_idle_at_least(4, Duration::from_secs(60)).await?;
    models_ok(&c, "before", &gw).await?;
    // The old leader comes back as a follower.
    c.start_scheduler_n(0)?;
    c.wait_http_up_on(c.https[0]).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        c.scheduler_metric(0, "clawdeploy_pool_manager_leader")
            .await?,
        0.0
    );
    assert_eq!(
        c.scheduler_metric(1, "clawdeploy_pool_manager_leader")
            .await?,
        1.0
    );
    Ok(())
}
