//! `/api/instances`: a customer's OpenClaw gateway, in the PRD's shape.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::app::{App, AppRef};
use crate::assign::{self, ClaimRequest, Outcome};
use crate::auth::AuthUser;
use crate::crypto::random_token;
use crate::error::{Error, Result};
use crate::http::ApiJson;
use crate::idempotency::{self, Begin};

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

/// A provider we know how to configure, normalised.
pub(crate) fn validate_provider(provider: &str) -> Result<String> {
    let provider = provider.trim().to_ascii_lowercase();
    if !PROVIDERS.contains(&provider.as_str()) {
        return Err(Error::Invalid {
            field: "apiKeys",
            message: format!("unknown provider (known: {})", PROVIDERS.join(", ")),
        });
    }
    Ok(provider)
}

pub(crate) fn validate_keys(keys: BTreeMap<String, String>) -> Result<BTreeMap<String, String>> {
    keys.into_iter()
        .map(|(provider, key)| {
            let provider = validate_provider(&provider)?;
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

/// What a response shows of a key: enough to recognise it, not to use it.
fn mask(key: &str) -> String {
    let n = key.chars().count();
    if n < 12 {
        return "…".into();
    }
    let head: String = key.chars().take(3).collect();
    let tail: String = key.chars().skip(n - 4).collect();
    format!("{head}…{tail}")
}

pub(crate) fn default_model_for(keys: &BTreeMap<String, String>) -> String {
    match keys.keys().next().map(String::as_str) {
        Some("openai") => "openai/gpt-4o".into(),
        Some("anthropic") => "anthropic/claude-sonnet-4".into(),
        Some(other) => format!("{other}/default"),
        None => String::new(),
    }
}

#[derive(Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CreateInstance {
    subdomain: Option<String>,
    #[serde(default)]
    api_keys: BTreeMap<String, String>,
}

/// An instance as its owner sees it. The gateway token is shown once the
/// instance is live: until then a retried claim may still move it to
/// another container with another token.
fn view(
    app: &App,
    id: Uuid,
    subdomain: &str,
    token: Option<&str>,
    status: &str,
    tier: &str,
) -> Value {
    let token = token.filter(|_| matches!(status, "ready" | "suspended"));
    json!({"instance": {
        "id": id,
        "subdomain": subdomain,
        "url": app.cfg.url_of(subdomain),
        "gatewayUrl": app.cfg.gateway_url_of(subdomain),
        "gatewayToken": token,
        "status": status,
        "tier": tier,
        "statusUrl": status_url(id),
    }})
}

fn status_url(id: Uuid) -> String {
    format!("/api/instances/{id}")
}

/// A JSON answer; created and accepted instances carry their status URL in
/// `Location` too.
fn answer(status: StatusCode, body: Value) -> Response {
    let location = body["instance"]["statusUrl"].as_str().map(str::to_owned);
    let mut resp = (status, axum::Json(body)).into_response();
    if let Some(loc) = location.filter(|_| status.is_success()) {
        if let Ok(v) = HeaderValue::from_str(&loc) {
            resp.headers_mut().insert(header::LOCATION, v);
        }
    }
    resp
}

#[utoipa::path(post, path = "/api/instances", tag = "instances", request_body = CreateInstance, security(("bearer" = [])),
    params(("Idempotency-Key" = Option<String>, Header, description = "Repeats return the first answer")),
    responses(
        (status = 201, description = "Live: URL and gateway token", body = crate::openapi::InstanceEnvelope),
        (status = 202, description = "Not live within the request deadline: poll statusUrl", body = crate::openapi::InstanceEnvelope),
        (status = 400, description = "Malformed JSON", body = crate::openapi::ErrorBody),
        (status = 401, description = "No valid token", body = crate::openapi::ErrorBody),
        (status = 409, description = "Subdomain taken, or the account already has an instance", body = crate::openapi::ErrorBody),
        (status = 422, description = "Invalid subdomain or key", body = crate::openapi::ErrorBody),
        (status = 503, description = "No capacity right now", body = crate::openapi::ErrorBody),
    ))]
