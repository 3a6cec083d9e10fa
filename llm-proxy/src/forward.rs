//! One chat completion through the proxy: who pays (their key, or AI
//! credits), the hold, the upstream call with the real key, the answer
//! passed through byte for byte (a stream as it arrives), and the
//! settlement to the usage the upstream reports.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Response};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::error::{ProxyError, Result};
use crate::ledger::Hold;
use crate::money::Micros;
use crate::prices::{Price, Usage};
use crate::pricing;
use crate::sse::{self, Scanner};
use crate::state::{Proxy, Route};
use crate::tenant::Tenant;
use crate::usage::{PayMode, UsageEvent};

/// The most of a whole (non-streamed) answer the proxy reads.
const MAX_ANSWER_BYTES: usize = 32 << 20;

/// What a request owes when it is over: its hold (credits) and its free
/// message (the free tier).
struct Pending {
    tenant: Arc<Tenant>,
    route: Route,
    model_label: String,
    price: Option<Price>,
    hold: Option<Hold>,
    counted_message: bool,
    input_estimate: u64,
    started: Instant,
}

pub async fn chat_completions(
    proxy: Arc<Proxy>,
    provider: String,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response<Body>> {
    let started = Instant::now();
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or(ProxyError::Unauthorized)?;
    let tenant = proxy.tenants.authenticate(token).await?;
    proxy.limits.check_rate(tenant.instance_id, &tenant.tier)?;
    if body.len() > proxy.max_body {
        return Err(ProxyError::TooLarge(proxy.max_body));
    }
    let mut request: Value = serde_json::from_slice(&body)
        .map_err(|e| ProxyError::BadRequest(format!("the body is not JSON: {e}")))?;
    let model = request
        .get("model")
        .and_then(Value::as_str)
        .filter(|m| !m.is_empty() && m.len() <= 200)
        .ok_or_else(|| ProxyError::BadRequest("`model` must name a model".into()))?
        .to_owned();
    let route = proxy.route(&tenant, &provider)?;
    let priced = format!(
        "{provider}/{}",
        model.trim_start_matches(&format!("{provider}/"))
    );
    let price = proxy.prices.of(&priced).copied();
    let model_label = if price.is_some() {
        priced.clone()
    } else {
        "other".into()
    };
    let stream = request.get("stream").and_then(Value::as_bool) == Some(true);
    let client_wants_usage = request
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        == Some(true);

    let mut pending = Pending {
        tenant: tenant.clone(),
        route: route.clone(),
        model_label,
        price,
        hold: None,
        counted_message: false,
        input_estimate: body.len() as u64,
        started,
    };
    if let Some(limit) = proxy.limits.messages_for(&tenant.tier) {
        proxy
            .limits
            .take_message(tenant.instance_id, tenant.user_id, limit)
            .await?;
        pending.counted_message = true;
    }
    if route.pay_mode == PayMode::Credits {
        let price = price
            .as_ref()
            .ok_or_else(|| ProxyError::ModelNotOffered(priced.clone()))?;
        let asked = ["max_completion_tokens", "max_tokens"]
            .iter()
            .find_map(|k| request.get(*k).and_then(Value::as_u64));
        let input = pending.input_estimate;
        let want = pricing::worst_case(price, proxy.markup, input, asked);
        let min = pricing::charge(
            price,
            proxy.markup,
            Usage {
                input,
                cached_input: 0,
                output: proxy.min_output_tokens,
            },
        );
        let hold = match proxy.ledger.hold(tenant.user_id, want, min).await {
            Ok(h) => h,
            Err(e) => {
                proxy.undo(&pending).await;
                return Err(e);
            }
        };
        if hold.partial {
            let cap = pricing::affordable_output(price, proxy.markup, input, hold.amount);
            let key = if request.get("max_completion_tokens").is_some() {
                "max_completion_tokens"
            } else {
                "max_tokens"
            };
            request[key] = Value::from(cap);
        }
        pending.hold = Some(hold);
        // The platform's upstream names models with their provider.
        request["model"] = Value::from(priced.clone());
    }
    if stream {
        // Always ask for the usage; the scanner drops it again when the
        // client did not.
        match request
            .get_mut("stream_options")
            .and_then(Value::as_object_mut)
        {
            Some(o) => {
                o.insert("include_usage".into(), Value::Bool(true));
            }
            None => request["stream_options"] = serde_json::json!({"include_usage": true}),
        }
    }
    let outgoing = serde_json::to_vec(&request).map_err(ProxyError::internal)?;
    let upstream_req = http::Request::post(format!("{}/chat/completions", route.base_url))
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::AUTHORIZATION, format!("Bearer {}", route.key))
        .body(Full::new(Bytes::from(outgoing)))
        .map_err(ProxyError::internal)?;
    let overhead_before = started.elapsed();
    let answer =
        match tokio::time::timeout(proxy.first_byte_timeout, proxy.client.request(upstream_req))
            .await
        {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => {
                proxy.fail_before_answer(&pending, "connect").await;
                return Err(ProxyError::Upstream(e.to_string()));
            }
            Err(_) => {
                proxy.fail_before_answer(&pending, "timeout").await;
                return Err(ProxyError::Upstream("no answer in time".into()));
            }
        };
    let status = answer.status();
    let content_type = answer.headers().get(header::CONTENT_TYPE).cloned();
    if !status.is_success() {
        // The upstream refused before any model work: nothing is charged;
        // its answer (status, body, Retry-After) goes to the client.
        let retry_after = answer.headers().get(header::RETRY_AFTER).cloned();
        let body = read_whole(answer.into_body()).await.unwrap_or_default();
        proxy
            .fail_before_answer(
                &pending,
                if status.is_server_error() {
                    "5xx"
                } else {
                    "4xx"
                },
            )
            .await;
        let mut r = Response::builder().status(status);
        if let Some(ct) = content_type {
            r = r.header(header::CONTENT_TYPE, ct);
        }
        if let Some(ra) = retry_after {
            r = r.header(header::RETRY_AFTER, ra);
        }
        return r.body(Body::from(body)).map_err(ProxyError::internal);
    }
    if !stream {
        let body = match read_whole(answer.into_body()).await {
            Ok(b) => b,
            Err(e) => {
                // The model worked but its answer was lost on the way:
                // the estimate is charged.
                proxy.settle(pending, None, 0).await;
                return Err(ProxyError::Upstream(e));
            }
        };
        let after = Instant::now();
        let usage = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| sse::usage_of(&v));
        let len = body.len() as u64;
        let overhead = overhead_before + after.elapsed();
        proxy.settle(pending, usage, len).await;
        metrics::histogram!("clawdeploy_llm_overhead_seconds", "kind" => "whole")
            .record(overhead.as_secs_f64());
        let mut r = Response::builder().status(status);
        r = r.header(
            header::CONTENT_TYPE,
            content_type.unwrap_or(HeaderValue::from_static("application/json")),
        );
        return r.body(Body::from(body)).map_err(ProxyError::internal);
    }
    metrics::histogram!("clawdeploy_llm_overhead_seconds", "kind" => "stream")
        .record(overhead_before.as_secs_f64());
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(32);
    let drain = proxy.drain;
    let proxy2 = proxy.clone();
    tokio::spawn(async move {
        let mut scanner = Scanner::new(!client_wants_usage);
        let mut body = answer.into_body();
        let mut client_gone = false;
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            let next = match deadline {
                Some(d) => match tokio::time::timeout_at(d, body.frame()).await {
                    Ok(f) => f,
                    Err(_) => break,
                },
                None => body.frame().await,
            };
            let Some(frame) = next else { break };
            let Ok(frame) = frame else { break };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let out = scanner.feed(data);
            if !client_gone && !out.is_empty() && tx.send(Ok(out)).await.is_err() {
                // The client went away: keep reading (for a while) to
                // learn the usage the upstream will still report.
                client_gone = true;
                deadline = Some(tokio::time::Instant::now() + drain);
                metrics::counter!("clawdeploy_llm_client_disconnects_total").increment(1);
            }
        }
        let rest = scanner.finish();
        if !client_gone && !rest.is_empty() {
            let _ = tx.send(Ok(rest)).await;
        }
        drop(tx);
        proxy2.settle(pending, scanner.usage, scanner.bytes).await;
    });
    let mut r = Response::builder().status(status);
    r = r
        .header(
            header::CONTENT_TYPE,
            content_type.unwrap_or(HeaderValue::from_static("text/event-stream")),
        )
        .header(header::CACHE_CONTROL, "no-cache");
    r.body(Body::from_stream(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    ))
    .map_err(ProxyError::internal)
}

