//! `POST /v1/chat/completions` on the gateway, as OpenClaw's
//! OpenAI-compatible endpoint does it: the model names a provider of the
//! live config (`openai/gpt-4o` → `models.providers.openai`), and the
//! request goes to that provider's `baseUrl` with its `apiKey`, the model
//! named without its provider. The provider's answer (a whole one, or a
//! stream) is relayed as it arrives. Plain HTTP only: the stand-in talks
//! to the metering proxy or a local upstream, never to the internet.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;

use serde_json::{json, Value};

#[derive(Clone, Debug)]
pub struct Endpoint {
    pub base_url: String,
    pub api_key: String,
}

/// The providers of `config` that name a `baseUrl` and an `apiKey`.
pub fn endpoints_of(config: &Value) -> HashMap<String, Endpoint> {
    config
        .pointer("/models/providers")
        .and_then(Value::as_object)
        .map(|p| {
            p.iter()
                .filter_map(|(name, v)| {
                    let base_url = v.get("baseUrl")?.as_str()?.to_owned();
                    let api_key = v.get("apiKey")?.as_str()?.to_owned();
                    Some((name.clone(), Endpoint { base_url, api_key }))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn refuse(writer: &mut TcpStream, status: &str, code: &str, message: &str) -> std::io::Result<()> {
    let body = json!({"error": {"code": code, "message": message}}).to_string();
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    writer.write_all(head.as_bytes())?;
    writer.write_all(body.as_bytes())
}

/// Answers one chat completion by calling its provider; the connection
/// closes after it.
pub fn complete(
    endpoints: &HashMap<String, Endpoint>,
    default_model: Option<&str>,
    body: &[u8],
    writer: &mut TcpStream,
) -> std::io::Result<()> {
    let Ok(mut request) = serde_json::from_slice::<Value>(body) else {
        return refuse(
            writer,
            "400 Bad Request",
            "bad_request",
            "the body is not JSON",
        );
    };
    let model = request
        .get("model")
        .and_then(Value::as_str)
        .or(default_model)
        .unwrap_or_default()
        .to_owned();
    let Some((provider, name)) = model.split_once('/') else {
        return refuse(
            writer,
            "400 Bad Request",
            "bad_request",
            "model must be provider/model",
        );
    };
    let Some(endpoint) = endpoints.get(provider) else {
        return refuse(
            writer,
            "404 Not Found",
            "unknown_provider",
            "no such provider in the config",
        );
    };
    let Some((host, path)) = endpoint
        .base_url
        .strip_prefix("http://")
        .map(|rest| rest.split_once('/').map_or((rest, ""), |(h, p)| (h, p)))
    else {
        return refuse(
            writer,
            "502 Bad Gateway",
            "unsupported_url",
            "the stand-in calls http:// providers only",
        );
    };
    request["model"] = Value::from(name);
    let out = request.to_string();
    let mut upstream = match TcpStream::connect(host) {
        Ok(s) => s,
        Err(e) => {
            return refuse(
                writer,
                "502 Bad Gateway",
                "provider_unreachable",
                &e.to_string(),
            )
        }
    };
    upstream.set_nodelay(true)?;
    let head = format!(
        "POST /{}/chat/completions HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        path.trim_end_matches('/'),
        endpoint.api_key,
        out.len()
    );
    upstream.write_all(head.as_bytes())?;
    upstream.write_all(out.as_bytes())?;
    let mut reader = BufReader::new(upstream);
    // The head, with `connection: close` for ours (we close after).
    let mut relayed = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if line.trim_end().is_empty() {
            relayed.push_str("connection: close\r\n\r\n");
            break;
        }
        if !line.to_ascii_lowercase().starts_with("connection:") {
            relayed.push_str(&line);
        }
    }
    writer.write_all(relayed.as_bytes())?;
    // The body as it comes (chunked framing and all).
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        writer.write_all(&buf[..n])?;
    }
}
