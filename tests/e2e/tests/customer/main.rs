//! The customer's path on the real system: accounts (no enumeration, login
//! limits, logout), provider keys sealed, masked and never logged, live key
//! changes through `PATCH`, releases destroyed after their grace period,
//! the per-address limit on registrations, and the mail a customer gets
//! (`mail.rs`).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clawdeploy_e2e::{wait_for, Cluster, ClusterOptions, BASE_DOMAIN};
use reqwest::Method;
use serde_json::{json, Value};

mod mail;

const PASSWORD: &str = "correct-horse-battery";

fn host(sub: &str) -> String {
    format!("{sub}.{BASE_DOMAIN}")
}

async fn login(c: &Cluster, email: &str, password: &str) -> Result<(u16, Value, Duration)> {
    let started = Instant::now();
    let r = c
        .client
        .post(c.api("/api/auth/login"))
        .json(&json!({"email": email, "password": password}))
        .send()
        .await?;
    let took = started.elapsed();
    let status = r.status().as_u16();
    let retry_after = r.headers().get("retry-after").cloned();
    let mut body: Value = r.json().await?;
    if let Some(v) = retry_after {
        body["retryAfter"] = v.to_str()?.into();
    }
    Ok((status, body, took))
}

/// The fastest of several timings: the cost itself, without what other
/// work on a shared machine added to some of them.
fn fastest(v: Vec<Duration>) -> Duration {
    v.into_iter().min().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_do_not_enumerate_accounts_are_limited_and_tokens_revoke() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        nodes: 1,
        min_idle: 0,
        max_idle: 0,
        ..Default::default()
    })
    .await?;
    let token = c.register("Alice@Example.com").await?;
    // The email was normalised: the lower-case form logs in.
    assert_eq!(login(&c, "alice@example.com", PASSWORD).await?.0, 200);

    // A wrong password and an unknown email: same status, same body, and
    // about the same time (both verify an argon2id hash).
    let (mut wrong_t, mut unknown_t) = (Vec::new(), Vec::new());
    for _ in 0..7 {
        let (s1, b1, t1) = login(&c, "alice@example.com", "not-the-password").await?;
        let (s2, b2, t2) = login(&c, "nobody@example.com", "not-the-password").await?;
        assert_eq!((s1, s2), (401, 401));
        assert_eq!(b1, b2, "the answers must not tell the cases apart");
        wrong_t.push(t1);
        unknown_t.push(t2);
    }
    let (w, u) = (fastest(wrong_t), fastest(unknown_t));
    assert!(
        u * 2 > w && w * 2 > u,
        "wrong password took {w:?}, unknown email {u:?}"
    );

    // 100 failed logins in the hour for one account; the 101st attempt is
    // refused even with the right password, for known and unknown emails.
    let more = futures::future::join_all(
        (0..93).map(|_| login(&c, "alice@example.com", "still-not-the-password")),
    )
    .await;
    for r in more {
        assert_eq!(r?.0, 401);
    }
    let (status, body, _) = login(&c, "alice@example.com", PASSWORD).await?;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "too_many_attempts");
    assert_eq!(body["retryAfter"], "3600");
    let others = futures::future::join_all(
        (0..93).map(|_| login(&c, "nobody@example.com", "still-not-the-password")),
    )
    .await;
    for r in others {
        assert_eq!(r?.0, 401);
    }
    assert_eq!(login(&c, "nobody@example.com", PASSWORD).await?.0, 429);
    // Another account is not affected.
    c.register("bob@example.com").await?;
    assert_eq!(login(&c, "bob@example.com", PASSWORD).await?.0, 200);

    // Logout revokes the token it is called with, and only that one.
    let me = |t: String| {
        let c = &c;
        async move {
            Ok::<_, anyhow::Error>(
                c.client
                    .get(c.api("/api/instances/me"))
                    .bearer_auth(t)
                    .send()
                    .await?
                    .status()
                    .as_u16(),
            )
        }
    };
    let bob = c.register("carol@example.com").await?;
    assert_eq!(
        me(bob.clone()).await?,
        404,
        "no instance yet, but authenticated"
    );
    let r = c
        .client
        .post(c.api("/api/auth/logout"))
        .bearer_auth(&bob)
        .send()
        .await?;
    assert_eq!(r.status(), 204);
    assert_eq!(me(bob).await?, 401);
    assert_eq!(me(token).await?, 404, "alice's first token still works");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_enveloped_masked_unlogged_rotated_and_patched_live() -> Result<()> {
    let c = Cluster::single_node_warm(2).await?;
    let openai = "sk-test-OPENAI-7f3a9c1e2d4b";
    let anthropic = "sk-ant-test-ANTHROPIC-5e8d2c";
    let (token, gw) = c
        .sign_up("alice@example.com", "alice", json!({"openai": openai}))
        .await?;
    let alice = host("alice");
    let docker_id: String = sqlx::query_scalar(
        "SELECT c.docker_id FROM instances i JOIN containers c ON c.id = i.container_id",
    )
    .fetch_one(&c.db)
    .await?;
    let started_at = c.docker_inspect(&docker_id)?["State"]["StartedAt"].clone();

    // Masked in the API.
    let (_, me) = c.my_instance(Method::GET, &token, None).await?;
    assert_eq!(
        me["instance"]["apiKeys"],
        json!({"openai": "sk-…2d4b"}),
        "{me}"
    );

    // A live change: Anthropic in, OpenAI out, answered once it is live.
    let change = json!({"apiKeys": {"anthropic": anthropic, "openai": null}});
    let (status, patched) = c.my_instance(Method::PATCH, &token, Some(&change)).await?;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["instance"]["configApplied"], true, "{patched}");
    assert_eq!(
        patched["instance"]["apiKeys"],
        json!({"anthropic": "sk-…8d2c"})
    );
    let (status, models) = c.edge_get(&alice, "/v1/models", Some(&gw)).await?;
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&models)?;
    assert_eq!(models["providers"], json!(["anthropic"]), "{models}");
    assert_eq!(
        c.docker_inspect(&docker_id)?["State"]["StartedAt"],
        started_at,
        "the container was not restarted"
    );
    // Bad changes are refused and change nothing.
    for (body, code) in [
        (json!({"apiKeys": {"nosuch": "k"}}), 422),
        (json!({}), 400),
        (json!({"apiKeys": {"openai": ""}}), 422),
        (json!({"color": "red"}), 400),
    ] {
        let (status, err) = c.my_instance(Method::PATCH, &token, Some(&body)).await?;
        assert_eq!(status, code, "{body}");
        assert!(err["error"]["code"].is_string(), "{err}");
    }
    let (_, models) = c.edge_get(&alice, "/v1/models", Some(&gw)).await?;
    assert!(models.contains("anthropic"), "{models}");

    // At rest: no key in plain text anywhere in the database.
    for key in [openai, anthropic] {
        let hits: i64 = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM secrets WHERE position(convert_to($1, 'UTF8') in ciphertext) > 0)
                  + (SELECT count(*) FROM audit_log WHERE detail::text LIKE '%' || $1 || '%')
                  + (SELECT count(*) FROM idempotency_keys
                      WHERE position(convert_to($1, 'UTF8') in coalesce(response_enc, ''::bytea)) > 0)",
        )
        .bind(key)
        .fetch_one(&c.db)
        .await?;
        assert_eq!(hits, 0, "{key} found at rest");
    }
    // The keys sit in an envelope: a data key per instance, wrapped by the
    // KEK. Rotating the KEK re-wraps it without touching the keys' ciphertext.
    let (kek_before, sealed_before): (String, Vec<u8>) = sqlx::query_as(
        "SELECT k.kek_id, s.ciphertext FROM tenant_keys k JOIN secrets s USING (instance_id)",
    )
    .fetch_one(&c.db)
    .await?;
    let mut c = c;
    c.kill_scheduler();
    let out = std::process::Command::new(clawdeploy_e2e::bin_dir().join("clawdeploy-scheduler"))
        .args(["keys", "rotate", "--database-url", &c.db_url, "--data-dir"])
        .arg(c.dir.join("scheduler"))
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("1 data keys re-wrapped"), "{said}");
    let (kek_after, sealed_after): (String, Vec<u8>) = sqlx::query_as(
        "SELECT k.kek_id, s.ciphertext FROM tenant_keys k JOIN secrets s USING (instance_id)",
    )
    .fetch_one(&c.db)
    .await?;
    assert_ne!(kek_before, kek_after);
    assert_eq!(
        sealed_before, sealed_after,
        "provider keys were not re-encrypted"
    );
    c.start_scheduler()?;
    c.wait_http_up().await?;
    c.wait_nodes_connected(Duration::from_secs(30)).await?;
    let (_, me) = c.my_instance(Method::GET, &token, None).await?;
    assert_eq!(
        me["instance"]["apiKeys"],
        json!({"anthropic": "sk-…8d2c"}),
        "{me}"
    );
    assert_eq!(
        me["instance"]["gatewayToken"],
        gw.as_str(),
        "gateway token re-sealed"
    );
    let back = json!({"apiKeys": {"openai": openai}});
    let (status, _) = c.my_instance(Method::PATCH, &token, Some(&back)).await?;
    assert_eq!(status, 200, "the new KEK serves changes");
    let (_, models) = c.edge_get(&alice, "/v1/models", Some(&gw)).await?;
    assert!(
        models.contains("openai") && models.contains("anthropic"),
        "{models}"
    );

    // And in no log of the whole system (scheduler, agent, edge).
    for entry in std::fs::read_dir(c.dir.join("logs"))? {
        let path = entry?.path();
        let text = std::fs::read_to_string(&path)?;
        for key in [openai, anthropic] {
            assert!(!text.contains(key), "{key} in {}", path.display());
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_is_destroyed_after_its_grace_period_and_its_name_cools_down() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        nodes: 1,
        min_idle: 2,
        scheduler_args: ["--release-grace-secs", "4"].map(String::from).to_vec(),
        ..Default::default()
    })
    .await?;
    c.wait_idle_at_least(2, Duration::from_secs(120)).await?;
    let (token, gw) = c
        .sign_up(
            "alice@example.com",
            "alice",
            json!({"openai": "sk-a-0123456789"}),
        )
        .await?;
    let (container, docker_id): (uuid::Uuid, String) = sqlx::query_as(
        "SELECT c.id, c.docker_id FROM instances i JOIN containers c ON c.id = i.container_id",
    )
    .fetch_one(&c.db)
    .await?;
    let volume = c.docker_inspect(&docker_id)?["Mounts"][0]["Name"]
        .as_str()
        .context("state volume")?
        .to_owned();

    assert_eq!(c.my_instance(Method::DELETE, &token, None).await?.0, 200);
    assert_eq!(
        c.edge_get(&host("alice"), "/v1/models", Some(&gw)).await?.0,
        404
    );

    // The same customer may start again at once, under another name.
    let (status, body) = c
        .create_instance(&token, &json!({"subdomain": "alice-two"}))
        .await?;
    assert_eq!(status, 201, "{body}");

    // After the grace period the container and its volume are gone.
    wait_for(
        Duration::from_secs(30),
        "the released container destroyed",
        || async {
            let state: String = sqlx::query_scalar("SELECT state FROM containers WHERE id = $1")
                .bind(container)
                .fetch_one(&c.db)
                .await?;
            Ok(state == "destroyed" && c.docker_inspect(&docker_id).is_err())
        },
    )
    .await?;
    let volumes = std::process::Command::new("docker")
        .args(["volume", "ls", "-q"])
        .output()?;
    assert!(
        !String::from_utf8_lossy(&volumes.stdout).contains(&volume),
        "the state volume outlived the grace period"
    );
    let status: String = sqlx::query_scalar(
        "SELECT status FROM instances WHERE subdomain = 'alice' ORDER BY created_at LIMIT 1",
    )
    .fetch_one(&c.db)
    .await?;
    assert_eq!(status, "deleted");
    let audited: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE action = 'instance.destroyed'")
            .fetch_one(&c.db)
            .await?;
    assert_eq!(audited, 1);

    // The name is not reissued to someone else during the cool-down.
    let mallory = c.register("mallory@example.com").await?;
    let (status, body) = c
        .create_instance(&mallory, &json!({"subdomain": "alice"}))
        .await?;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "subdomain_taken");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_describes_every_route_and_errors_are_json() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        nodes: 1,
        min_idle: 0,
        max_idle: 0,
        ..Default::default()
    })
    .await?;
    let doc: Value = c
        .client
        .get(c.api("/openapi.json"))
        .send()
        .await?
        .json()
        .await?;
    let mut operations: Vec<(String, String)> = doc["paths"]
        .as_object()
        .context("paths")?
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .into_iter()
                .flat_map(|m| m.keys())
                .map(move |method| (method.to_uppercase(), path.clone()))
        })
        .collect();
    operations.sort();
    let mut expected: Vec<(String, String)> = [
        ("DELETE", "/api/account"),
        ("DELETE", "/api/account/mfa/totp"),
        ("DELETE", "/api/account/sessions"),
        ("DELETE", "/api/account/sessions/{id}"),
        ("GET", "/api/account"),
        ("GET", "/api/account/export"),
        ("GET", "/api/account/security-log"),
        ("GET", "/api/account/sessions"),
        ("PATCH", "/api/account"),
        ("POST", "/api/account/email"),
        ("POST", "/api/account/mfa/recovery-codes"),
        ("POST", "/api/account/mfa/totp"),
        ("POST", "/api/account/mfa/totp/confirm"),
        ("POST", "/api/auth/login/mfa"),
        ("POST", "/api/auth/undo-deletion"),
        ("DELETE", "/admin/nodes/{id}"),
        ("DELETE", "/api/instances/me"),
        ("DELETE", "/api/instances/me/domains/{hostname}"),
        ("GET", "/"),
        ("GET", "/admin/migrations/{id}"),
        ("GET", "/admin/nodes"),
        ("GET", "/admin/pool"),
        ("GET", "/api/billing"),
        ("GET", "/api/billing/plans"),
        ("GET", "/api/credits"),
        ("GET", "/api/instances/me"),
        ("GET", "/api/instances/me/backups"),
        ("GET", "/api/instances/me/domains"),
        ("GET", "/api/instances/{id}"),
        ("GET", "/api/subdomains/{name}"),
        ("GET", "/healthz"),
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
        ("PATCH", "/api/instances/me"),
        ("POST", "/admin/instances/migrate"),
        ("POST", "/admin/instances/{id}/backups"),
        ("POST", "/admin/instances/{id}/restore"),
        ("POST", "/admin/join-tokens"),
        ("POST", "/admin/nodes/{id}/activate"),
        ("POST", "/admin/nodes/{id}/drain"),
        ("POST", "/api/auth/login"),
        ("POST", "/api/auth/logout"),
        ("POST", "/api/auth/password/forgot"),
        ("POST", "/api/auth/password/reset"),
        ("POST", "/api/auth/register"),
        ("POST", "/api/auth/resend-verification"),
        ("POST", "/api/auth/verify-email"),
        ("POST", "/api/billing/checkout"),
        ("POST", "/api/billing/portal"),
        ("POST", "/api/billing/webhook"),
        ("POST", "/api/credits/checkout"),
        ("POST", "/api/credits/top-up"),
        ("POST", "/api/instances"),
        ("POST", "/api/instances/me/domains"),
        ("POST", "/api/instances/me/domains/{hostname}/verify"),
        ("PUT", "/admin/instances/{id}/tier"),
        ("PUT", "/admin/pool"),
    ]
    .iter()
    .map(|(m, p)| (m.to_string(), p.to_string()))
    .collect();
    expected.sort();
    assert_eq!(operations, expected);

    // Every documented operation is served (not the router's fallback), and
    // every error is {error: {code, message}}.
    for (method, path) in &operations {
        let url = c.api(&path.replace("{id}", "x").replace("{name}", "some-name"));
        let r = c
            .client
            .request(method.parse()?, url)
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await?;
        let status = r.status().as_u16();
        let text = r.text().await?;
        assert_ne!(status, 405, "{method} {path}: {text}");
        if status >= 400 {
            let v: Value =
                serde_json::from_str(&text).with_context(|| format!("{method} {path}: {text}"))?;
            assert!(
                v["error"]["code"].is_string() && v["error"]["message"].is_string(),
                "{method} {path}: {v}"
            );
            assert_ne!(
                v["error"]["message"], "endpoint not found",
                "{method} {path} is not routed"
            );
        }
    }
    // What is not documented is not served.
    let r = c.client.get(c.api("/api/secret-admin")).send().await?;
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await?;
    assert_eq!(v["error"]["message"], "endpoint not found");
    let r = c.client.put(c.api("/api/instances/me")).send().await?;
    assert_eq!(r.status(), 405);
    let v: Value = r.json().await?;
    assert_eq!(v["error"]["code"], "method_not_allowed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_are_limited_per_address_with_retry_after() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        nodes: 0,
        scheduler_args: ["--registrations-per-address-per-hour", "3"]
            .map(String::from)
            .to_vec(),
        ..Default::default()
    })
    .await?;
    for i in 0..3 {
        c.register(&format!("limited{i}@example.com")).await?;
    }
    let r = c
        .client
        .post(c.api("/api/auth/register"))
        .json(&json!({"email": "limited9@example.com", "password": "correct-horse-battery"}))
        .send()
        .await?;
    assert_eq!(r.status(), 429);
    let wait: u64 = r
        .headers()
        .get("retry-after")
        .context("Retry-After")?
        .to_str()?
        .parse()?;
    assert!((3000..=3600).contains(&wait), "Retry-After {wait}");
    let body: Value = r.json().await?;
    assert_eq!(body["error"]["code"], "rate_limited");
    Ok(())
}
