//! `/api/instances`: a customer's OpenClaw gateway, in the PRD's shape:
//! signup (with `Idempotency-Key`), the instance, live key changes and
//! release.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::extract::{ApiJson, AuthUser, IdempotencyKey};
use super::views::{
    BackupList, ErrorBody, InstanceEnvelope, InstanceView, ReleasedView, UsageView,
};
use crate::app::claims::SignUp;
use crate::app::{AppRef, Config};
use crate::error::{Error, Result};
use crate::lifecycle::signup::{self, Outcome, Reply, SignedUp};
use crate::lifecycle::{instances, reconfigure, release};
use crate::model::InstanceStatus;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CreateInstance {
    subdomain: Option<String>,
    #[serde(default)]
    api_keys: BTreeMap<String, String>,
}

/// The answer as sent: JSON, with the status URL of a created or accepted
/// instance in `Location` (read from the body, so a replay carries it too).
fn respond(reply: Reply) -> Response {
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let location = status
        .is_success()
        .then(|| serde_json::from_slice::<serde_json::Value>(&reply.body).ok())
        .flatten()
        .and_then(|v| v["instance"]["statusUrl"].as_str().map(str::to_owned));
    let mut resp = (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        reply.body,
    )
        .into_response();
    let headers = resp.headers_mut();
    if let Some(v) = location.and_then(|l| HeaderValue::from_str(&l).ok()) {
        headers.insert(header::LOCATION, v);
    }
    if let Some(secs) = reply.retry_after {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    if reply.replayed {
        headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    resp
}

/// A signup's result as the customer reads it: 201 when the instance went
/// live within the claim wait, 202 with its status URL when not yet (or
/// when it failed), or the error.
fn render(cfg: &Config, result: Result<SignedUp>) -> Reply {
    let (status, body, retry_after) = match result {
        Ok(SignedUp { outcome, instance }) => {
            let status = match outcome {
                Outcome::Ready => StatusCode::CREATED,
                Outcome::Queued | Outcome::Pending | Outcome::Failed => StatusCode::ACCEPTED,
            };
            let view = InstanceEnvelope {
                instance: InstanceView::new(cfg, instance),
            };
            (status, to_json(&view), None)
        }
        Err(e) => {
            let (status, body) = e.answer_logged();
            (status, to_json(&body), e.retry_after())
        }
    };
    Reply {
        status: status.as_u16(),
        body,
        retry_after,
        replayed: false,
    }
}

#[utoipa::path(post, path = "/api/instances", tag = "instances", request_body = CreateInstance, security(("bearer" = [])),
    params(("Idempotency-Key" = Option<String>, Header, description = "Repeats return the first answer")),
    responses(
        (status = 201, description = "Live: URL and gateway token", body = InstanceEnvelope),
        (status = 202, description = "Not live within the request deadline: poll statusUrl", body = InstanceEnvelope),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 409, description = "Subdomain taken, or the account already has an instance", body = ErrorBody),
        (status = 422, description = "Invalid subdomain or key", body = ErrorBody),
        (status = 503, description = "No capacity right now, or the database is away: retry with the same Idempotency-Key after Retry-After", body = ErrorBody),
    ))]
pub async fn create(
    State(app): State<AppRef>,
    user: AuthUser,
    IdempotencyKey(key): IdempotencyKey,
    ApiJson(body): ApiJson<CreateInstance>,
) -> Result<Response> {
    let signup = SignUp::new(user.id, body.subdomain, body.api_keys, key);
    let reply = signup::sign_up(&app, signup, |r| render(&app.cfg, r)).await?;
    Ok(respond(reply))
}

fn to_json(v: &impl Serialize) -> Vec<u8> {
    // Views are plain data: serializing them cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

/// The caller's live instance (the newest, when an earlier one failed).
#[utoipa::path(get, path = "/api/instances/me", tag = "instances", security(("bearer" = [])),
    responses(
        (status = 200, description = "The caller's instance", body = InstanceEnvelope),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No instance", body = ErrorBody),
    ))]
