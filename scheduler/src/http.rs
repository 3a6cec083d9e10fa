//! The scheduler's HTTP face (axum): customer API, health and metrics.
//! Every error leaves as `{error: {code, message}}` (see `error.rs`).

use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Extension;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::de::DeserializeOwned;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::AppRef;
use crate::error::Error;
use crate::{admin, auth, instances, page, reconfigure, release};

/// JSON bodies are small; anything larger is refused before parsing.
const BODY_LIMIT: usize = 64 * 1024;

/// `axum::Json`, with rejections mapped onto the API's error shape.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = Error;

    async fn from_request(req: Request, state: &S) -> Result<Self, Error> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(Error::TooLarge)
            }
            Err(rejection) => Err(Error::BadRequest(rejection.body_text())),
        }
    }
}

/// The API as one list of registrations: each gives the router its route
/// and the OpenAPI document its description, so neither can miss one.
pub fn api() -> OpenApiRouter<AppRef> {
    OpenApiRouter::with_openapi(crate::openapi::ApiDoc::openapi())
        .routes(routes!(auth::register))
        .routes(routes!(auth::login))
        .routes(routes!(auth::logout))
        .routes(routes!(instances::create))
        .routes(routes!(
            instances::me,
            reconfigure::update,
            release::release
        ))
        .routes(routes!(instances::get))
        .routes(routes!(admin::pool, admin::set_pool))
        .routes(routes!(admin::create_join_token))
        .routes(routes!(admin::list_nodes))
        .routes(routes!(admin::remove_node))
        .routes(routes!(admin::drain_node))
        .routes(routes!(admin::activate_node))
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
    responses((status = 200, description = "This document", body = crate::openapi::AnyObject)))]
async fn openapi_json(Extension(doc): Extension<Document>) -> axum::Json<Document> {
    axum::Json(doc)
}

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
        (status = 200, description = "The scheduler and its database answer", body = crate::openapi::Health),
        (status = 500, description = "The database does not answer", body = crate::openapi::ErrorBody),
    ))]
async fn healthz(State(app): State<AppRef>) -> impl IntoResponse {
    match sqlx::query("SELECT 1").execute(&app.db).await {
        Ok(_) => (StatusCode::OK, axum::Json(serde_json::json!({"ok": true}))).into_response(),
        Err(e) => Error::Database(e).into_response(),
    }
}
