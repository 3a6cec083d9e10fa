//! Orphans and crashed tenants, and resize, suspend, resume and destroy
//! through the desired state.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_are_removed_and_stopped_tenants_restarted() -> Result<()> {
    let c = Cluster::single_node_warm(1).await?;
    let (_, gw) = c
        .sign_up(
            &email("orphan"),
            "crashy",
            json!({"openai": "sk-crashy-99"}),
        )
        .await?;
    let (_, docker_id) = container_of(&c, "crashy").await?;
    let first_start = started_at(&c, &docker_id)?;
    // The agent repairs on its own: the scheduler is gone for all of this.
    let mut c = c;
    c.kill_scheduler();

    // The tenant's container stops behind the agent's back: it comes back.
    let st = Command::new("docker")
        .args(["stop", "-t", "1", &docker_id])
        .output()?;
    assert!(st.status.success());
    wait_for(Duration::from_secs(30), "tenant restarted", || async {
        let s = c.docker_inspect(&docker_id)?;
        Ok(s["State"]["Running"] == true
            && s["State"]["StartedAt"].as_str() != Some(first_start.as_str()))
    })
    .await?;
    wait_for(
        Duration::from_secs(20),
        "tenant answering again",
        || async {
            Ok(models_through_edge(&c, "crashy.clawdeploy.localhost", &gw)
                .await?
                .0
                == 200)
        },
    )
    .await?;

    // A container with our labels that nobody wants is removed.
    let orphan = uuid::Uuid::new_v4().to_string();
    let out = Command::new("docker")
        .args(["run", "-d", "--network", "none"])
        .args(["--label", &format!("clawdeploy.node={}", c.node_ids[0])])
        .args(["--label", &format!("clawdeploy.container={orphan}")])
        .args(["--name", &format!("clawdeploy-{orphan}")])
        .args(["-e", "OPENCLAW_GATEWAY_TOKEN=orphan"])
        .arg("clawdeploy/openclaw-standin:dev")
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(Duration::from_secs(30), "orphan removed", || async {
        let o = Command::new("docker")
            .args([
                "ps",
                "-aq",
                "--filter",
                &format!("name=clawdeploy-{orphan}"),
            ])
            .output()?;
        Ok(o.stdout.is_empty())
    })
    .await?;
    // The tenant was not touched by the orphan sweep.
    assert_eq!(c.docker_inspect(&docker_id)?["State"]["Running"], true);
    let metrics = c
        .client
        .get(format!("http://{}/metrics", c.agent_metrics[0]))
        .send()
        .await?
        .text()
        .await?;
    assert!(
        metrics.contains("clawdeploy_agent_reconcile_errors_total{step=\"health\"}"),
        "the failed health probes are counted: {metrics}"
    );
    Ok(())
}

// ----------------------------------------------------- lifecycle (tiers) ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resize_suspend_resume_and_destroy_through_desired_state() -> Result<()> {
    let c = Cluster::single_node_warm(1).await?;
    let node = c.node_ids[0].clone();
    let (_, gw) = c
        .sign_up(&email("life"), "life", json!({"openai": "sk-life-0001"}))
        .await?;
    let host = "life.clawdeploy.localhost";
    let (container, docker_id) = container_of(&c, "life").await?;
    let start = started_at(&c, &docker_id)?;

    // A tier change: new limits in place, same process.
    sqlx::query("UPDATE containers SET memory_bytes = 805306368, cpu_millis = 1500, pids = 512 WHERE id = $1::uuid")
        .bind(&container)
        .execute(&c.db)
        .await?;
    bump(&c, &node).await?;
    wait_for(Duration::from_secs(20), "container resized", || async {
        let hc = &c.docker_inspect(&docker_id)?["HostConfig"];
        Ok(hc["Memory"] == 805306368i64
            && hc["NanoCpus"] == 1_500_000_000i64
            && hc["PidsLimit"] == 512)
    })
    .await?;
    let hc = c.docker_inspect(&docker_id)?["HostConfig"].clone();
    assert_eq!(hc["MemorySwap"], 805306368i64, "memory = swap after resize");
    assert_eq!(
        started_at(&c, &docker_id)?,
        start,
        "resize must not restart"
    );
    assert_eq!(models_through_edge(&c, host, &gw).await?.0, 200);

    // Suspend: stopped, volume kept.
    set_states(&c, &node, &container, "suspended", "suspended").await?;
    wait_for(Duration::from_secs(30), "container stopped", || async {
        Ok(c.docker_inspect(&docker_id)?["State"]["Running"] == false)
    })
    .await?;
    let volume = c
        .dir
        .join(&node)
        .join("volumes")
        .join(&container)
        .join("openclaw.json");
    assert!(volume.exists(), "suspension keeps the state volume");
    // It stays stopped: the agent does not "repair" a suspended tenant.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(c.docker_inspect(&docker_id)?["State"]["Running"], false);

    // Resume: the same container starts with its state and keys.
    set_states(&c, &node, &container, "assigned", "ready").await?;
    wait_for(Duration::from_secs(30), "resumed and answering", || async {
        let (status, body) = models_through_edge(&c, host, &gw).await?;
        Ok(status == 200 && body.contains("openai"))
    })
    .await?;
    assert_eq!(c.docker_inspect(&docker_id)?["Id"], docker_id.as_str());

    // Destroy: container and volume gone, and the database learns it.
    sqlx::query("UPDATE containers SET state = 'destroying' WHERE id = $1::uuid")
        .bind(&container)
        .execute(&c.db)
        .await?;
    sqlx::query(
        "UPDATE instances SET status = 'deleted', container_id = NULL WHERE subdomain = 'life'",
    )
    .execute(&c.db)
    .await?;
    bump(&c, &node).await?;
    wait_for(Duration::from_secs(30), "container destroyed", || async {
        let state: String = sqlx::query_scalar("SELECT state FROM containers WHERE id = $1::uuid")
            .bind(&container)
            .fetch_one(&c.db)
            .await?;
        Ok(state == "destroyed" && c.docker_inspect(&docker_id).is_err())
    })
    .await?;
    assert!(!volume.exists(), "the volume goes with the container");
    let vols = Command::new("docker")
        .args([
            "volume",
            "ls",
            "-q",
            "--filter",
            &format!("name=clawdeploy-{container}"),
        ])
        .output()?;
    assert!(vols.stdout.is_empty());
    Ok(())
}

// ------------------------------------------------------------- isolation ---
