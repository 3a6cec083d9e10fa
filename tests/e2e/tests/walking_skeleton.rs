//! The walking skeleton, end to end: real processes, PostgreSQL, Docker,
//! mTLS gRPC and the edge.

use std::time::Duration;

use clawdeploy_e2e::{wait_for, Cluster, ClusterOptions, BASE_DOMAIN};
use serde_json::{json, Value};

fn host(sub: &str) -> String {
    format!("{sub}.{BASE_DOMAIN}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signup_goes_live_through_the_edge_on_a_hardened_container() {
    let c = Cluster::start(ClusterOptions::default()).await.unwrap();
    let idle = c
        .wait_idle(5, true, Duration::from_secs(120))
        .await
        .unwrap();
    assert_eq!(idle.len(), 2, "the pool spreads over both nodes: {idle:?}");

    let token = c.register("alice@example.com").await.unwrap();
    let (status, body) = c
        .create_instance(
            &token,
            &json!({"subdomain": "alice", "apiKeys": {"openai": "sk-alice-test"}}),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    let inst = &body["instance"];
    assert_eq!(inst["subdomain"], "alice");
    assert_eq!(inst["status"], "ready");
    assert_eq!(
        inst["url"],
        format!("http://alice.{BASE_DOMAIN}:{}", c.edge.port())
    );
    assert_eq!(
        inst["gatewayUrl"],
        format!("ws://alice.{BASE_DOMAIN}:{}", c.edge.port())
    );
    let gw = inst["gatewayToken"].as_str().unwrap().to_owned();
    assert_eq!(gw.len(), 64);

    // Through the edge: health, the customer's config live with their token.
    let (s, b) = c.edge_get(&host("alice"), "/healthz", None).await.unwrap();
    assert_eq!((s, b.as_str()), (200, r#"{"ok":true,"status":"live"}"#));
    let (s, b) = c
        .edge_get(&host("alice"), "/v1/models", Some(&gw))
        .await
        .unwrap();
    assert_eq!(s, 200, "{b}");
    let models: Value = serde_json::from_str(&b).unwrap();
    assert_eq!(models["providers"], json!(["openai"]));
    assert!(models["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["owned_by"] == "openai"));
    let (s, _) = c
        .edge_get(&host("alice"), "/v1/models", Some("not-the-token"))
        .await
        .unwrap();
    assert_eq!(s, 401);
    // Host matching is exact after normalisation (case, trailing dot, port).
    let (s, _) = c
        .edge_get(
            &format!("ALICE.{BASE_DOMAIN}.:{}", c.edge.port()),
            "/healthz",
            None,
        )
        .await
        .unwrap();
    assert_eq!(s, 200);

    // WebSocket through the edge: token in the first frame, then echo.
    assert_eq!(
        c.ws_echo(&host("alice"), &gw, "hello claw").await.unwrap(),
        "hello claw"
    );

    // Unknown hosts get the edge's own 404.
    let (s, b) = c.edge_get(&host("nobody"), "/healthz", None).await.unwrap();
    assert_eq!(s, 404);
    assert!(b.contains("unknown_host"), "{b}");
    let (s, _) = c.edge_get("example.org", "/healthz", None).await.unwrap();
    assert_eq!(s, 404);

    // GET /api/instances/me shows the same instance.
    let me: Value = c
        .client
        .get(c.api("/api/instances/me"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["instance"]["id"], inst["id"]);
    assert_eq!(me["instance"]["gatewayToken"], gw.as_str());

    // The pool refills to 5 idle.
    c.wait_idle(5, false, Duration::from_secs(60))
        .await
        .unwrap();

    // The customer's container carries every hardening setting.
    let docker_id: String = sqlx::query_scalar("SELECT c.docker_id FROM containers c JOIN instances i ON i.container_id = c.id WHERE i.subdomain = 'alice'")
        .fetch_one(&c.db)
        .await
        .unwrap();
    let info = c.docker_inspect(&docker_id).unwrap();
    let hc = &info["HostConfig"];
    assert_eq!(hc["CapDrop"], json!(["ALL"]));
    assert!(hc["SecurityOpt"]
        .as_array()
        .unwrap()
        .iter()
        .any(|o| o.as_str().unwrap().starts_with("no-new-privileges")));
    assert_eq!(hc["ReadonlyRootfs"], true);
    assert!(hc["Tmpfs"]["/tmp"].is_string());
    assert_eq!(hc["Memory"], 512 * 1024 * 1024);
    assert_eq!(hc["MemorySwap"], hc["Memory"]);
    assert_eq!(hc["NanoCpus"], 500_000_000);
    assert_eq!(hc["PidsLimit"], 256);
    assert_eq!(hc["Privileged"], false);
    assert_eq!(hc["RestartPolicy"]["Name"], "on-failure");
    assert!(
        hc["PortBindings"].is_null() || hc["PortBindings"].as_object().unwrap().is_empty(),
        "no published ports"
    );
    assert_eq!(info["Config"]["User"], "1000:1000");
    let mounts = info["Mounts"].as_array().unwrap();
    assert_eq!(mounts.len(), 1);
    assert_eq!(mounts[0]["Type"], "volume");
    assert_eq!(mounts[0]["Destination"], "/home/node/.openclaw");
    assert!(!mounts
        .iter()
        .any(|m| m["Source"].as_str().unwrap_or("").contains("docker.sock")));
    assert_eq!(
        info["Config"]["Labels"]["clawdeploy.node"]
            .as_str()
            .map(|n| c.node_ids.iter().any(|id| id == n)),
        Some(true)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_concurrent_claims_for_one_subdomain_one_wins() {
    let c = Cluster::start(ClusterOptions::default()).await.unwrap();
    c.wait_idle(5, false, Duration::from_secs(120))
        .await
        .unwrap();
    let accounts = c.register_many("contender", 10).await.unwrap();
    let body = json!({"subdomain": "contested", "apiKeys": {"anthropic": "sk-ant-test"}});
    let answers: Vec<(u16, serde_json::Value)> =
        futures::future::join_all(accounts.iter().map(|t| c.create_instance(t, &body)))
            .await
            .into_iter()
            .collect::<anyhow::Result<_>>()
            .unwrap();
    let won: Vec<_> = answers.iter().filter(|(s, _)| *s == 201).collect();
    assert_eq!(won.len(), 1, "{answers:?}");
    for (status, loser) in answers.iter().filter(|(s, _)| *s != 201) {
        assert_eq!(*status, 409, "{loser}");
        assert_eq!(loser["error"]["code"], "subdomain_taken");
        assert!(loser["error"]["message"].is_string());
    }
    assert_eq!(
        c.count("SELECT count(*) FROM instances WHERE subdomain = 'contested'")
            .await
            .unwrap(),
        1
    );
    // The losers' claims were rolled back: exactly one container left the pool.
    assert_eq!(
        c.count("SELECT count(*) FROM containers WHERE state IN ('assigning', 'assigned')")
            .await
            .unwrap(),
        1
    );
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_restart_keeps_every_route_and_the_pool() {
    let mut c = Cluster::start(ClusterOptions::default()).await.unwrap();
    c.wait_idle(5, true, Duration::from_secs(120))
        .await
        .unwrap();
    let (token, gw) = c
        .sign_up("erin@example.com", "erin", json!({"openai": "sk-e"}))
        .await
        .unwrap();
    c.wait_idle(5, false, Duration::from_secs(60))
        .await
        .unwrap();

    c.kill_scheduler();
    // With the scheduler gone, the edge keeps serving its table.
    let (s, _) = c
        .edge_get(&host("erin"), "/v1/models", Some(&gw))
        .await
        .unwrap();
    assert_eq!(s, 200);
    tokio::time::sleep(Duration::from_secs(2)).await;

    c.start_scheduler().unwrap();
    c.wait_http_up().await.unwrap();
    // Agents reconnect by themselves (fresh heartbeats after the restart).
    let restarted = std::time::Instant::now();
    c.wait_nodes_connected(Duration::from_secs(30))
        .await
        .unwrap();
    wait_for(
        Duration::from_secs(30),
        "agent sessions re-opened",
        || async {
            let open = c.client.get(c.api("/metrics")).send().await?.text().await?;
            Ok(open
                .lines()
                .any(|l| l.starts_with("clawdeploy_agent_sessions ") && l.ends_with(" 2")))
        },
    )
    .await
    .unwrap();
    eprintln!("agents back after {:?}", restarted.elapsed());

    // The old instance still routes and the old token still authenticates.
    let (s, b) = c
        .edge_get(&host("erin"), "/v1/models", Some(&gw))
        .await
        .unwrap();
    assert_eq!(s, 200, "{b}");
    let me = c
        .client
        .get(c.api("/api/instances/me"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(me.status(), 200);

    // The pool is not duplicated by the restart: once settled, the database
    // holds 5 idle and 1 assigned container, and Docker runs exactly those.
    c.wait_idle(5, false, Duration::from_secs(30))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.wait_idle(5, false, Duration::from_secs(30))
        .await
        .unwrap();
    let live = c.count("SELECT count(*) FROM containers WHERE state NOT IN ('destroyed', 'destroying', 'failed')").await.unwrap();
    assert_eq!(live, 6);
    wait_for(
        Duration::from_secs(30),
        "Docker to run exactly the live containers",
        || async { Ok(c.docker_running().len() as i64 == live) },
    )
    .await
    .unwrap();

    // The edge reconnected too: a new signup routes at once.
    let (_, gw2) = c
        .sign_up("frank@example.com", "frank", json!({"anthropic": "sk-f"}))
        .await
        .unwrap();
    let (s, b) = c
        .edge_get(&host("frank"), "/v1/models", Some(&gw2))
        .await
        .unwrap();
    assert_eq!(s, 200, "{b}");
    assert!(b.contains("anthropic"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduler_knows_callers_by_their_certificate_only() {
    let c = Cluster::single_node_warm(1).await.unwrap();
    let nodes_before = c.count("SELECT count(*) FROM nodes").await.unwrap();

    // 1. A certificate from another CA: the TLS handshake fails.
    let foreign = c.foreign_cert("node", "rogue").unwrap();
    let (mut rogue, rogue_log) = c.spawn_agent_with("rogue", &foreign).unwrap();
    // 2. The edge's (valid) certificate presented by an agent: refused.
    std::fs::create_dir_all(c.dir.join("edge-as-node")).unwrap();
    for f in ["ca.crt.pem", "edge-1.crt.pem", "edge-1.key.pem"] {
        std::fs::copy(c.tls_dir().join(f), c.dir.join("edge-as-node").join(f)).unwrap();
    }
    let (mut posing, posing_log) = c
        .spawn_agent_with("edge-1", &c.dir.join("edge-as-node"))
        .unwrap();
    // 3. A valid node certificate whose agent claims another node id.
    let liar_dir = c.dir.join("liar");
    std::fs::create_dir_all(&liar_dir).unwrap();
    std::fs::copy(c.tls_dir().join("ca.crt.pem"), liar_dir.join("ca.crt.pem")).unwrap();
    std::fs::copy(
        c.tls_dir().join(format!("{}.crt.pem", c.node_ids[0])),
        liar_dir.join("someone-else.crt.pem"),
    )
    .unwrap();
    std::fs::copy(
        c.tls_dir().join(format!("{}.key.pem", c.node_ids[0])),
        liar_dir.join("someone-else.key.pem"),
    )
    .unwrap();
    let (mut liar, liar_log) = c.spawn_agent_with("someone-else", &liar_dir).unwrap();

    let logs = [&rogue_log, &posing_log, &liar_log];
    wait_for(Duration::from_secs(30), "all three refused", || async {
        Ok(logs.iter().all(|l| {
            std::fs::read_to_string(l)
                .unwrap_or_default()
                .contains("scheduler session failed")
        }))
    })
    .await
    .unwrap();
    for child in [&mut rogue, &mut posing, &mut liar] {
        let _ = child.kill();
        let _ = child.wait();
    }
    let posing_text = std::fs::read_to_string(&posing_log).unwrap();
    assert!(
        posing_text.contains("only node certificates"),
        "{posing_text}"
    );
    let liar_text = std::fs::read_to_string(&liar_log).unwrap();
    assert!(
        liar_text.contains("the certificate is for node"),
        "{liar_text}"
    );

    // No node was registered for any of them, and none got work.
    assert_eq!(
        c.count("SELECT count(*) FROM nodes").await.unwrap(),
        nodes_before
    );
    assert_eq!(
        c.count("SELECT count(*) FROM nodes WHERE id IN ('rogue', 'edge-1', 'someone-else')")
            .await
            .unwrap(),
        0
    );
    for id in ["rogue", "edge-1", "someone-else"] {
        clawdeploy_e2e::docker_cleanup_node(id);
    }

    // The real node's session survived the impostors: it still takes claims.
    let (_, gw) = c
        .sign_up("gina@example.com", "gina", json!({"openai": "sk-g"}))
        .await
        .unwrap();
    let (s, b) = c
        .edge_get(&host("gina"), "/v1/models", Some(&gw))
        .await
        .unwrap();
    assert_eq!(s, 200, "{b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_behind_the_agents_ledger_catches_up() {
    let c = Cluster::single_node_warm(2).await.unwrap();
    // The agent applies generation 1000 (a heartbeat reporting less gets a push).
    sqlx::query("UPDATE nodes SET generation = 1000")
        .execute(&c.db)
        .await
        .unwrap();
    let metrics = format!("http://{}/metrics", c.agent_metrics[0]);
    wait_for(
        Duration::from_secs(30),
        "the agent at generation 1000",
        || async {
            let text = c.client.get(&metrics).send().await?.text().await?;
            Ok(text
                .lines()
                .any(|l| l == "clawdeploy_agent_desired_generation 1000"))
        },
    )
    .await
    .unwrap();
    // As after restoring a backup: the database is far behind the ledger, so
    // ordinary bumps alone would never catch up and every push is refused.
    sqlx::query("UPDATE nodes SET generation = 1")
        .execute(&c.db)
        .await
        .unwrap();
    let (_, gw) = c
        .sign_up("hana@example.com", "hana", json!({"openai": "sk-h"}))
        .await
        .unwrap();
    let (s, b) = c
        .edge_get(&host("hana"), "/v1/models", Some(&gw))
        .await
        .unwrap();
    assert_eq!(s, 200, "{b}");
    assert!(c.count("SELECT max(generation) FROM nodes").await.unwrap() > 1000);
}
