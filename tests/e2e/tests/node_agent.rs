//! The node agent in depth, against real Docker, PostgreSQL and mTLS:
//! joining with tokens and rotating certificates under a live session,
//! crash consistency at each step of a claim, life without the scheduler,
//! orphans and crashed tenants, lifecycle operations and tenant isolation.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use clawdeploy_e2e::{wait_for, Cluster, ClusterOptions, ADMIN_TOKEN};
use reqwest::Method;
use serde_json::{json, Value};

fn email(tag: &str) -> String {
    format!("{tag}-{}@example.com", uuid::Uuid::new_v4().simple())
}

/// The container (id, Docker id) behind a subdomain.
async fn container_of(c: &Cluster, subdomain: &str) -> Result<(String, String)> {
    Ok(sqlx::query_as(
        "SELECT c.id::text, c.docker_id FROM instances i JOIN containers c ON c.id = i.container_id
          WHERE i.subdomain = $1",
    )
    .bind(subdomain)
    .fetch_one(&c.db)
    .await?)
}

fn started_at(c: &Cluster, docker_id: &str) -> Result<String> {
    Ok(c.docker_inspect(docker_id)?["State"]["StartedAt"]
        .as_str()
        .unwrap_or_default()
        .to_owned())
}

/// Every running container of the cluster with its start time, sorted: equal
/// before and after means nothing was restarted.
fn start_times(c: &Cluster) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = c
        .docker_running()
        .into_iter()
        .map(|id| {
            let at = started_at(c, &id).unwrap_or_default();
            (id, at)
        })
        .collect();
    v.sort();
    v
}

fn log_of(c: &Cluster, name: &str) -> String {
    std::fs::read_to_string(c.dir.join("logs").join(format!("{name}.log"))).unwrap_or_default()
}

/// Moves a container and its instance to new states (what the tier and
/// suspension APIs will do) and tells the agent.
async fn set_states(
    c: &Cluster,
    node: &str,
    container: &str,
    container_state: &str,
    instance_status: &str,
) -> Result<()> {
    sqlx::query("UPDATE containers SET state = $2 WHERE id = $1::uuid")
        .bind(container)
        .bind(container_state)
        .execute(&c.db)
        .await?;
    sqlx::query("UPDATE instances SET status = $2 WHERE container_id = $1::uuid")
        .bind(container)
        .bind(instance_status)
        .execute(&c.db)
        .await?;
    bump(c, node).await
}

/// Tells the node's agent its desired state changed: the next heartbeat
/// sees the agent behind and the scheduler pushes the new state.
async fn bump(c: &Cluster, node: &str) -> Result<()> {
    sqlx::query("UPDATE nodes SET generation = generation + 1 WHERE id = $1")
        .bind(node)
        .execute(&c.db)
        .await?;
    Ok(())
}

async fn models_through_edge(c: &Cluster, host: &str, gw: &str) -> Result<(u16, String)> {
    c.edge_get(host, "/v1/models", Some(gw)).await
}

