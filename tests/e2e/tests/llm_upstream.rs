//! The OpenAI-compatible upstream stand-in (`standins/llm_upstream.rs`)
//! answers as OpenAI's API does, so that the metering proxy is tested
//! against what the real providers send: whole and streamed completions,
//! tool calls as argument deltas, the usage in a last chunk only when
//! asked for, and the faults (429 with `Retry-After`, 500, a dropped
//! stream, a missing usage chunk, latency) switched on by the test.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clawdeploy_e2e::{bin_dir, free_addr, wait_for};
use serde_json::{json, Value};

const KEY: &str = "sk-upstream-test";

struct Standin(Child, String);

impl Drop for Standin {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn start() -> Result<Standin> {
    let addr = free_addr();
    let child = Command::new(bin_dir().join("clawdeploy-llm-standin"))
        .args(["--listen", &addr.to_string(), "--api-key", KEY])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the upstream stand-in")?;
    let s = Standin(child, format!("http://{addr}"));
    wait_for(Duration::from_secs(10), "the stand-in up", || async {
        Ok(reqwest::get(format!("{}/v1/models", s.1)).await.is_ok())
    })
    .await?;
    Ok(s)
}

/// A completion request: its status, headers and whole body.
async fn complete(s: &Standin, body: Value) -> Result<(u16, reqwest::header::HeaderMap, String)> {
    let r = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", s.1))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await?;
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    Ok((status, headers, r.text().await?))
}

/// The JSON events of a server-sent stream, and whether it ended with
/// `[DONE]`.
fn events(text: &str) -> Result<(Vec<Value>, bool)> {
    let mut out = Vec::new();
    let mut done = false;
    for block in text.split("\n\n").filter(|b| !b.is_empty()) {
        let data = block.strip_prefix("data: ").context("an SSE data line")?;
        if data == "[DONE]" {
            done = true;
        } else {
            out.push(serde_json::from_str(data)?);
        }
    }
    Ok((out, done))
}

async fn fault(s: &Standin, body: Value) -> Result<()> {
    let r = reqwest::Client::new()
        .post(format!("{}/_test/faults", s.1))
        .json(&body)
        .send()
        .await?;
    anyhow::ensure!(r.status() == 204, "{}", r.status());
    Ok(())
}

#[tokio::test]
async fn completions_stream_and_fail_as_openais_do() -> Result<()> {
    let s = start().await?;
    let hello = json!({"model": "gpt-4o-mini", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello there world"}]});

    // The key is checked; the models are listed.
    let r = reqwest::Client::new()
        .get(format!("{}/v1/models", s.1))
        .bearer_auth("sk-wrong")
        .send()
        .await?;
    assert_eq!(r.status(), 401);
    let models: Value = reqwest::Client::new()
        .get(format!("{}/v1/models", s.1))
        .bearer_auth(KEY)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(models["data"][0]["id"], "gpt-4o-mini");

    // Whole: the echo, with its usage (tokens are words).
    let (status, _, body) = complete(&s, hello.clone()).await?;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body)?;
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "echo: hello there world"
    );
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9})
    );

    // Streamed: the same text in deltas; the usage only when asked, in a
    // last chunk without choices.
    let mut streamed = hello.clone();
    streamed["stream"] = json!(true);
    let (_, headers, body) = complete(&s, streamed.clone()).await?;
    assert_eq!(headers["content-type"], "text/event-stream");
    let (chunks, done) = events(&body)?;
    assert!(done);
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "echo: hello there world");
    assert!(chunks.iter().all(|c| c.get("usage").is_none()));
    streamed["stream_options"] = json!({"include_usage": true});
    let (_, _, body) = complete(&s, streamed.clone()).await?;
    let (chunks, _) = events(&body)?;
    let last = chunks.last().context("chunks")?;
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["total_tokens"], 9);
    assert!(chunks[..chunks.len() - 1]
        .iter()
        .all(|c| c["usage"].is_null()));

    // A tool call: its arguments in deltas, whole JSON once joined.
    let mut tools = streamed.clone();
    tools["tools"] =
        json!([{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]);
    let (_, _, body) = complete(&s, tools).await?;
    let (chunks, _) = events(&body)?;
    let calls: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"].get(0))
        .collect();
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    assert_eq!(calls[0]["id"], "call_standin_1");
    let args: String = calls
        .iter()
        .filter_map(|c| c["function"]["arguments"].as_str())
        .collect();
    assert_eq!(serde_json::from_str::<Value>(&args)?["location"], "Paris");
    assert!(chunks
        .iter()
        .any(|c| c["choices"][0]["finish_reason"] == "tool_calls"));

    // An output cap: cut, with `length`.
    let mut capped = hello.clone();
    capped["max_tokens"] = json!(2);
    let (_, _, body) = complete(&s, capped).await?;
    let v: Value = serde_json::from_str(&body)?;
    assert_eq!(v["choices"][0]["message"]["content"], "echo: hello");
    assert_eq!(v["choices"][0]["finish_reason"], "length");

    // Faults, each for one request.
    fault(&s, json!({"kind": "rate_limited"})).await?;
    let (status, headers, body) = complete(&s, hello.clone()).await?;
    assert_eq!(status, 429, "{body}");
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(
        serde_json::from_str::<Value>(&body)?["error"]["code"],
        "rate_limit_exceeded"
    );
    fault(&s, json!({"kind": "server_error"})).await?;
    assert_eq!(complete(&s, hello.clone()).await?.0, 500);
    assert_eq!(
        complete(&s, hello.clone()).await?.0,
        200,
        "one request each"
    );
    fault(&s, json!({"kind": "drop"})).await?;
    let (_, _, body) = complete(&s, streamed.clone()).await?;
    assert!(!events(&body)?.1, "a dropped stream has no [DONE]");
    fault(&s, json!({"kind": "no_usage"})).await?;
    let (_, _, body) = complete(&s, streamed.clone()).await?;
    let (chunks, done) = events(&body)?;
    assert!(done && chunks.iter().all(|c| c["usage"].is_null()));
    fault(&s, json!({"latencyMs": 300})).await?;
    let started = Instant::now();
    complete(&s, hello.clone()).await?;
    assert!(started.elapsed() >= Duration::from_millis(300));

    // What was asked is kept for the test to read.
    let received: Vec<Value> = reqwest::get(format!("{}/_test/requests", s.1))
        .await?
        .json()
        .await?;
    assert_eq!(received[0]["messages"][1]["content"], "hello there world");
    Ok(())
}
