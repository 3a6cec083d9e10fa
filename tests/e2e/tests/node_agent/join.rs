//! Joining with tokens, certificate rotation under a live session, and
//! the refusals (bad tokens, wrong pins, removed nodes).

use super::*;

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