pub async fn create(
    State(app): State<AppRef>,
    user: AuthUser,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CreateInstance>,
) -> Result<Response> {
    let Some(key) = idempotency::key_from(&headers)? else {
        let (status, body) = sign_up(&app, &user, body).await?;
        return Ok(answer(status, body));
    };
    match idempotency::begin(&app, user.id, &key, &idempotency::fingerprint(&body)).await? {
        Begin::Replay(status, body) => {
            let mut resp = answer(status, body);
            resp.headers_mut()
                .insert("idempotent-replayed", HeaderValue::from_static("true"));
            Ok(resp)
        }
        Begin::First => {
            let (status, body) = match sign_up(&app, &user, body).await {
                Ok(done) => done,
                // The first answer is stored, errors included.
                Err(e) => e.answer_logged(),
            };
            idempotency::finish(&app, user.id, &key, status, &body).await;
            Ok(answer(status, body))
        }
    }
}

/// Claims a container for the user and waits, up to the claim wait, for
/// it to go live: 201 when ready, 202 with a status URL when not yet.
async fn sign_up(
    app: &AppRef,
    user: &AuthUser,
    body: CreateInstance,
) -> Result<(StatusCode, Value)> {
    let subdomain = match body.subdomain {
        Some(s) => validate_subdomain(&s)?,
        None => format!("claw-{}", random_token(4)),
    };
    if crate::release::cooling_down(app, &subdomain, user.id).await? {
        return Err(Error::Conflict {
            code: "subdomain_taken",
            message: "that subdomain is taken".into(),
        });
    }
    let provider_keys = validate_keys(body.api_keys)?;
    let default_model = default_model_for(&provider_keys);
    let claimed = assign::claim(
        app,
        ClaimRequest {
            user_id: user.id,
            subdomain: subdomain.clone(),
            provider_keys,
            default_model,
        },
    )
    .await
    .inspect_err(|e| {
        let result = if matches!(e, Error::Conflict { .. }) {
            "conflict"
        } else {
            "error"
        };
        metrics::counter!("clawdeploy_assignments_total", "result" => result).increment(1);
    })?;
    let outcome = assign::wait_ready(app, claimed.instance_id).await?;
    if outcome == Outcome::Ready {
        // The route is committed; answer once the edges route it too.
        let version: Option<i64> = sqlx::query_scalar(
            "SELECT version FROM routes WHERE instance_id = $1 AND removed_at IS NULL",
        )
        .bind(claimed.instance_id)
        .fetch_optional(&app.db)
        .await?;
        if let Some(v) = version {
            crate::routes::wait_edges(app, claimed.instance_id, v as u64).await;
        }
    }
    let (status, code) = match outcome {
        Outcome::Ready => ("ready", StatusCode::CREATED),
        Outcome::Pending => {
            metrics::counter!("clawdeploy_assignments_total", "result" => "deadline").increment(1);
            tracing::warn!(instance_id = %claimed.instance_id, container_id = %claimed.container_id, node_id = claimed.node_id, "claim not confirmed within the request deadline; answering 202");
            ("pending", StatusCode::ACCEPTED)
        }
        Outcome::Failed => ("failed", StatusCode::ACCEPTED),
    };
    // A retried claim moved the instance to another container: its token.
    let token = instance_token(app, claimed.instance_id).await?;
    Ok((
        code,
        view(
            app,
            claimed.instance_id,
            &subdomain,
            token.as_deref(),
            status,
            "free",
        ),
    ))
}

/// The gateway token of the instance's current container.
async fn instance_token(app: &App, instance_id: Uuid) -> Result<Option<String>> {
    let row: Option<(Uuid, Vec<u8>)> = sqlx::query_as(
        "SELECT c.id, c.gateway_token_enc FROM instances i JOIN containers c ON c.id = i.container_id WHERE i.id = $1",
    )
    .bind(instance_id)
    .fetch_optional(&app.db)
    .await?;
    row.map(|(c, t)| app.secrets.open_string(&App::gateway_token_aad(c), &t))
        .transpose()
}

/// id, subdomain, status, tier.
type InstanceRow = (Uuid, String, String, String);

