//! Tiers on the real system: the plans are public; an operator moves an
//! instance to pro and back, and its container is resized in place (Docker
//! shows the new CPU and memory limits, the same start time) while a client
//! keeps calling it through the edge without a single failure. The spec's
//! register body with a display name is accepted.

use std::time::Duration;

use anyhow::{Context, Result};
use clawdeploy_e2e::ops::{docker_limits, Poller};
use clawdeploy_e2e::{wait_for, Cluster, ClusterOptions, ADMIN_TOKEN, BASE_DOMAIN};
use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

async fn set_tier(c: &Cluster, id: &str, body: Value) -> Result<(u16, Value)> {
    c.admin(
        Method::PUT,
        &format!("/admin/instances/{id}/tier"),
        Some(body),
        Some(ADMIN_TOKEN),
    )
    .await
}

#[tokio::test]
async fn a_tier_change_resizes_the_container_live() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        nodes: 1,
        min_idle: 2,
        max_idle: 4,
        scheduler_args: ["--stripe-price-pro", "price_pro_test"]
            .map(String::from)
            .to_vec(),
        ..Default::default()
    })
    .await?;
    c.wait_idle_at_least(2, Duration::from_secs(120)).await?;

    // The plans, public.
    let plans: Value = c
        .client
        .get(c.api("/api/billing/plans"))
        .send()
        .await?
        .json()
        .await?;
    let tiers: Vec<&str> = plans["plans"]
        .as_array()
        .context("plans")?
        .iter()
        .filter_map(|p| p["tier"].as_str())
        .collect();
    assert_eq!(tiers, ["free", "pro", "team"]);
    assert_eq!(plans["plans"][1]["priceId"], "price_pro_test");
    assert_eq!(plans["plans"][1]["monthlyPriceCents"], 2900);
    assert_eq!(plans["plans"][2]["memoryMb"], 2048);
    assert!(plans["plans"][2]["priceId"].is_null(), "not configured");

    // The spec's register body, with a display name; a bad one is refused.
    let r = c
        .client
        .post(c.api("/api/auth/register"))
        .json(&json!({"email": "ada@example.com", "password": "correct-horse-battery", "name": "Ada Lovelace"}))
        .send()
        .await?;
    assert_eq!(r.status(), 201);
    let token = r.json::<Value>().await?["token"]
        .as_str()
        .context("token")?
        .to_owned();
    let r = c
        .client
        .post(c.api("/api/auth/register"))
        .json(&json!({"email": "bob@example.com", "password": "correct-horse-battery", "name": "x".repeat(101)}))
        .send()
        .await?;
    assert_eq!(r.status(), 422);
    let name: String = sqlx::query_scalar("SELECT name FROM users WHERE email = 'ada@example.com'")
        .fetch_one(&c.db)
        .await?;
    assert_eq!(name, "Ada Lovelace");

    let (status, body) = c
        .create_instance(
            &token,
            &json!({"subdomain": "ada", "apiKeys": {"openai": "sk-ada"}}),
        )
        .await?;
    assert_eq!(status, 201, "{body}");
    let gw = body["instance"]["gatewayToken"]
        .as_str()
        .context("gw")?
        .to_owned();
    let id = body["instance"]["id"].as_str().context("id")?.to_owned();
    assert_eq!(body["instance"]["tier"], "free");
    let docker_id: String = sqlx::query_scalar(
        "SELECT c.docker_id FROM instances i JOIN containers c ON c.id = i.container_id WHERE i.id = $1",
    )
    .bind(id.parse::<Uuid>()?)
    .fetch_one(&c.db)
    .await?;
    let (cpu, memory, started) = docker_limits(&c, &docker_id)?;
    assert_eq!((cpu, memory), (500, 512 << 20));

    let polling = Poller::start(
        &c,
        format!("ada.{BASE_DOMAIN}"),
        gw.clone(),
        Duration::from_millis(50),
    );
    for (tier, want) in [("pro", (1000, 1024 << 20)), ("free", (500, 512 << 20))] {
        let (status, v) = set_tier(&c, &id, json!({"tier": tier})).await?;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["tier"], tier);
        wait_for(Duration::from_secs(30), "the container resized", || async {
            let (cpu, memory, _) = docker_limits(&c, &docker_id)?;
            Ok((cpu, memory) == want)
        })
        .await?;
        assert_eq!(docker_limits(&c, &docker_id)?.2, started, "no restart");
        let (_, me) = c.my_instance(Method::GET, &token, None).await?;
        assert_eq!(me["instance"]["tier"], tier);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let seen = polling.stop().await?;
    assert!(seen.len() > 5);
    assert!(
        seen.iter().all(|(_, ok)| *ok),
        "the tenant answered throughout"
    );
    let audit = c
        .count(&format!(
            "SELECT count(*) FROM audit_log WHERE action = 'instance.tier' AND subject = '{id}'"
        ))
        .await?;
    assert_eq!(audit, 2);

    // The same tier again: nothing to do. Bad input: clear errors.
    let (status, v) = set_tier(&c, &id, json!({"tier": "free"})).await?;
    assert_eq!((status, v["previous"].as_str()), (200, Some("free")));
    let (status, v) = set_tier(&c, &id, json!({"tier": "gold"})).await?;
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("gold"),
        "{v}"
    );
    assert_eq!(
        set_tier(&c, &Uuid::new_v4().to_string(), json!({"tier": "pro"}))
            .await?
            .0,
        404
    );
    let (status, _) = c
        .admin(
            Method::PUT,
            &format!("/admin/instances/{id}/tier"),
            Some(json!({"tier": "pro"})),
            None,
        )
        .await?;
    assert_eq!(status, 401);
    Ok(())
}
