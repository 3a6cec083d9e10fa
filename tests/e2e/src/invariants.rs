//! What every fault test and the soak require of the system afterwards, and
//! a client that retries as a real one would.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::Cluster;

/// One client's signup, retried as a client should: after a 503 (with its
/// Retry-After, capped to a second here) and after a 409 "in progress", with
/// the same Idempotency-Key. Returns the final answer and every status seen.
pub async fn sign_up_retrying(
    c: &Cluster,
    token: &str,
    sub: String,
) -> Result<(u16, Value, Vec<u16>)> {
    let sub = sub.as_str();
    let key = format!("signup-{sub}");
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut seen = Vec::new();
    loop {
        let r = c
            .client
            .post(c.api("/api/instances"))
            .bearer_auth(token)
            .header("idempotency-key", &key)
            .json(&json!({"subdomain": sub, "apiKeys": {"openai": "sk-fault-1234567"}}))
            .send()
            .await;
        let r = match r {
            Ok(r) => r,
            Err(e) => anyhow::bail!("{sub}: the request itself failed: {e}"),
        };
        let status = r.status().as_u16();
        let retry_after = r
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let body: Value = r
            .json()
            .await
            .with_context(|| format!("{sub}: a JSON answer to {status}"))?;
        seen.push(status);
        match status {
            201 | 202 => return Ok((status, body, seen)),
            503 => {
                let code = body["error"]["code"].as_str().unwrap_or_default();
                anyhow::ensure!(
                    matches!(code, "database_unavailable" | "busy" | "no_capacity"),
                    "{sub}: 503 with code {code}: {body}"
                );
                let wait =
                    retry_after.with_context(|| format!("{sub}: 503 without Retry-After"))?;
                tokio::time::sleep(Duration::from_secs(wait.min(1))).await;
            }
            409 if body["error"]["code"] == "idempotency_in_progress" => {
                anyhow::ensure!(
                    retry_after.is_some(),
                    "{sub}: in-progress without Retry-After"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            _ => anyhow::bail!("{sub}: answered {status}: {body} (after {seen:?})"),
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{sub}: no answer in 90 s: {seen:?}"
        );
    }
}

/// The invariants a fault must not break: nothing half-applied, nothing
/// claimed twice, no route without a ready instance.
pub async fn check(c: &Cluster) -> Result<()> {
    let checks: [(&str, &str); 5] = [
        (
            "ready instances without an assigned container",
            "SELECT count(*) FROM instances i LEFT JOIN containers c ON c.id = i.container_id
              WHERE i.status = 'ready' AND (c.id IS NULL OR c.state <> 'assigned')",
        ),
        (
            "containers held by two live instances",
            "SELECT count(*) FROM (SELECT container_id FROM instances
               WHERE container_id IS NOT NULL AND status IN ('pending', 'ready')
               GROUP BY container_id HAVING count(*) > 1) d",
        ),
        (
            "assigned containers without a live instance",
            "SELECT count(*) FROM containers c WHERE c.state = 'assigned'
               AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.container_id = c.id AND i.status IN ('pending', 'ready'))",
        ),
        (
            "routes to instances that are not ready",
            "SELECT count(*) FROM routes r JOIN instances i ON i.id = r.instance_id
              WHERE r.removed_at IS NULL AND i.status <> 'ready'",
        ),
        (
            "accounts with two instances",
            "SELECT count(*) FROM (SELECT user_id FROM instances WHERE status <> 'deleted'
               GROUP BY user_id HAVING count(*) > 1) d",
        ),
    ];
    for (what, sql) in checks {
        assert_eq!(c.count(sql).await?, 0, "{what}");
    }
    Ok(())
}
