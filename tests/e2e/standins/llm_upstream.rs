//! A local stand-in for an OpenAI-compatible model provider, for the tests
//! and `scripts/run-local` (the upstream of the metering proxy to come):
//! `GET /v1/models` and `POST /v1/chat/completions`, whole or streamed as
//! OpenAI streams (server-sent `chat.completion.chunk`s, tool calls as
//! deltas of their arguments, the usage in a last chunk with no choices
//! when `stream_options.include_usage` asks for it, then `[DONE]`).
//! Answers are deterministic, so a test can predict every byte: the reply
//! echoes the last user message; with `tools`, it calls the first tool.
//! Tokens are counted as whitespace-separated words.
//!
//! Faults, as the real providers have them, are switched on by
//! `POST /_test/faults {"kind": …, "count": n, "latencyMs": ms}`:
//! `rate_limited` (429 with `Retry-After`), `server_error` (500),
//! `drop` (the stream stops midway, without `[DONE]`), `no_usage` (no
//! usage chunk even when asked); `latencyMs` delays the first byte of
//! every answer. `GET /_test/requests` lists the bodies received,
//! `GET /_test/responses` the streams sent (byte for byte).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Parser;
use serde_json::{json, Value};

#[derive(Parser)]
struct Args {
    #[arg(long, env = "LLM_STANDIN_LISTEN", default_value = "127.0.0.1:12112")]
    listen: SocketAddr,
    /// The key clients must present (`Authorization: Bearer …`).
    #[arg(long, env = "LLM_STANDIN_API_KEY", hide_env_values = true)]
    api_key: String,
    /// The models offered, comma-separated.
    #[arg(
        long,
        env = "LLM_STANDIN_MODELS",
        value_delimiter = ',',
        default_value = "gpt-4o-mini,gpt-4o"
    )]
    models: Vec<String>,
}

/// A fault armed for the next `count` requests.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fault {
    RateLimited,
    ServerError,
    Drop,
    NoUsage,
}

#[derive(Default)]
struct Faults {
    queue: VecDeque<Fault>,
    latency: Duration,
}

struct Stand {
    args: Args,
    faults: Mutex<Faults>,
    received: Mutex<Vec<Value>>,
    /// Each streamed answer's bytes as sent, by completion id.
    sent: Mutex<Vec<(String, String)>>,
}

type Shared = Arc<Stand>;

fn error(status: StatusCode, kind: &str, code: &str, message: &str) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    (status, Json(body)).into_response()
}

fn authorized(s: &Stand, headers: &HeaderMap) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|k| k == s.args.api_key)
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