/// The instance as its owner sees it, with its provider keys masked.
async fn render_row(app: &App, row: InstanceRow) -> Result<Value> {
    let (id, subdomain, status, tier) = row;
    let token = instance_token(app, id).await?;
    let mut body = view(app, id, &subdomain, token.as_deref(), &status, &tier);
    let sealed: Vec<(String, Vec<u8>)> =
        sqlx::query_as("SELECT name, ciphertext FROM secrets WHERE instance_id = $1 ORDER BY name")
            .bind(id)
            .fetch_all(&app.db)
            .await?;
    let mut keys = serde_json::Map::new();
    let deks = if sealed.is_empty() {
        Default::default()
    } else {
        let mut conn = app.db.acquire().await?;
        crate::envelope::load(app, &mut conn, &[id]).await?
    };
    for (name, ciphertext) in sealed {
        let dek = deks
            .get(&id)
            .ok_or_else(|| Error::Internal(format!("instance {id} has keys but no data key")))?;
        let key = dek.open_string(&App::secret_aad(id, &name), &ciphertext)?;
        keys.insert(name, mask(&key).into());
    }
    body["instance"]["apiKeys"] = Value::Object(keys);
    Ok(body)
}

async fn render(app: &App, row: InstanceRow) -> Result<axum::Json<Value>> {
    render_row(app, row).await.map(axum::Json)
}

/// The instance `id` as its owner sees it.
pub(crate) async fn render_id(app: &App, id: Uuid) -> Result<Value> {
    let row: InstanceRow =
        sqlx::query_as("SELECT id, subdomain, status, tier FROM instances WHERE id = $1")
            .bind(id)
            .fetch_one(&app.db)
            .await?;
    render_row(app, row).await
}

/// The caller's live instance (the newest, when an earlier one failed).
#[utoipa::path(get, path = "/api/instances/me", tag = "instances", security(("bearer" = [])),
    responses(
        (status = 200, description = "The caller's instance", body = crate::openapi::InstanceEnvelope),
        (status = 401, description = "No valid token", body = crate::openapi::ErrorBody),
        (status = 404, description = "No instance", body = crate::openapi::ErrorBody),
    ))]
pub async fn me(State(app): State<AppRef>, user: AuthUser) -> Result<axum::Json<Value>> {
    let row: Option<InstanceRow> = sqlx::query_as(
        "SELECT id, subdomain, status, tier FROM instances
          WHERE user_id = $1 AND status <> 'deleted' ORDER BY created_at DESC LIMIT 1",
    )
    .bind(user.id)
    .fetch_optional(&app.db)
    .await?;
    render(&app, row.ok_or(Error::NotFound("instance"))?).await
}

/// One of the caller's instances: the status URL of a signup.
#[utoipa::path(get, path = "/api/instances/{id}", tag = "instances", security(("bearer" = [])),
    params(("id" = String, Path, description = "Instance id (the status URL of a signup)")),
    responses(
        (status = 200, description = "One of the caller's instances", body = crate::openapi::InstanceEnvelope),
        (status = 401, description = "No valid token", body = crate::openapi::ErrorBody),
        (status = 404, description = "No such instance of the caller's", body = crate::openapi::ErrorBody),
    ))]
pub async fn get(
    State(app): State<AppRef>,
    user: AuthUser,
    Path(id): Path<String>,
) -> Result<axum::Json<Value>> {
    // Another user's instance is as unknown as a missing one.
    let id: Uuid = id.parse().map_err(|_| Error::NotFound("instance"))?;
    let row: Option<InstanceRow> = sqlx::query_as(
        "SELECT id, subdomain, status, tier FROM instances WHERE id = $1 AND user_id = $2",
    )
    .bind(id)
    .bind(user.id)
    .fetch_optional(&app.db)
    .await?;
    render(&app, row.ok_or(Error::NotFound("instance"))?).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_masked_to_a_recognisable_stub() {
        assert_eq!(mask("sk-proj-abcdefghijkl1234"), "sk-…1234");
        assert_eq!(mask("short"), "…");
        assert!(!mask("sk-ant-0123456789abcdef").contains("0123456789"));
    }

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
