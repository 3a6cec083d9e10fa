//! Signups at once, with an empty pool, and with an `Idempotency-Key`.

use super::*;

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
