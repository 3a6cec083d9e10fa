//! The scheduler's HTTP face (axum): the customer API, the operator API,
//! the signup page, health, metrics and the OpenAPI document. Handlers
//! parse and answer; what they do lives in the domain modules. Every error
//! leaves as `{error: {code, message}}` (`error`).

pub mod account;
pub mod admin;
pub mod auth;
pub mod billing;
mod doc;
pub mod domains;
mod error;
pub mod extract;
pub mod instances;
pub mod migrations;
pub mod page;
pub mod views;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Extension;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::AppRef;
use crate::error::Error;
use views::{AnyObject, ErrorBody, Health};

/// JSON bodies are small; anything larger is refused before parsing.
const BODY_LIMIT: usize = 64 * 1024;

/// The API as one list of registrations: each gives the router its route
/// and the OpenAPI document its description, so neither can miss one.
pub fn api() -> OpenApiRouter<AppRef> {
    OpenApiRouter::with_openapi(doc::ApiDoc::openapi())
        .routes(routes!(auth::register))
        .routes(routes!(billing::credits))
        .routes(routes!(billing::credits_checkout))
        .routes(routes!(billing::credits_top_up))
        .routes(routes!(auth::login))
        .routes(routes!(auth::login_mfa))
        .routes(routes!(auth::logout))
        .routes(routes!(auth::verify_email))
        .routes(routes!(auth::resend_verification))
        .routes(routes!(auth::forgot_password))
        .routes(routes!(auth::reset_password))
        .routes(routes!(
            account::profile,
            account::update_profile,
            account::delete_account
        ))
        .routes(routes!(account::export))
        .routes(routes!(auth::undo_deletion))
        .routes(routes!(account::change_email))
        .routes(routes!(account::sessions, account::sign_out_everywhere))
        .routes(routes!(account::revoke_session))
        .routes(routes!(account::security_log))
        .routes(routes!(account::mfa_begin, account::mfa_disable))
        .routes(routes!(account::mfa_confirm))
        .routes(routes!(account::recovery_codes))
        .routes(routes!(instances::create))
        .routes(routes!(
            instances::me,
            instances::update,
            instances::release
        ))
        .routes(routes!(instances::get))
        .routes(routes!(admin::pool, admin::set_pool))
        .routes(routes!(admin::create_join_token))
        .routes(routes!(admin::list_nodes))
        .routes(routes!(admin::remove_node))
        .routes(routes!(admin::drain_node))
        .routes(routes!(admin::activate_node))
        .routes(routes!(migrations::migrate))
        .routes(routes!(migrations::get_migration))
        .routes(routes!(migrations::restore))
        .routes(routes!(migrations::take_backup))
        .routes(routes!(instances::backups))
        .routes(routes!(billing::plans))
        .routes(routes!(billing::set_tier))
        .routes(routes!(billing::webhook))
        .routes(routes!(billing::me))
        .routes(routes!(billing::checkout))
        .routes(routes!(billing::portal))
        .routes(routes!(domains::add, domains::list))
        .routes(routes!(domains::remove))
        .routes(routes!(domains::verify))
        .routes(routes!(page::index))
        .routes(routes!(page::availability))
        .routes(routes!(healthz))
        .routes(routes!(metrics_text))
        .routes(routes!(openapi_json))
}

#[utoipa::path(get, path = "/metrics", tag = "service",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String)))]
async fn metrics_text(Extension(handle): Extension<PrometheusHandle>) -> String {
    handle.render()
}

type Document = std::sync::Arc<utoipa::openapi::OpenApi>;

#[utoipa::path(get, path = "/openapi.json", tag = "service",
    responses((status = 200, description = "This document", body = AnyObject)))]
async fn openapi_json(Extension(doc): Extension<Document>) -> axum::Json<Document> {
    axum::Json(doc)
}

/// The whole HTTP application over `app`.
pub fn router(app: AppRef, metrics: PrometheusHandle) -> Router {
    let (api, doc) = api().split_for_parts();
    let doc: Document = std::sync::Arc::new(doc);
    api.fallback(|| async { Error::NotFound("endpoint") })
        .method_not_allowed_fallback(|| async { Error::MethodNotAllowed })
        .layer(Extension(doc))
        .layer(Extension(metrics))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(app)
}

#[utoipa::path(get, path = "/healthz", tag = "service",
    responses(
        (status = 200, description = "The scheduler and its database answer", body = Health),
        (status = 503, description = "The database does not answer (`database_unavailable`, with Retry-After)", body = ErrorBody),
    ))]
async fn healthz(State(app): State<AppRef>) -> impl IntoResponse {
    match sqlx::query("SELECT 1").execute(&app.db).await {
        Ok(_) => (StatusCode::OK, axum::Json(Health { ok: true })).into_response(),
        Err(e) => Error::Database(e).into_response(),
    }
}