// ------------------------------------------------------------------ join ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joined_node_rotates_its_certificate_under_a_live_session() -> Result<()> {
    let mut c = Cluster::start(ClusterOptions {
        nodes: 1,
        min_idle: 1,
        join: true,
        node_cert_ttl_secs: Some(6),
        ..Default::default()
    })
    .await?;
    let cert_file = c.tls_dir().join(format!("{}.crt.pem", c.node_ids[0]));
    let first_cert = std::fs::read_to_string(&cert_file)?;
    c.wait_idle(1, false, Duration::from_secs(60)).await?;

    // Three lifetimes later the agent has renewed several times on the
    // session it opened first: no reconnect.
    tokio::time::sleep(Duration::from_secs(14)).await;
    let renewals = c
        .agent_metric(0, "clawdeploy_agent_cert_renewals_total")
        .await?;
    assert!(
        renewals >= 2.0,
        "expected at least two renewals, saw {renewals}"
    );
    assert_eq!(
        c.agent_metric(0, "clawdeploy_agent_sessions_opened_total")
            .await?,
        1.0,
        "rotation must not drop the session"
    );
    assert_ne!(std::fs::read_to_string(&cert_file)?, first_cert);
    // Heartbeats carry the host's facts to the scheduler.
    let (_, nodes) = c
        .admin(Method::GET, "/admin/nodes", None, Some(ADMIN_TOKEN))
        .await?;
    let node = &nodes["nodes"][0];
    assert_eq!(node["connected"], true, "{nodes}");
    assert!(node["certNotAfter"].is_string(), "{nodes}");
    let usage = &node["usage"];
    assert!(usage["memoryAvailableBytes"].as_i64() > Some(0), "{nodes}");
    assert!(
        usage["diskTotalBytes"].as_i64() >= usage["diskAvailableBytes"].as_i64(),
        "{nodes}"
    );
    assert!(usage["diskAvailableBytes"].as_i64() > Some(0), "{nodes}");
    assert_eq!(usage["containersRunning"], 1, "{nodes}");
    // The first certificate has expired, and the session still carries a
    // claim end to end.
    let (_, gw) = c
        .sign_up(
            &email("rot"),
            "rotated",
            json!({"openai": "sk-rotated-0000"}),
        )
        .await?;
    let (status, _) = models_through_edge(&c, "rotated.clawdeploy.localhost", &gw).await?;
    assert_eq!(status, 200);

    // A new connection presents the renewed certificate: restart the
    // scheduler and the agent is back without a new join.
    c.kill_scheduler();
    c.start_scheduler()?;
    c.wait_http_up().await?;
    wait_for(
        Duration::from_secs(30),
        "reconnected with the renewed certificate",
        || async {
            Ok(c.agent_metric(0, "clawdeploy_agent_sessions_opened_total")
                .await?
                >= 2.0)
        },
    )
    .await?;
    assert!(!log_of(&c, &c.node_ids[0]).contains("certificate expired"));
    let joins: i64 = c
        .count("SELECT count(*) FROM join_tokens WHERE used_at IS NOT NULL")
        .await?;
    assert_eq!(joins, 1, "one token, used once");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_refuses_bad_tokens_and_wrong_pins_and_removed_nodes() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        nodes: 1,
        min_idle: 1,
        ..Default::default()
    })
    .await?;
    // The operator API wants the admin token and valid input.
    let (status, body) = c
        .admin(
            Method::POST,
            "/admin/join-tokens",
            Some(json!({"nodeId": "x"})),
            None,
        )
        .await?;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "unauthenticated");
    let (status, body) = c
        .admin(
            Method::POST,
            "/admin/join-tokens",
            Some(json!({"nodeId": "no spaces/allowed"})),
            Some(ADMIN_TOKEN),
        )
        .await?;
    assert_eq!(status, 422, "{body}");

    let node = format!("{}-j", c.name);
    let tls = c.dir.join("tls-join");
    // Runs a joining agent; returns whether it exited (refused) and its log.
    let attempt = |token: String, pin: String, node: String, dir: std::path::PathBuf| {
        let c = &c;
        async move {
            std::fs::remove_dir_all(&dir).ok();
            let env = [
                ("CLAWDEPLOY_JOIN_TOKEN", token.as_str()),
                ("CLAWDEPLOY_CA_PIN", pin.as_str()),
            ];
            let (mut child, log) = c.spawn_agent_env_with(&node, &dir, &env)?;
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            let exited = loop {
                if let Some(st) = child.try_wait()? {
                    break Some(st);
                }
                if dir.join(format!("{node}.crt.pem")).exists()
                    || std::time::Instant::now() > deadline
                {
                    break None;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            if exited.is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
            anyhow::Ok((exited, std::fs::read_to_string(log).unwrap_or_default()))
        }
    };
    let good = c.join_token(&node, None).await?;
    let (token, pin) = (
        good["token"].as_str().unwrap().to_owned(),
        good["caPin"].as_str().unwrap().to_owned(),
    );
    let (id, _) = token.split_once('.').unwrap();

    // A wrong pin: the agent never trusts the scheduler, never sends the token.
    let wrong_pin = format!("sha256:{}", "0".repeat(64));
    let (exited, log) = attempt(token.clone(), wrong_pin, node.clone(), tls.clone()).await?;
    assert!(exited.is_some_and(|s| !s.success()), "{log}");
    assert!(log.contains("does not match the pin"), "{log}");
    // A forged secret for a real token id.
    let (exited, log) = attempt(
        format!("{id}.{}", "f".repeat(48)),
        pin.clone(),
        node.clone(),
        tls.clone(),
    )
    .await?;
    assert!(exited.is_some_and(|s| !s.success()), "{log}");
    assert!(
        log.contains("Unauthenticated") || log.contains("unauthenticated"),
        "{log}"
    );
    // The token, presented for another node.
    let (exited, log) = attempt(
        token.clone(),
        pin.clone(),
        format!("{}-other", c.name),
        c.dir.join("tls-other"),
    )
    .await?;
    assert!(exited.is_some_and(|s| !s.success()), "{log}");
    // None of that spent the token: it joins now and gets a session.
    let (exited, log) = attempt(token.clone(), pin.clone(), node.clone(), tls.clone()).await?;
    assert!(exited.is_none(), "the real join failed: {log}");
    let cert = std::fs::read_to_string(tls.join(format!("{node}.crt.pem")))?;
    assert!(cert.contains("BEGIN CERTIFICATE"));
    let key_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(tls.join(format!("{node}.key.pem")))?.permissions(),
    );
    assert_eq!(key_mode & 0o077, 0, "the key is private");
    // Reused: refused.
    let (exited, log) = attempt(
        token.clone(),
        pin.clone(),
        node.clone(),
        c.dir.join("tls-reuse"),
    )
    .await?;
    assert!(exited.is_some_and(|s| !s.success()), "{log}");
    // Expired: refused.
    let short = c.join_token(&format!("{}-late", c.name), Some(1)).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (exited, log) = attempt(
        short["token"].as_str().unwrap().to_owned(),
        pin.clone(),
        format!("{}-late", c.name),
        c.dir.join("tls-late"),
    )
    .await?;
    assert!(exited.is_some_and(|s| !s.success()), "{log}");

    // The joined node holds a session with its certificate…
    let (mut joined, log_path) = c.spawn_agent_with(&node, &tls)?;
    wait_for(Duration::from_secs(20), "joined node connected", || async {
        let (_, v) = c
            .admin(Method::GET, "/admin/nodes", None, Some(ADMIN_TOKEN))
            .await?;
        Ok(v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["id"] == node.as_str() && n["connected"] == true))
    })
    .await?;
    // …until the operator removes it: the session ends and every later
    // call with that certificate is refused.
    let (status, body) = c
        .admin(
            Method::DELETE,
            &format!("/admin/nodes/{node}"),
            None,
            Some(ADMIN_TOKEN),
        )
        .await?;
    assert_eq!(status, 200, "{body}");
    wait_for(Duration::from_secs(20), "removed node refused", || async {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        Ok(log.matches("has been removed").count() >= 2)
    })
    .await?;
    let _ = joined.kill();
    let _ = joined.wait();
    let (status, _) = c
        .admin(
            Method::GET,
            "/admin/nodes",
            None,
            Some("not-the-admin-token"),
        )
        .await?;
    assert_eq!(status, 401);
    let (status, body) = c
        .admin(
            Method::POST,
            "/admin/join-tokens",
            Some(json!({"nodeId": node})),
            Some(ADMIN_TOKEN),
        )
        .await?;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "node_removed");
    let (status, _) = c
        .admin(
            Method::DELETE,
            "/admin/nodes/nobody",
            None,
            Some(ADMIN_TOKEN),
        )
        .await?;
    assert_eq!(status, 404);
    Ok(())
}