pub async fn me(State(app): State<AppRef>, user: AuthUser) -> Result<axum::Json<InstanceEnvelope>> {
    let instance = instances::current_of(&app, user.id).await?;
    let used = crate::billing::credits::usage(&app.db, user.id, Some(instance.id)).await?;
    let limit =
        crate::billing::credits::message_limit(instance.tier, app.cfg.free_messages_per_month);
    let mut view = InstanceView::new(&app.cfg, instance);
    view.usage = Some(UsageView::new(used, limit));
    Ok(axum::Json(InstanceEnvelope { instance: view }))
}

/// The caller's instance's backups, newest first: daily ones kept for the
/// retention period, and the one taken before a released instance's data
/// is destroyed.
#[utoipa::path(get, path = "/api/instances/me/backups", tag = "instances", security(("bearer" = [])),
    responses(
        (status = 200, description = "The backups of the caller's instance", body = BackupList),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No instance", body = ErrorBody),
    ))]
pub async fn backups(State(app): State<AppRef>, user: AuthUser) -> Result<axum::Json<BackupList>> {
    let instance = instances::current_of(&app, user.id).await?;
    let backups = crate::backup::list_for(&app, instance.id).await?;
    Ok(axum::Json(BackupList {
        backups: backups.into_iter().map(Into::into).collect(),
    }))
}

/// One of the caller's instances: the status URL of a signup.
#[utoipa::path(get, path = "/api/instances/{id}", tag = "instances", security(("bearer" = [])),
    params(("id" = String, Path, description = "Instance id (the status URL of a signup)")),
    responses(
        (status = 200, description = "One of the caller's instances", body = InstanceEnvelope),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No such instance of the caller's", body = ErrorBody),
    ))]
pub async fn get(
    State(app): State<AppRef>,
    user: AuthUser,
    Path(id): Path<String>,
) -> Result<axum::Json<InstanceEnvelope>> {
    // Another user's instance is as unknown as a missing one.
    let id: Uuid = id.parse().map_err(|_| Error::NotFound("instance"))?;
    let instance = instances::owned_by(&app, user.id, id).await?;
    Ok(axum::Json(InstanceEnvelope {
        instance: InstanceView::new(&app.cfg, instance),
    }))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UpdateInstance {
    /// Provider → new key; `null` removes the provider's key.
    #[serde(default)]
    api_keys: BTreeMap<String, Option<String>>,
    default_model: Option<String>,
}

/// New provider keys (or a new default model) for a live gateway, without
/// a restart. The answer waits, bounded, until the gateway runs them.
#[utoipa::path(patch, path = "/api/instances/me", tag = "instances", request_body = UpdateInstance, security(("bearer" = [])),
    responses(
        (status = 200, description = "Applied: the gateway runs the new keys", body = InstanceEnvelope),
        (status = 202, description = "Stored; not yet confirmed live", body = InstanceEnvelope),
        (status = 400, description = "Malformed JSON or nothing to change", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No live instance", body = ErrorBody),
        (status = 422, description = "Unknown provider or invalid key", body = ErrorBody),
    ))]
pub async fn update(
    State(app): State<AppRef>,
    user: AuthUser,
    ApiJson(body): ApiJson<UpdateInstance>,
) -> Result<(StatusCode, axum::Json<InstanceEnvelope>)> {
    let change = reconfigure::Change {
        api_keys: body.api_keys,
        default_model: body.default_model,
    };
    let done = reconfigure::reconfigure(&app, user.id, change).await?;
    let mut view = InstanceView::new(&app.cfg, done.instance);
    view.config_version = Some(done.config_version);
    view.config_applied = Some(done.applied);
    let status = if done.applied {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((status, axum::Json(InstanceEnvelope { instance: view })))
}

/// Releases the caller's gateway: the route goes first (the edges 404 the
/// host before the answer leaves), then the container stops with its data
/// kept for the grace period.
#[utoipa::path(delete, path = "/api/instances/me", tag = "instances", security(("bearer" = [])),
    responses(
        (status = 200, description = "Released: the host 404s now; data kept for the grace period", body = ReleasedView),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No instance to release", body = ErrorBody),
    ))]
pub async fn release(
    State(app): State<AppRef>,
    user: AuthUser,
) -> Result<axum::Json<ReleasedView>> {
    let released = release::release(&app, user.id).await?;
    Ok(axum::Json(ReleasedView {
        id: released.id,
        subdomain: released.subdomain,
        status: InstanceStatus::Deleting,
    }))
}
