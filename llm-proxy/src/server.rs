//! The HTTP surface: `POST /p/{provider}/v1/chat/completions` and
//! `GET /p/{provider}/v1/models` (each provider entry of a gateway's
//! `openclaw.json` points its `baseUrl` at `/p/<provider>/v1`), `GET
//! /v1/models` (every model sold with credits), `/healthz`, and
//! `/metrics` on its own listener. `serve` takes a listener and a
//! shutdown future; on shutdown it stops taking requests, lets open ones
//! end, then flushes usage and returns every lease.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, Response};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::error::ProxyError;
use crate::forward;
use crate::state::Proxy;

pub fn router(proxy: Arc<Proxy>) -> Router {
    let limit = proxy.max_body + 1;
    Router::new()
        .route("/p/{provider}/v1/chat/completions", post(chat))
        .route("/p/{provider}/v1/models", get(provider_models))
        .route("/v1/models", get(all_models))
        .route("/healthz", get(|| async { Json(json!({"ok": true})) }))
        .fallback(|| async { ProxyError::NotFound })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(proxy)
}

async fn chat(
    State(proxy): State<Arc<Proxy>>,
    Path(provider): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response<Body> {
    match forward::chat_completions(proxy, provider.to_ascii_lowercase(), headers, body).await {
        Ok(r) => r,
        Err(e) => {
            metrics::counter!(
                "clawdeploy_llm_requests_total",
                "model" => "-",
                "pay_mode" => "-",
                "result" => e.result_label()
            )
            .increment(1);
            e.into_response()
        }
    }
}

/// The models a provider entry offers: those the price table sells for
/// it, named as the gateway names them under that provider.
async fn provider_models(
    State(proxy): State<Arc<Proxy>>,
    Path(provider): Path<String>,
    headers: HeaderMap,
) -> Response<Body> {
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(token) = token else {
        return ProxyError::Unauthorized.into_response();
    };
    if let Err(e) = proxy.tenants.authenticate(token).await {
        return e.into_response();
    }
    let prefix = format!("{}/", provider.to_ascii_lowercase());
    let data: Vec<Value> = proxy
        .prices
        .models()
        .filter_map(|m| m.strip_prefix(&prefix))
        .map(|m| json!({"id": m, "object": "model", "owned_by": provider}))
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

/// Every model sold with AI credits, with its prices (public).
async fn all_models(State(proxy): State<Arc<Proxy>>) -> Json<Value> {
    let data: Vec<Value> = proxy
        .prices
        .models()
        .map(|m| {
            let p = proxy.prices.of(m);
            json!({
                "id": m,
                "object": "model",
                "owned_by": m.split('/').next().unwrap_or_default(),
                "pricing": p.map(|p| json!({
                    "inputPerMillionMicros": p.input_per_million,
                    "cachedInputPerMillionMicros": p.cached_input_per_million,
                    "outputPerMillionMicros": p.output_per_million,
                    "maxOutputTokens": p.max_output_tokens,
                    "markupPercent": proxy.markup,
                })),
            })
        })
        .collect();
    Json(json!({"object": "list", "data": data}))
}

/// Serves `listener` until `shutdown`, then lets open requests finish.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    // A stream's chunks are small: without TCP_NODELAY, Nagle's algorithm
    // holds each until the client's delayed ACK, up to 40 ms apart.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router(proxy))
        .with_graceful_shutdown(shutdown)
        .await
}