// ------------------------------------------------------- crash recovery ---

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

/// A `FROM scratch` image holding Debian's static busybox, for probing
/// from inside a tenant's network namespace.
fn probe_image() -> Result<&'static str> {
    const IMAGE: &str = "clawdeploy/probe:dev";
    static BUILT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = std::env::temp_dir().join(format!("cd-probe-{}", std::process::id()));
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            std::fs::copy("/bin/busybox", dir.join("busybox")).map_err(|e| {
                format!("/bin/busybox: {e} (install Debian's busybox-static)")
            })?;
            std::fs::write(
                dir.join("Dockerfile"),
                "FROM scratch\nCOPY busybox /bin/busybox\nUSER 1000\nENTRYPOINT [\"/bin/busybox\"]\n",
            )
            .map_err(|e| e.to_string())?;
            let out = Command::new("docker")
                .args(["build", "-q", "-t", IMAGE])
                .arg(&dir)
                .output()
                .map_err(|e| e.to_string())?;
            std::fs::remove_dir_all(&dir).ok();
            if out.status.success() {
                Ok(())
            } else {
                Err(String::from_utf8_lossy(&out.stderr).into_owned())
            }
        })
        .clone()
        .map_err(|e| anyhow::anyhow!("building the probe image: {e}"))?;
    Ok(IMAGE)
}