async fn models(State(s): State<Shared>, headers: HeaderMap) -> Response {
    if !authorized(&s, &headers) {
        return error(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            "Incorrect API key provided.",
        );
    }
    let data: Vec<Value> = s
        .args
        .models
        .iter()
        .map(|m| json!({"id": m, "object": "model", "created": 1_700_000_000, "owned_by": "standin"}))
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

/// Words, as this stand-in counts tokens.
fn tokens(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

/// What the model answers to `req`: pieces of content or of a tool call's
/// arguments, the tool call's id and name if any, the finish reason, and
/// the usage.
struct Answer {
    pieces: Vec<String>,
    tool: Option<(String, String)>,
    finish: &'static str,
    prompt_tokens: u64,
    completion_tokens: u64,
}

fn answer(req: &Value) -> Answer {
    let messages = req["messages"].as_array().cloned().unwrap_or_default();
    let prompt_tokens = messages
        .iter()
        .map(|m| tokens(m["content"].as_str().unwrap_or_default()))
        .sum();
    let cap = req["max_completion_tokens"]
        .as_u64()
        .or_else(|| req["max_tokens"].as_u64())
        .unwrap_or(u64::MAX);
    if let Some(tool) = req["tools"].as_array().and_then(|t| t.first()) {
        let name = tool["function"]["name"]
            .as_str()
            .unwrap_or("tool")
            .to_owned();
        let pieces = [
            "{\"location\"",
            ": \"Paris",
            "\", \"unit\"",
            ": \"celsius\"}",
        ]
        .map(String::from)
        .to_vec();
        return Answer {
            completion_tokens: tokens(&pieces.concat()),
            pieces,
            tool: Some(("call_standin_1".into(), name)),
            finish: "tool_calls",
            prompt_tokens,
        };
    }
    let last = messages
        .iter()
        .rev()
        .find(|m| m["role"] == "user")
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default();
    let words: Vec<&str> = std::iter::once("echo:")
        .chain(last.split_whitespace())
        .collect();
    let kept = words.len().min(usize::try_from(cap).unwrap_or(usize::MAX));
    let pieces: Vec<String> = words[..kept]
        .iter()
        .enumerate()
        .map(|(i, w)| {
            if i == 0 {
                (*w).to_owned()
            } else {
                format!(" {w}")
            }
        })
        .collect();
    Answer {
        completion_tokens: kept as u64,
        pieces,
        tool: None,
        finish: if kept < words.len() { "length" } else { "stop" },
        prompt_tokens,
    }
}

fn usage(a: &Answer) -> Value {
    json!({"prompt_tokens": a.prompt_tokens, "completion_tokens": a.completion_tokens,
           "total_tokens": a.prompt_tokens + a.completion_tokens})
}

async fn completions(State(s): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    if !authorized(&s, &headers) {
        return error(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            "Incorrect API key provided.",
        );
    }
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_json",
            "We could not parse the JSON body of your request.",
        );
    };
    s.received.lock().unwrap().push(req.clone());
    let model = req["model"].as_str().unwrap_or_default().to_owned();
    if !s.args.models.contains(&model) {
        return error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            &format!("The model `{model}` does not exist."),
        );
    }
    let (fault, latency) = {
        let mut f = s.faults.lock().unwrap();
        (f.queue.pop_front(), f.latency)
    };
    tokio::time::sleep(latency).await;
    match fault {
        Some(Fault::RateLimited) => {
            let mut r = error(
                StatusCode::TOO_MANY_REQUESTS,
                "requests",
                "rate_limit_exceeded",
                "Rate limit reached for requests.",
            );
            r.headers_mut().insert(header::RETRY_AFTER, 1.into());
            return r;
        }
        Some(Fault::ServerError) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "server_error",
                "The server had an error while processing your request.",
            );
        }
        _ => {}
    }
    let a = answer(&req);
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    if req["stream"] != true {
        let message = match &a.tool {
            Some((call, name)) => json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": call, "type": "function", "function": {"name": name, "arguments": a.pieces.concat()}}]}),
            None => json!({"role": "assistant", "content": a.pieces.concat()}),
        };
        return Json(json!({"id": id, "object": "chat.completion", "created": now(), "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": a.finish}], "usage": usage(&a)}))
        .into_response();
    }
    let include_usage =
        req["stream_options"]["include_usage"] == true && fault != Some(Fault::NoUsage);
    let chunk = |delta: Value, finish: Option<&str>| {
        let mut c = json!({"id": id, "object": "chat.completion.chunk", "created": now(), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        if include_usage {
            c["usage"] = Value::Null;
        }
        format!("data: {c}\n\n")
    };
    let mut events = vec![chunk(
        json!({"role": "assistant", "content": if a.tool.is_some() { Value::Null } else { json!("") }}),
        None,
    )];
    for (i, piece) in a.pieces.iter().enumerate() {
        let delta = match &a.tool {
            Some((call, name)) if i == 0 => {
                json!({"tool_calls": [{"index": 0, "id": call, "type": "function",
                "function": {"name": name, "arguments": piece}}]})
            }
            Some(_) => json!({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}),
            None => json!({"content": piece}),
        };
        events.push(chunk(delta, None));
    }
    events.push(chunk(json!({}), Some(a.finish)));
    if include_usage {
        let c = json!({"id": id, "object": "chat.completion.chunk", "created": now(), "model": model,
            "choices": [], "usage": usage(&a)});
        events.push(format!("data: {c}\n\n"));
    }
    events.push("data: [DONE]\n\n".into());
    if fault == Some(Fault::Drop) {
        events.truncate(events.len() / 2);
    }
    s.sent.lock().unwrap().push((id.clone(), events.concat()));
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::spawn(async move {
        for e in events {
            if tx.send(Ok(Bytes::from(e))).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

/// Arms `count` (1 when absent) faults of `kind`, and sets the latency of
/// every answer when `latencyMs` is given.
async fn set_faults(State(s): State<Shared>, Json(body): Json<Value>) -> Response {
    let kind = match body["kind"].as_str() {
        Some("rate_limited") => Some(Fault::RateLimited),
        Some("server_error") => Some(Fault::ServerError),
        Some("drop") => Some(Fault::Drop),
        Some("no_usage") => Some(Fault::NoUsage),
        None => None,
        Some(other) => {
            return (StatusCode::BAD_REQUEST, format!("unknown fault {other}")).into_response()
        }
    };
    let mut f = s.faults.lock().unwrap();
    if let Some(kind) = kind {
        let count = body["count"].as_u64().unwrap_or(1) as usize;
        f.queue.extend(std::iter::repeat_n(kind, count));
    }
    if let Some(ms) = body["latencyMs"].as_u64() {
        f.latency = Duration::from_millis(ms);
    }
    StatusCode::NO_CONTENT.into_response()
}

async fn requests(State(s): State<Shared>) -> Json<Vec<Value>> {
    Json(s.received.lock().unwrap().clone())
}

/// The streams sent, as `{id, body}`, oldest first.
async fn responses(State(s): State<Shared>) -> Json<Vec<Value>> {
    let sent = s.sent.lock().unwrap();
    Json(
        sent.iter()
            .map(|(id, body)| json!({"id": id, "body": body}))
            .collect(),
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    let stand = Arc::new(Stand {
        args,
        faults: Mutex::default(),
        received: Mutex::default(),
        sent: Mutex::default(),
    });
    let app = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(completions))
        .route("/_test/faults", post(set_faults))
        .route("/_test/requests", get(requests))
        .route("/_test/responses", get(responses))
        .with_state(stand);
    eprintln!("OpenAI-compatible stand-in listening on http://{addr}");
    // Streams flush each chunk at once, as the providers' servers do.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app).await?;
    Ok(())
}
