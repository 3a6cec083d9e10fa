//! Scheduler in depth: claims under concurrency, the empty pool, idempotent
//! signups, unconfirmed claims, node loss, draining, pool rolls and two
//! schedulers, each on a real system (PostgreSQL, Docker, mTLS, edge).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clawdeploy_e2e::{wait_for, Cluster, ClusterOptions, ADMIN_TOKEN};
use serde_json::{json, Value};

fn host(sub: &str) -> String {
    format!("{sub}.clawdeploy.localhost")
}

/// GET a customer API path with the account token.
async fn get_json(c: &Cluster, path: &str, token: &str) -> Result<Value> {
    Ok(c.client
        .get(c.api(path))
        .bearer_auth(token)
        .send()
        .await?
        .json()
        .await?)
}

/// Polls the status URL until the instance is ready; returns its view.
async fn wait_ready(c: &Cluster, token: &str, status_url: &str, within: Duration) -> Result<Value> {
    let mut last = Value::Null;
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        last = get_json(c, status_url, token).await?;
        match last["instance"]["status"].as_str() {
            Some("ready") => return Ok(last),
            Some("failed") => anyhow::bail!("instance failed: {last}"),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    anyhow::bail!("instance not ready within {within:?}: {last}")
}

/// The container and node an instance is on now.
async fn placement_of(c: &Cluster, subdomain: &str) -> Result<(String, String)> {
    Ok(sqlx::query_as(
        "SELECT c.id::text, c.node_id FROM instances i JOIN containers c ON c.id = i.container_id
          WHERE i.subdomain = $1",
    )
    .bind(subdomain)
    .fetch_one(&c.db)
    .await?)
}

async fn audit_count(c: &Cluster, action: &str) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE action = $1")
            .bind(action)
            .fetch_one(&c.db)
            .await?,
    )
}