/// Fetches `url` from inside `docker_id`'s network namespace; returns
/// success and what busybox wget said.
fn probe_from(docker_id: &str, url: &str) -> Result<(bool, String)> {
    // busybox's own `-T` crashes in a scratch image; the host's `timeout`
    // bounds the probe instead (a refused connection returns at once).
    let out = Command::new("timeout")
        .args(["20", "docker", "run", "--rm", "--network"])
        .arg(format!("container:{docker_id}"))
        .arg(probe_image()?)
        .args(["wget", "-O", "-", url])
        .output()?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_cannot_reach_each_other_the_host_or_the_metadata_service() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        nodes: 2,
        min_idle: 3,
        agent_metrics_ip: std::net::Ipv4Addr::UNSPECIFIED.into(),
        ..Default::default()
    })
    .await?;
    c.wait_idle(3, true, Duration::from_secs(120)).await?;
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT node_id, docker_id, upstream FROM containers WHERE state = 'idle' ORDER BY node_id",
    )
    .fetch_all(&c.db)
    .await?;
    let on = |node: &str| -> Vec<&(String, String, String)> {
        rows.iter().filter(|r| r.0 == node).collect()
    };
    let (a_nodes, b_nodes) = (on(&c.node_ids[0]), on(&c.node_ids[1]));
    let (tenant_a, neighbour) = if a_nodes.len() >= 2 {
        (a_nodes[0], a_nodes[1])
    } else {
        (b_nodes[0], b_nodes[1])
    };
    let other_node = if tenant_a.0 == c.node_ids[0] {
        b_nodes[0]
    } else {
        a_nodes[0]
    };

    // The probe works: the tenant reaches its own gateway.
    let (ok, said) = probe_from(&tenant_a.1, "http://127.0.0.1:18789/healthz")?;
    assert!(ok, "the probe must reach the tenant's own port: {said}");
    // The host reaches every tenant (the edge and the agent need that).
    for t in [neighbour, other_node] {
        let r = c
            .client
            .get(format!("http://{}/healthz", t.2))
            .send()
            .await?;
        assert_eq!(r.status(), 200);
    }
    // A tenant reaches none of: a neighbour on its node, a tenant on another
    // node's network, the metadata service, the agent's port on the host.
    let gateway = c.docker_inspect(&tenant_a.1)?["NetworkSettings"]["Networks"]
        .as_object()
        .and_then(|n| n.values().next().cloned())
        .and_then(|n| n["Gateway"].as_str().map(str::to_owned))
        .context("tenant network gateway")?;
    let agent_port = c
        .agent_metrics
        .iter()
        .find(|_| true)
        .map(|a| a.port())
        .unwrap();
    let host_metrics = c
        .client
        .get(format!("http://127.0.0.1:{agent_port}/metrics"))
        .send()
        .await?;
    assert_eq!(
        host_metrics.status(),
        200,
        "the agent's port is open on the host"
    );
    for url in [
        format!("http://{}/healthz", neighbour.2),
        format!("http://{}/healthz", other_node.2),
        "http://169.254.169.254/hetzner/v1/metadata".to_owned(),
        format!("http://{gateway}:{agent_port}/metrics"),
    ] {
        let (ok, said) = probe_from(&tenant_a.1, &url)?;
        assert!(!ok, "{url} must be unreachable from a tenant: {said}");
        assert!(
            said.contains("refused"),
            "{url}: expected the firewall's reset, got: {said}"
        );
    }
    // No Docker socket inside a tenant.
    let mounts = c.docker_inspect(&tenant_a.1)?["Mounts"].to_string();
    assert!(!mounts.contains("docker.sock"), "{mounts}");

    // The rules are installed once, however many agents ran.
    let rules = Command::new("iptables")
        .args(["-S", "DOCKER-USER"])
        .output()?;
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert_eq!(rules.matches("CLAWDEPLOY-TENANTS").count(), 1, "{rules}");
    Ok(())
}
