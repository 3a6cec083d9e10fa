//! Model access through the metering proxy, on the real path: the client
//! calls its gateway through the edge, the gateway (the OpenClaw stand-in
//! in its container) calls its provider entry, which is the proxy, and the
//! proxy calls the upstream stand-in with the real key. No provider key is
//! in the container; a stream arrives byte for byte; credits move by
//! exactly the price table's charge; the customer's own key costs nothing;
//! and concurrent streams through two proxies never overdraw a balance.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use clawdeploy_e2e::llm::{LlmStack, BYOK_KEY, PLATFORM_KEY};
use clawdeploy_e2e::{wait_for, workspace_root, Cluster, ClusterOptions, BASE_DOMAIN};
use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

/// The pinned price table, as the test reads it (not the proxy's code).
fn price_of(model: &str) -> Result<(u64, u64, u64)> {
    let text = std::fs::read_to_string(workspace_root().join("llm-proxy/prices.json"))?;
    let v: Value = serde_json::from_str(&text)?;
    let p = &v["models"][model];
    let n = |k: &str| p[k].as_u64().context("price field");
    Ok((
        n("inputPerMillion")?,
        n("cachedInputPerMillion")?,
        n("outputPerMillion")?,
    ))
}

/// The charge for a usage: each part rounded up to a micro-dollar, then
/// 20 % on top, rounded up.
fn charge(model: &str, input: u64, cached: u64, output: u64) -> Result<u64> {
    let (pi, pc, po) = price_of(model)?;
    let part = |tokens: u64, per_million: u64| (tokens * per_million).div_ceil(1_000_000);
    let cost = part(input - cached, pi) + part(cached, pc) + part(output, po);
    Ok((cost * 120).div_ceil(100))
}

async fn scalar(c: &Cluster, sql: &str, id: Uuid) -> Result<i64> {
    Ok(sqlx::query_scalar(sql).bind(id).fetch_one(&c.db).await?)
}

/// Balance plus every lease's unspent part: what the account has.
async fn credits(c: &Cluster, user: Uuid) -> Result<i64> {
    scalar(
        c,
        "SELECT COALESCE((SELECT balance_micros FROM credit_balances WHERE user_id = $1), 0)
              + COALESCE((SELECT sum(amount_micros - spent_micros) FROM credit_leases WHERE user_id = $1), 0)::bigint",
        user,
    )
    .await
}

async fn chat_via_edge(c: &Cluster, sub: &str, gw: &str, body: &Value) -> Result<(u16, String)> {
    let r = c
        .client
        .post(format!("http://{}/v1/chat/completions", c.edge))
        .header("host", format!("{sub}.{BASE_DOMAIN}"))
        .bearer_auth(gw)
        .json(body)
        .send()
        .await?;
    Ok((r.status().as_u16(), r.text().await?))
}

/// The usage chunk of a stream.
fn usage_in(stream: &str) -> Result<(u64, u64)> {
    for line in stream.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if let Ok(v) = serde_json::from_str::<Value>(data) {
            if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                return Ok((
                    u["prompt_tokens"].as_u64().context("prompt_tokens")?,
                    u["completion_tokens"]
                        .as_u64()
                        .context("completion_tokens")?,
                ));
            }
        }
    }
    anyhow::bail!("no usage chunk in {stream}")
}

