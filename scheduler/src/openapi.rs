//! The HTTP API's OpenAPI description, served at `/openapi.json`. The
//! router is built from the same registrations (`utoipa-axum`), so every
//! route is described; the shapes below document answers the handlers
//! build as JSON.

use std::collections::BTreeMap;

use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};
use uuid::Uuid;

/// Every error: a stable code and a message for people.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable (`invalid_field`, `subdomain_taken`, …).
    pub code: String,
    pub message: String,
}

#[derive(Serialize, ToSchema)]
pub struct UserView {
    pub id: Uuid,
    pub email: String,
}

/// A new session: the bearer token lasts 7 days unless revoked.
#[derive(Serialize, ToSchema)]
pub struct SessionView {
    pub user: UserView,
    pub token: String,
}

#[derive(Serialize, ToSchema)]
pub struct InstanceEnvelope {
    pub instance: InstanceView,
}

/// An instance as its owner sees it.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct InstanceView {
    pub id: Uuid,
    pub subdomain: String,
    pub url: String,
    pub gateway_url: String,
    /// Shown once the instance is live.
    pub gateway_token: Option<String>,
    /// `pending`, `ready`, `failed`, `suspended` or `deleting`.
    pub status: String,
    pub tier: String,
    pub status_url: String,
    /// Provider → masked key (`sk-…1234`).
    pub api_keys: Option<BTreeMap<String, String>>,
    /// After a change: the config version, and whether the gateway runs it.
    pub config_version: Option<i64>,
    pub config_applied: Option<bool>,
}

#[derive(Serialize, ToSchema)]
pub struct ReleasedView {
    pub id: Uuid,
    pub subdomain: String,
    /// `deleting`: the data is kept for the grace period.
    pub status: String,
}

#[derive(Serialize, ToSchema)]
pub struct Health {
    pub ok: bool,
}

/// A JSON object (the operator API's answers are described in the README).
#[derive(Serialize, ToSchema)]
#[schema(value_type = Object)]
pub struct AnyObject(serde_json::Value);

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        let components = api.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "ClawDeploy API",
        description = "Accounts, instances and the operator API of the ClawDeploy scheduler. Every error is `{error: {code, message}}`."
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "accounts"),
        (name = "instances"),
        (name = "operator", description = "Bearer: the operator token (--admin-token)"),
        (name = "service")
    )
)]
pub struct ApiDoc;
