//! `/api/instances`: a customer's OpenClaw gateway, in the PRD's shape.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::app::{App, AppRef};
use crate::assign::{self, ClaimRequest};
use crate::auth::AuthUser;
use crate::crypto::random_token;
use crate::error::{Error, Result};
use crate::http::ApiJson;

/// How long a signup waits for the edges to apply its route.
const EDGE_ACK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Names that never become customer subdomains.
const RESERVED: &[&str] = &[
    "www",
    "api",
    "admin",
    "app",
    "mail",
    "smtp",
    "imap",
    "pop",
    "ftp",
    "ns",
    "ns1",
    "ns2",
    "dns",
    "edge",
    "status",
    "docs",
    "help",
    "support",
    "billing",
    "dashboard",
    "console",
    "static",
    "cdn",
    "assets",
    "auth",
    "login",
    "signup",
    "scheduler",
    "grpc",
    "metrics",
    "root",
    "localhost",
];

/// Providers whose keys we inject into `openclaw.json`.
const PROVIDERS: &[&str] = &[
    "openai",
    "anthropic",
    "google",
    "openrouter",
    "mistral",
    "groq",
    "xai",
    "deepseek",
];

pub fn validate_subdomain(raw: &str) -> Result<String> {
    let s = raw.trim().to_ascii_lowercase();
    let invalid = |m: &str| {
        Err(Error::Invalid {
            field: "subdomain",
            message: m.into(),
        })
    };
    if !(3..=63).contains(&s.len()) {
        return invalid("must be 3 to 63 characters");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return invalid("may contain only letters, digits and hyphens");
    }
    if s.starts_with('-') || s.ends_with('-') {
        return invalid("must not start or end with a hyphen");
    }
    if s.get(2..4) == Some("--") {
        return invalid("must not have hyphens in the third and fourth positions");
    }
    if RESERVED.contains(&s.as_str()) {
        return invalid("is reserved");
    }
    Ok(s)
}

fn validate_keys(keys: BTreeMap<String, String>) -> Result<BTreeMap<String, String>> {
    keys.into_iter()
        .map(|(provider, key)| {
            let provider = provider.trim().to_ascii_lowercase();
            if !PROVIDERS.contains(&provider.as_str()) {
                return Err(Error::Invalid {
                    field: "apiKeys",
                    message: format!("unknown provider (known: {})", PROVIDERS.join(", ")),
                });
            }
            let key = key.trim().to_owned();
            if key.is_empty() || key.len() > 512 || !key.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(Error::Invalid {
                    field: "apiKeys",
                    message: format!("the {provider} key must be 1 to 512 printable characters"),
                });
            }
            Ok((provider, key))
        })
        .collect()
}

fn default_model_for(keys: &BTreeMap<String, String>) -> String {
    match keys.keys().next().map(String::as_str) {
        Some("openai") => "openai/gpt-4o".into(),
        Some("anthropic") => "anthropic/claude-sonnet-4".into(),
        Some(other) => format!("{other}/default"),
        None => String::new(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CreateInstance {
    subdomain: Option<String>,
    #[serde(default)]
    api_keys: BTreeMap<String, String>,
}

fn view(app: &App, id: Uuid, subdomain: &str, token: &str, status: &str, tier: &str) -> Value {
    json!({"instance": {
        "id": id,
        "subdomain": subdomain,
        "url": app.cfg.url_of(subdomain),
        "gatewayUrl": app.cfg.gateway_url_of(subdomain),
        "gatewayToken": token,
        "status": status,
        "tier": tier,
    }})
}

pub async fn create(
    State(app): State<AppRef>,
    user: AuthUser,
    ApiJson(body): ApiJson<CreateInstance>,
) -> Result<(StatusCode, axum::Json<Value>)> {
    let subdomain = match body.subdomain {
        Some(s) => validate_subdomain(&s)?,
        None => format!("claw-{}", random_token(4)),
    };
    let provider_keys = validate_keys(body.api_keys)?;
    let default_model = default_model_for(&provider_keys);
    let claimed = assign::claim(
        &app,
        ClaimRequest {
            user_id: user.id,
            subdomain: subdomain.clone(),
            provider_keys,
            default_model,
        },
    )
    .await?;
    let ready = assign::wait_ready(&app, claimed.instance_id).await?;
    if ready {
        // The route is committed; answer once the edges route it too.
        let version: Option<i64> =
            sqlx::query_scalar("SELECT version FROM routes WHERE instance_id = $1")
                .bind(claimed.instance_id)
                .fetch_optional(&app.db)
                .await?;
        let started = std::time::Instant::now();
        if let Some(v) = version {
            if !app.edge_acks.wait_all(v as u64, EDGE_ACK_WAIT).await {
                tracing::warn!(instance_id = %claimed.instance_id, version = v, "an edge did not confirm the route in time");
            }
        }
        metrics::histogram!("clawdeploy_route_propagation_seconds")
            .record(started.elapsed().as_secs_f64());
    }
    let (status, code) = if ready {
        ("ready", StatusCode::CREATED)
    } else {
        ("pending", StatusCode::ACCEPTED)
    };
    if !ready {
        metrics::counter!("clawdeploy_assignments_total", "result" => "accepted").increment(1);
        tracing::warn!(instance_id = %claimed.instance_id, container_id = %claimed.container_id, node_id = claimed.node_id, "claim not confirmed within the wait; answering 202");
    }
    Ok((
        code,
        axum::Json(view(
            &app,
            claimed.instance_id,
            &subdomain,
            &claimed.gateway_token,
            status,
            "free",
        )),
    ))
}

/// id, subdomain, status, tier, container id, sealed gateway token.
type MeRow = (Uuid, String, String, String, Option<Uuid>, Option<Vec<u8>>);

pub async fn me(State(app): State<AppRef>, user: AuthUser) -> Result<axum::Json<Value>> {
    let row: Option<MeRow> = sqlx::query_as(
        "SELECT i.id, i.subdomain, i.status, i.tier, c.id, c.gateway_token_enc
           FROM instances i LEFT JOIN containers c ON c.id = i.container_id
          WHERE i.user_id = $1 AND i.status <> 'deleted'",
    )
    .bind(user.id)
    .fetch_optional(&app.db)
    .await?;
    let (id, subdomain, status, tier, container, token) = row.ok_or(Error::NotFound("instance"))?;
    let token = match (container, token) {
        (Some(c), Some(t)) => app.secrets.open_string(&App::gateway_token_aad(c), &t)?,
        _ => String::new(),
    };
    Ok(axum::Json(view(
        &app, id, &subdomain, &token, &status, &tier,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subdomains_are_dns_labels_and_not_reserved() {
        assert_eq!(validate_subdomain("Alice-1").unwrap(), "alice-1");
        for bad in [
            "ab",
            "-abc",
            "abc-",
            "a_b",
            "a.b",
            "www",
            "admin",
            "mail",
            "api",
            "xn--abc",
            &"a".repeat(64),
            "héllo",
        ] {
            assert!(validate_subdomain(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_are_checked() {
        let ok = validate_keys(BTreeMap::from([("OpenAI".into(), " sk-1 ".into())])).unwrap();
        assert_eq!(ok.get("openai").map(String::as_str), Some("sk-1"));
        assert!(validate_keys(BTreeMap::from([("evil".into(), "x".into())])).is_err());
        assert!(validate_keys(BTreeMap::from([("openai".into(), "has space".into())])).is_err());
    }
}