async fn read_whole(body: hyper::body::Incoming) -> Result<Bytes, String> {
    let limited = http_body_util::Limited::new(body, MAX_ANSWER_BYTES);
    limited
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| e.to_string())
}

impl Proxy {
    /// Gives back what a request took before it went anywhere.
    async fn undo(&self, p: &Pending) {
        if let Some(h) = &p.hold {
            self.ledger.settle(h, Micros::ZERO).await;
        }
        if p.counted_message {
            self.limits.give_back_message(p.tenant.instance_id).await;
        }
    }

    /// The upstream failed before answering: nothing is charged, the
    /// hold and the free message go back.
    async fn fail_before_answer(&self, p: &Pending, why: &'static str) {
        metrics::counter!("clawdeploy_llm_upstream_errors_total", "kind" => why).increment(1);
        metrics::counter!(
            "clawdeploy_llm_requests_total",
            "model" => p.model_label.clone(),
            "pay_mode" => p.route.pay_mode.as_str(),
            "result" => "upstream_error"
        )
        .increment(1);
        self.undo(p).await;
    }

    /// Records the request's usage and settles its hold. Without a usage
    /// from the upstream, the estimate is charged: the input from the
    /// request's size, the output from what was passed on (4 bytes a
    /// token), never more than the hold.
    async fn settle(&self, p: Pending, usage: Option<Usage>, answer_bytes: u64) {
        let estimated = usage.is_none();
        let usage = usage.unwrap_or(Usage {
            input: p.input_estimate.div_ceil(4),
            cached_input: 0,
            output: answer_bytes.div_ceil(4),
        });
        let cost = match (&p.price, p.route.pay_mode) {
            (Some(price), PayMode::Credits) => pricing::charge(price, self.markup, usage),
            _ => Micros::ZERO,
        };
        let charged = p.hold.as_ref().map_or(Micros::ZERO, |h| cost.min(h.amount));
        if charged < cost {
            tracing::warn!(instance = %p.tenant.instance_id, %cost, %charged, "usage beyond its hold; charged the hold");
        }
        // The event is recorded before the hold ends, so a lease with no
        // hold has every charge waiting in the flush.
        self.recorder.record(UsageEvent {
            id: Uuid::new_v4(),
            instance_id: p.tenant.instance_id,
            user_id: p.tenant.user_id,
            model: p.model_label.clone(),
            pay_mode: p.route.pay_mode,
            input_tokens: usage.input,
            cached_input_tokens: usage.cached_input,
            output_tokens: usage.output,
            charged,
            estimated,
            lease_id: p.hold.as_ref().map(|h| h.lease_id),
            at: chrono::Utc::now(),
        });
        if let Some(h) = &p.hold {
            self.ledger.settle(h, charged).await;
        }
        metrics::counter!(
            "clawdeploy_llm_requests_total",
            "model" => p.model_label,
            "pay_mode" => p.route.pay_mode.as_str(),
            "result" => if estimated { "estimated" } else { "ok" }
        )
        .increment(1);
        metrics::counter!("clawdeploy_llm_charged_micros_total").increment(charged.0);
        metrics::histogram!("clawdeploy_llm_request_seconds")
            .record(p.started.elapsed().as_secs_f64());
    }
}

/// How long a request may wait for the upstream's answer to begin.
pub const DEFAULT_FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(120);