/// Every file under the container's state directory, and `docker
/// inspect`, as text.
fn container_text(c: &Cluster, docker_id: &str) -> Result<String> {
    let mut all = c.docker_inspect(docker_id)?.to_string();
    let mut dirs = vec![c.state_dir(0)];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            if e.file_type()?.is_dir() {
                dirs.push(e.path());
            } else if let Ok(t) = std::fs::read_to_string(e.path()) {
                all.push_str(&t);
            }
        }
    }
    Ok(all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_through_the_edge_is_passed_through_and_charged_once_and_a_customer_key_costs_nothing(
) -> Result<()> {
    let mut llm = LlmStack::upstreams().await?;
    let c = Cluster::start(llm.cluster_options(ClusterOptions {
        nodes: 1,
        min_idle: 1,
        max_idle: 2,
        ..Default::default()
    }))
    .await?;
    let (_, proxy) = llm.start_proxy(&c, &[]).await?;
    // Every model the proxy offers has a price in the pinned table, and
    // the platform's upstream serves each of them.
    let offered: Value = reqwest::get(format!("http://{proxy}/v1/models"))
        .await?
        .json()
        .await?;
    let upstream: Value = reqwest::Client::new()
        .get(format!("{}/v1/models", llm.credits_upstream))
        .bearer_auth(PLATFORM_KEY)
        .send()
        .await?
        .json()
        .await?;
    let offered: Vec<&str> = offered["data"]
        .as_array()
        .context("data")?
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert!(!offered.is_empty());
    for m in &offered {
        price_of(m).with_context(|| format!("{m} has no price"))?;
        assert!(
            upstream.to_string().contains(&format!("\"{m}\"")),
            "the upstream does not serve {m}"
        );
    }
    let (token, gw) = c.sign_up("chat@example.com", "chat", json!({})).await?;
    let (user, docker_id): (Uuid, String) = sqlx::query_as(
        "SELECT i.user_id, c.docker_id FROM instances i JOIN containers c ON c.id = i.container_id",
    )
    .fetch_one(&c.db)
    .await?;
    sqlx::query("INSERT INTO credit_balances (user_id, balance_micros) VALUES ($1, 5000000)")
        .bind(user)
        .execute(&c.db)
        .await?;

    // A streamed completion with a tool call, credits-paid.
    let model = "openai/gpt-4o-mini";
    let ask = json!({
        "model": model, "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "What is the weather in Paris today?"}],
        "tools": [{"type": "function", "function": {"name": "get_weather",
                   "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
    });
    let (status, got) = chat_via_edge(&c, "chat", &gw, &ask).await?;
    assert_eq!(status, 200, "{got}");
    let sent = llm.credits_streams().await?;
    let sent = sent.last().context("the upstream sent nothing")?["body"]
        .as_str()
        .context("body")?
        .to_owned();
    assert_eq!(got, sent, "the stream arrives byte for byte");
    assert!(got.contains("tool_calls"), "{got}");
    let (input, output) = usage_in(&got)?;
    let want = charge(model, input, 0, output)?;
    assert!(want > 0);

    // Usage lands in batches; the balance moves by exactly the charge.
    wait_for(Duration::from_secs(15), "the usage flushed", || async {
        Ok(scalar(
            &c,
            "SELECT COALESCE(sum(messages), 0)::bigint FROM llm_usage_monthly WHERE user_id = $1",
            user,
        )
        .await?
            == 1)
    })
    .await?;
    let charged = scalar(
        &c,
        "SELECT sum(charged_micros)::bigint FROM llm_usage_events WHERE user_id = $1",
        user,
    )
    .await?;
    assert_eq!(
        charged as u64, want,
        "{input} in, {output} out at the pinned price + 20 %"
    );
    assert_eq!(credits(&c, user).await?, 5_000_000 - want as i64);
    let (_, me) = c.my_instance(Method::GET, &token, None).await?;
    let usage = &me["instance"]["usage"];
    assert_eq!(usage["messagesThisMonth"], 1, "{me}");
    assert_eq!(usage["tokensThisMonth"], input + output, "{me}");
    assert_eq!(usage["costThisMonthMicros"], want, "{me}");
    assert_eq!(usage["messageLimit"], 100, "{me}");
    assert_eq!(usage["creditBalanceMicros"], 5_000_000 - want, "{me}");

    // An upstream failing before its first byte charges nothing.
    llm.credits_fault(json!({"kind": "server_error"})).await?;
    let (status, body) = chat_via_edge(&c, "chat", &gw, &ask).await?;
    assert_eq!(status, 500, "{body}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        credits(&c, user).await?,
        5_000_000 - want as i64,
        "the hold went back"
    );

    // The customer's own key: not charged, still counted.
    let change = json!({"apiKeys": {"openai": BYOK_KEY}});
    let (status, patched) = c.my_instance(Method::PATCH, &token, Some(&change)).await?;
    assert_eq!(status, 200, "{patched}");
    let whole = json!({"model": model, "messages": [{"role": "user", "content": "Hello there"}]});
    let (status, body) = chat_via_edge(&c, "chat", &gw, &whole).await?;
    assert_eq!(status, 200, "{body}");
    let flushed = wait_for(Duration::from_secs(15), "the BYOK usage flushed", || async {
        Ok(scalar(&c, "SELECT COALESCE(sum(messages), 0)::bigint FROM llm_usage_monthly WHERE user_id = $1 AND pay_mode = 'byok'", user).await? == 1)
    })
    .await;
    if flushed.is_err() {
        let rows: Vec<(String, String, i64)> =
            sqlx::query_as("SELECT model, pay_mode, messages FROM llm_usage_monthly")
                .fetch_all(&c.db)
                .await?;
        anyhow::bail!("no BYOK usage; the month has {rows:?}");
    }
    assert_eq!(
        credits(&c, user).await?,
        5_000_000 - want as i64,
        "BYOK costs no credits"
    );

    // No provider key in the container: not in its environment, labels,
    // state volume or config; the config names the proxy and its token.
    let text = container_text(&c, &docker_id)?;
    for key in [BYOK_KEY, PLATFORM_KEY] {
        assert!(!text.contains(key), "{key} found in the tenant container");
    }
    assert!(
        text.contains("cdp_") && text.contains(&llm.proxy.to_string()),
        "the config points at the proxy"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_through_two_proxies_never_overdraw_a_balance() -> Result<()> {
    let mut llm = LlmStack::upstreams().await?;
    let c = Cluster::start(llm.cluster_options(ClusterOptions {
        nodes: 1,
        min_idle: 4,
        max_idle: 4,
        ..Default::default()
    }))
    .await?;
    let open = ["--rate-per-sec", "10000", "--rate-burst", "10000"];
    let (_, a) = llm.start_proxy(&c, &open).await?;
    let (_, b) = llm.start_proxy(&c, &open).await?;
    // Four accounts, each with credits for about five worst cases of
    // gpt-4o (16,384 output tokens at $10 a million, +20 %: ~$0.197).
    const START: i64 = 1_000_000;
    let mut tenants = Vec::new();
    for i in 0..4 {
        let (_, gw) = c
            .sign_up(
                &format!("burst{i}@example.com"),
                &format!("burst{i}"),
                json!({}),
            )
            .await?;
        let (user, instance): (Uuid, Uuid) = sqlx::query_as(
            "SELECT i.user_id, i.id FROM instances i JOIN users u ON u.id = i.user_id WHERE u.email = $1",
        )
        .bind(format!("burst{i}@example.com"))
        .fetch_one(&c.db)
        .await?;
        sqlx::query("INSERT INTO credit_balances (user_id, balance_micros) VALUES ($1, $2)")
            .bind(user)
            .bind(START)
            .execute(&c.db)
            .await?;
        let token = clawdeploy_common::proxy_token::derive(&instance.to_string(), &gw);
        tenants.push((user, token));
    }
    // 200 streams at once, 50 per account, half through each proxy.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    let mut calls = Vec::new();
    for n in 0..200 {
        let (_, token) = &tenants[n % 4];
        let proxy = if n % 2 == 0 { a } else { b };
        let req = client
            .post(format!("http://{proxy}/p/openai/v1/chat/completions"))
            .bearer_auth(token)
            .json(&json!({"model": "gpt-4o", "stream": true,
                          "messages": [{"role": "user", "content": format!("Tell me a story number {n}")}]}));
        calls.push(async move {
            let r = req.send().await?;
            let status = r.status().as_u16();
            let body = r.text().await?;
            anyhow::Ok((status, body))
        });
    }
    let results = futures::future::join_all(calls).await;
    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    for r in &results {
        let (status, body) = r.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
        *by_status.entry(*status).or_default() += 1;
        match status {
            200 => assert!(body.ends_with("data: [DONE]\n\n"), "{body}"),
            402 => assert!(body.contains("insufficient_credits"), "{body}"),
            other => anyhow::bail!("unexpected {other}: {body}"),
        }
    }
    eprintln!("200 streams at once against four balances: {by_status:?}");
    assert!(
        by_status.get(&200).copied().unwrap_or(0) >= 20,
        "{by_status:?}"
    );
    // Both proxies stop cleanly: they flush and return their leases.
    llm.stop_proxy(0, false).await?;
    llm.stop_proxy(1, false).await?;
    for (user, _) in &tenants {
        let balance = scalar(
            &c,
            "SELECT balance_micros FROM credit_balances WHERE user_id = $1",
            *user,
        )
        .await?;
        let leases = scalar(
            &c,
            "SELECT count(*) FROM credit_leases WHERE user_id = $1",
            *user,
        )
        .await?;
        let charged = scalar(&c, "SELECT COALESCE(sum(charged_micros), 0)::bigint FROM llm_usage_events WHERE user_id = $1", *user).await?;
        assert!(balance >= 0);
        assert_eq!(leases, 0, "every lease went back");
        assert_eq!(
            START - balance,
            charged,
            "the balance spent is the sum of the charges ({by_status:?})"
        );
    }
    Ok(())
}

/// One account's signup: its user, instance and proxy token.
async fn tenant(c: &Cluster, sub: &str, balance: i64) -> Result<(Uuid, String)> {
    let email = format!("{sub}@example.com");
    let (_, gw) = c.sign_up(&email, sub, json!({})).await?;
    let (user, instance): (Uuid, Uuid) = sqlx::query_as(
        "SELECT i.user_id, i.id FROM instances i JOIN users u ON u.id = i.user_id WHERE u.email = $1",
    )
    .bind(&email)
    .fetch_one(&c.db)
    .await?;
    sqlx::query("INSERT INTO credit_balances (user_id, balance_micros) VALUES ($1, $2)")
        .bind(user)
        .bind(balance)
        .execute(&c.db)
        .await?;
    Ok((
        user,
        clawdeploy_common::proxy_token::derive(&instance.to_string(), &gw),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_left_stream_a_killed_proxy_and_the_free_tier_are_each_counted_once() -> Result<()> {
    let mut llm = LlmStack::upstreams().await?;
    let c = Cluster::start(llm.cluster_options(ClusterOptions {
        nodes: 1,
        min_idle: 3,
        max_idle: 3,
        ..Default::default()
    }))
    .await?;
    let flags = [
        "--rate-per-sec",
        "10000",
        "--rate-burst",
        "10000",
        "--lease-ttl-secs",
        "2",
    ];
    let (_, proxy) = llm.start_proxy(&c, &flags).await?;
    let client = reqwest::Client::new();
    let chat = |token: &str, body: Value| {
        client
            .post(format!("http://{proxy}/p/openai/v1/chat/completions"))
            .bearer_auth(token)
            .json(&body)
    };
    let long = (0..400)
        .map(|i| format!("w{i}"))
        .collect::<Vec<_>>()
        .join(" ");

    // A client that leaves after the first piece of a long stream is still
    // billed once, for the usage the upstream reported at the end.
    let (left, token) = tenant(&c, "leaver", 50_000_000).await?;
    let mut r = chat(
        &token,
        json!({"model": "gpt-4o-mini", "stream": true,
                                    "messages": [{"role": "user", "content": long}]}),
    )
    .send()
    .await?;
    assert_eq!(r.status(), 200);
    r.chunk().await?.context("a first piece")?;
    drop(r);
    wait_for(
        Duration::from_secs(15),
        "the left stream settled",
        || async {
            Ok(scalar(
                &c,
                "SELECT count(*) FROM llm_usage_events WHERE user_id = $1",
                left,
            )
            .await?
                == 1)
        },
    )
    .await?;
    let (estimated, output): (bool, i64) =
        sqlx::query_as("SELECT estimated, output_tokens FROM llm_usage_events WHERE user_id = $1")
            .bind(left)
            .fetch_one(&c.db)
            .await?;
    assert!(!estimated, "the proxy read on to the usage chunk");
    assert_eq!(output, 401, "the echo of 400 words and its prefix");

    // A proxy killed in the middle of a burst: after it restarts, nothing
    // is counted twice, and its leases come back once they expire.
    const START: i64 = 50_000_000;
    let (burst, token) = tenant(&c, "burster", START).await?;
    let calls: Vec<_> = (0..40)
        .map(|_| {
            chat(
                &token,
                json!({"model": "gpt-4o", "stream": true,
                                "messages": [{"role": "user", "content": long}]}),
            )
            .send()
        })
        .collect();
    let burst_task = tokio::spawn(futures::future::join_all(calls));
    tokio::time::sleep(Duration::from_millis(400)).await;
    llm.stop_proxy(0, true).await?;
    let _ = burst_task.await?;
    llm.restart_proxy(&c, 0, proxy, &flags).await?;
    wait_for(
        Duration::from_secs(20),
        "the dead proxy's leases recovered",
        || async {
            Ok(scalar(
                &c,
                "SELECT count(*) FROM credit_leases WHERE user_id = $1",
                burst,
            )
            .await?
                == 0)
        },
    )
    .await?;
    let balance = scalar(
        &c,
        "SELECT balance_micros FROM credit_balances WHERE user_id = $1",
        burst,
    )
    .await?;
    let charged = scalar(
        &c,
        "SELECT COALESCE(sum(charged_micros), 0)::bigint FROM llm_usage_events WHERE user_id = $1",
        burst,
    )
    .await?;
    let events = scalar(
        &c,
        "SELECT count(*) FROM llm_usage_events WHERE user_id = $1",
        burst,
    )
    .await?;
    let rolled = scalar(
        &c,
        "SELECT COALESCE(sum(messages), 0)::bigint FROM llm_usage_monthly WHERE user_id = $1",
        burst,
    )
    .await?;
    assert_eq!(
        START - balance,
        charged,
        "what was spent is what was charged, once"
    );
    assert_eq!(rolled, events, "the rollup counts each event once");
    assert!(events <= 40);

    // The free tier: the 101st message of the month is refused with the
    // time the count starts again; a new month lets the next one through.
    let (free, token) = tenant(&c, "freebie", 50_000_000).await?;
    let short = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});
    for n in 0..100 {
        let r = chat(&token, short.clone()).send().await?;
        assert_eq!(r.status(), 200, "message {n}: {}", r.text().await?);
    }
    let r = chat(&token, short.clone()).send().await?;
    assert_eq!(r.status(), 429);
    let body: Value = r.json().await?;
    assert_eq!(body["error"]["code"], "message_limit", "{body}");
    assert!(
        body["error"]["resetsAt"]
            .as_str()
            .is_some_and(|t| t.contains("-01T00:00:00")),
        "{body}"
    );
    sqlx::query(
        "UPDATE message_quota SET month = (month - interval '1 month')::date WHERE user_id = $1",
    )
    .bind(free)
    .execute(&c.db)
    .await?;
    let r = chat(&token, short.clone()).send().await?;
    assert_eq!(r.status(), 200, "a new month");

    // The per-instance rate limit: a burst beyond 20 is refused with
    // Retry-After (a proxy with the default 10/s, burst 20).
    let (_, limited) = llm.start_proxy(&c, &[]).await?;
    let calls: Vec<_> = (0..30)
        .map(|_| {
            client
                .post(format!("http://{limited}/p/openai/v1/chat/completions"))
                .bearer_auth(&token)
                .json(&short)
                .send()
        })
        .collect();
    let mut refused = 0;
    for r in futures::future::join_all(calls).await {
        let r = r?;
        if r.status() == 429 {
            assert!(r.headers().contains_key("retry-after"));
            let body: Value = r.json().await?;
            assert_eq!(body["error"]["code"], "rate_limited", "{body}");
            refused += 1;
        }
    }
    assert!(refused >= 5, "{refused} of 30 refused");
    Ok(())
}
