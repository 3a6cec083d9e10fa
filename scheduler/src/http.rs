//! The scheduler's HTTP face (axum): customer API, health and metrics.
//! Every error leaves as `{error: {code, message}}` (see `error.rs`).

use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{delete, get, post};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::de::DeserializeOwned;

use crate::app::AppRef;
use crate::error::Error;
use crate::{admin, auth, instances, reconfigure, release};

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

pub fn router(app: AppRef, metrics: PrometheusHandle) -> Router {
    Router::new()
        .route("/api/auth/register", post(auth::register))
        .route("/api/auth/login", post(auth::login))
        .route("/api/auth/logout", post(auth::logout))
        .route("/api/instances", post(instances::create))
        .route(
            "/api/instances/me",
            get(instances::me)
                .patch(reconfigure::update)
                .delete(release::release),
        )
        .route("/api/instances/{id}", get(instances::get))
        .route("/admin/pool", get(admin::pool).put(admin::set_pool))
        .route("/admin/join-tokens", post(admin::create_join_token))
        .route("/admin/nodes", get(admin::list_nodes))
        .route("/admin/nodes/{id}", delete(admin::remove_node))
        .route("/admin/nodes/{id}/drain", post(admin::drain_node))
        .route("/admin/nodes/{id}/activate", post(admin::activate_node))
        .route("/healthz", get(healthz))
        .route(
            "/metrics",
            get(move || std::future::ready(metrics.render())),
        )
        .fallback(|| async { Error::NotFound("endpoint") })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(app)
}

async fn healthz(State(app): State<AppRef>) -> impl IntoResponse {
    match sqlx::query("SELECT 1").execute(&app.db).await {
        Ok(_) => (StatusCode::OK, axum::Json(serde_json::json!({"ok": true}))).into_response(),
        Err(e) => Error::Database(e).into_response(),
    }
}