/// `/v1/models` through the edge with the gateway token, retried briefly
/// (a route published on one scheduler reaches an edge on the other in
/// milliseconds, not atomically with the answer).
async fn models_ok(c: &Cluster, sub: &str, gw: &str) -> Result<()> {
    wait_for(
        Duration::from_secs(10),
        "the gateway answers through the edge",
        || async {
            let (status, _) = c.edge_get(&host(sub), "/v1/models", Some(gw)).await?;
            Ok(status == 200)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_signups_get_a_hundred_distinct_containers() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        min_idle: 10,
        max_idle: 20,
        max_containers: 70,
        ..Default::default()
    })
    .await?;
    c.wait_idle(10, false, Duration::from_secs(120)).await?;
    let accounts = c.register_many("crowd", 100).await?;
    let bodies: Vec<Value> = (0..100)
        .map(|i| json!({"subdomain": format!("crowd-{i}"), "apiKeys": {"openai": format!("sk-{i}")}}))
        .collect();
    let answers: Vec<(u16, Value)> = futures::future::join_all(
        accounts
            .iter()
            .zip(&bodies)
            .map(|(t, b)| c.create_instance(t, b)),
    )
    .await
    .into_iter()
    .collect::<Result<_>>()?;
    for (status, body) in &answers {
        assert!(*status == 201 || *status == 202, "{status}: {body}");
    }
    // The pool held 10: the other 90 were created on demand, and every
    // signup still goes live.
    wait_for(
        Duration::from_secs(240),
        "all 100 instances ready",
        || async {
            Ok(
                c.count("SELECT count(*) FROM instances WHERE status = 'ready'")
                    .await?
                    == 100,
            )
        },
    )
    .await?;
    assert_eq!(
        c.count("SELECT count(DISTINCT container_id) FROM instances WHERE status = 'ready'")
            .await?,
        100
    );
    assert_eq!(
        c.count("SELECT count(*) FROM containers WHERE state = 'assigned'")
            .await?,
        100
    );
    assert!(
        c.scheduler_metric(0, "clawdeploy_claim_fallbacks_total")
            .await?
            >= 1.0
    );
    // Each customer reaches their own gateway, and a token works only there.
    let views: Vec<Value> = futures::future::join_all(
        accounts
            .iter()
            .map(|t| get_json(&c, "/api/instances/me", t)),
    )
    .await
    .into_iter()
    .collect::<Result<_>>()?;
    let tokens: HashSet<&str> = views
        .iter()
        .filter_map(|v| v["instance"]["gatewayToken"].as_str())
        .collect();
    assert_eq!(tokens.len(), 100, "gateway tokens are distinct");
    for (i, v) in views.iter().enumerate().step_by(9) {
        let gw = v["instance"]["gatewayToken"].as_str().context("token")?;
        let sub = format!("crowd-{i}");
        let (status, body) = c.edge_get(&host(&sub), "/v1/models", Some(gw)).await?;
        assert_eq!(status, 200, "{sub}: {body}");
        let other = format!("crowd-{}", (i + 1) % 100);
        let (status, _) = c.edge_get(&host(&other), "/v1/models", Some(gw)).await?;
        assert_eq!(status, 401, "{sub}'s token must not open {other}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signups_succeed_with_an_empty_pool() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        min_idle: 0,
        max_idle: 0,
        ..Default::default()
    })
    .await?;
    let accounts = c.register_many("empty", 4).await?;
    // One alone, then three at once.
    let mut answers = vec![
        c.create_instance(
            &accounts[0],
            &json!({"subdomain": "empty-0", "apiKeys": {"openai": "sk-0"}}),
        )
        .await?,
    ];
    let bodies: Vec<Value> = (1..4)
        .map(|i| json!({"subdomain": format!("empty-{i}"), "apiKeys": {"openai": "sk"}}))
        .collect();
    answers.extend(
        futures::future::join_all(
            accounts[1..]
                .iter()
                .zip(&bodies)
                .map(|(t, b)| c.create_instance(t, b)),
        )
        .await
        .into_iter()
        .collect::<Result<Vec<_>>>()?,
    );
    for (i, (status, body)) in answers.iter().enumerate() {
        assert!(*status == 201 || *status == 202, "{status}: {body}");
        let url = body["instance"]["statusUrl"]
            .as_str()
            .context("status URL")?;
        let view = wait_ready(&c, &accounts[i], url, Duration::from_secs(60)).await?;
        let gw = view["instance"]["gatewayToken"].as_str().context("token")?;
        models_ok(&c, &format!("empty-{i}"), gw).await?;
    }
    assert_eq!(
        c.scheduler_metric(0, "clawdeploy_claim_fallbacks_total")
            .await?,
        4.0
    );
    // The pool stayed empty: nothing was warmed for nobody.
    assert_eq!(
        c.count("SELECT count(*) FROM containers WHERE state IN ('idle', 'warming', 'creating')")
            .await?,
        0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_returns_the_first_result() -> Result<()> {
    let c = Cluster::single_node_warm(3).await?;
    let account = c.register("idem@example.com").await?;
    let body = json!({"subdomain": "idem", "apiKeys": {"openai": "sk-idem"}});
    let post = |key: &'static str, body: Value| {
        let c = &c;
        let account = account.clone();
        async move {
            let r = c
                .client
                .post(c.api("/api/instances"))
                .bearer_auth(&account)
                .header("Idempotency-Key", key)
                .json(&body)
                .send()
                .await?;
            let status = r.status().as_u16();
            let replayed = r.headers().get("idempotent-replayed").is_some();
            let location = r
                .headers()
                .get("location")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let v: Value = r.json().await?;
            anyhow::Ok((status, replayed, location, v))
        }
    };
    let (s1, replayed1, loc1, first) = post("signup-1", body.clone()).await?;
    assert_eq!(s1, 201, "{first}");
    assert!(!replayed1);
    assert_eq!(loc1.as_deref(), first["instance"]["statusUrl"].as_str());
    // The same request again, twice at once: the first answer, verbatim.
    let (a, b) = tokio::join!(
        post("signup-1", body.clone()),
        post("signup-1", body.clone())
    );
    for (s, replayed, _, again) in [a?, b?] {
        assert_eq!((s, replayed), (201, true));
        assert_eq!(again, first);
    }
    // The key with another body is refused; the account still has one instance.
    let (s, _, _, err) = post("signup-1", json!({"subdomain": "idem-other"})).await?;
    assert_eq!(s, 422, "{err}");
    assert_eq!(err["error"]["code"], "idempotency_key_reused");
    // A first answer that was an error is replayed too.
    let (s, _, _, err) = post("signup-2", json!({"subdomain": "idem-again"})).await?;
    assert_eq!(
        (s, err["error"]["code"].as_str()),
        (409, Some("instance_exists"))
    );
    let (s, replayed, _, again) = post("signup-2", json!({"subdomain": "idem-again"})).await?;
    assert_eq!((s, replayed), (409, true));
    assert_eq!(again, err);
    assert_eq!(c.count("SELECT count(*) FROM instances").await?, 1);

    // Five concurrent first requests with one key: one signup runs, the
    // others are told it is in progress or get its answer.
    let other = c.register("idem2@example.com").await?;
    let body2 = json!({"subdomain": "idem-two"});
    let answers = futures::future::join_all((0..5).map(|_| {
        c.client
            .post(c.api("/api/instances"))
            .bearer_auth(&other)
            .header("Idempotency-Key", "race")
            .json(&body2)
            .send()
    }))
    .await;
    let mut codes = Vec::new();
    for r in answers {
        let r = r?;
        let status = r.status().as_u16();
        let v: Value = r.json().await?;
        if status == 409 {
            assert_eq!(v["error"]["code"], "idempotency_in_progress", "{v}");
        }
        codes.push(status);
    }
    assert!(codes.contains(&201), "{codes:?}");
    assert!(codes.iter().all(|s| *s == 201 || *s == 409), "{codes:?}");
    assert_eq!(
        c.count("SELECT count(*) FROM instances WHERE subdomain = 'idem-two'")
            .await?,
        1
    );
    // Malformed keys are refused before anything happens.
    let r = c
        .client
        .post(c.api("/api/instances"))
        .bearer_auth(&other)
        .header("Idempotency-Key", "x".repeat(300))
        .json(&body2)
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 422);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unconfirmed_claim_moves_to_a_fresh_container_and_the_first_is_destroyed() -> Result<()>
{
    let c = Cluster::start(ClusterOptions {
        min_idle: 4,
        claim_wait_secs: 1,
        claim_timeout_secs: Some(3),
        ..Default::default()
    })
    .await?;
    let by_node = c.wait_idle(4, true, Duration::from_secs(120)).await?;
    assert!(by_node.len() == 2, "{by_node:?}");
    let hung = c.node_ids[0].clone();
    // The agent hangs: its connection stays open, it answers nothing.
    c.pause_agent(0, true)?;
    let accounts = c.register_many("hung", 6).await?;
    let mut victim = None;
    for (i, account) in accounts.iter().enumerate() {
        let sub = format!("hung-{i}");
        let (status, body) = c
            .create_instance(
                account,
                &json!({"subdomain": sub, "apiKeys": {"openai": "sk"}}),
            )
            .await?;
        let (container, node) = placement_of(&c, &sub).await?;
        if node == hung {
            assert_eq!(status, 202, "{body}");
            assert!(body["instance"]["gatewayToken"].is_null());
            victim = Some((i, sub, container, body));
            break;
        }
        assert_eq!(status, 201, "{body}");
    }
    let (i, sub, first, body) = victim.context("no claim landed on the hung node")?;
    let url = body["instance"]["statusUrl"]
        .as_str()
        .context("status URL")?;
    // After the claim timeout it moves to a fresh container on the other node.
    let view = wait_ready(&c, &accounts[i], url, Duration::from_secs(30)).await?;
    let (second, node) = placement_of(&c, &sub).await?;
    assert_ne!(second, first);
    assert_ne!(node, hung);
    let gw = view["instance"]["gatewayToken"].as_str().context("token")?;
    models_ok(&c, &sub, gw).await?;
    let first_state: String =
        sqlx::query_scalar("SELECT state FROM containers WHERE id::text = $1")
            .bind(&first)
            .fetch_one(&c.db)
            .await?;
    assert_eq!(first_state, "destroying");
    assert_eq!(
        c.count(&format!(
            "SELECT claim_attempts::bigint FROM instances WHERE subdomain = '{sub}'"
        ))
        .await?,
        2
    );
    assert_eq!(audit_count(&c, "instance.claim_retry").await?, 1);
    assert!(
        c.scheduler_metric(0, "clawdeploy_assignments_total{result=\"retried\"}")
            .await?
            >= 1.0
    );
    // The agent wakes up: the abandoned container goes, the tenant stays
    // on its new one.
    c.pause_agent(0, false)?;
    wait_for(
        Duration::from_secs(60),
        "the first container destroyed",
        || async {
            let state: String =
                sqlx::query_scalar("SELECT state FROM containers WHERE id::text = $1")
                    .bind(&first)
                    .fetch_one(&c.db)
                    .await?;
            Ok(state == "destroyed")
        },
    )
    .await?;
    c.wait_docker_matches_db(Duration::from_secs(30)).await?;
    let (now, _) = placement_of(&c, &sub).await?;
    assert_eq!(now, second);
    models_ok(&c, &sub, gw).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_unconfirmed_twice_fails_and_frees_its_subdomain() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        min_idle: 4,
        claim_wait_secs: 1,
        claim_timeout_secs: Some(2),
        ..Default::default()
    })
    .await?;
    c.wait_idle(4, true, Duration::from_secs(120)).await?;
    let account = c.register("twice@example.com").await?;
    // Both agents hang: the claim and its retry both go unanswered.
    c.pause_agent(0, true)?;
    c.pause_agent(1, true)?;
    let (status, body) = c
        .create_instance(
            &account,
            &json!({"subdomain": "twice", "apiKeys": {"openai": "sk"}}),
        )
        .await?;
    assert_eq!(status, 202, "{body}");
    let url = body["instance"]["statusUrl"]
        .as_str()
        .context("status URL")?;
    let mut view = Value::Null;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        view = get_json(&c, url, &account).await?;
        if view["instance"]["status"] == "failed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(view["instance"]["status"], "failed", "{view}");
    assert!(view["instance"]["gatewayToken"].is_null());
    assert_eq!(audit_count(&c, "instance.claim_retry").await?, 1);
    assert_eq!(audit_count(&c, "instance.failed").await?, 1);
    // The containers of the first claim and of the retry, as audited (the
    // pool may retire an idle container of its own meanwhile).
    assert_eq!(
        c.count(
            "SELECT count(*) FROM containers WHERE state = 'destroying' AND id::text IN (
                SELECT detail->>'from' FROM audit_log WHERE action = 'instance.claim_retry'
                UNION SELECT detail->>'container' FROM audit_log WHERE action = 'instance.failed')"
        )
        .await?,
        2,
        "both unconfirmed containers are being destroyed"
    );
    // The agents wake up: both containers go, and the customer can try
    // again with the same subdomain.
    c.pause_agent(0, false)?;
    c.pause_agent(1, false)?;
    c.wait_nodes_connected(Duration::from_secs(30)).await?;
    wait_for(
        Duration::from_secs(60),
        "unconfirmed containers destroyed",
        || async {
            Ok(
                c.count("SELECT count(*) FROM containers WHERE state = 'destroying'")
                    .await?
                    == 0,
            )
        },
    )
    .await?;
    let (status, body) = c
        .create_instance(
            &account,
            &json!({"subdomain": "twice", "apiKeys": {"openai": "sk"}}),
        )
        .await?;
    assert!(status == 201 || status == 202, "{status}: {body}");
    let url = body["instance"]["statusUrl"]
        .as_str()
        .context("status URL")?;
    let view = wait_ready(&c, &account, url, Duration::from_secs(60)).await?;
    let gw = view["instance"]["gatewayToken"].as_str().context("token")?;
    models_ok(&c, "twice", gw).await?;
    c.wait_docker_matches_db(Duration::from_secs(30)).await?;
    Ok(())
}

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
