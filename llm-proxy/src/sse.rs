//! Reading usage out of what the upstream sends. A whole answer carries it
//! in its `usage` object; a stream in its last chunk (asked for with
//! `stream_options.include_usage`). The scanner passes a stream through
//! untouched, looking only at lines that carry a usage object, or, when
//! the client did not ask for usage (the proxy always does), passes whole
//! events and drops the one that only carries the usage.

use bytes::{Bytes, BytesMut};
use serde_json::Value;

use crate::prices::Usage;

/// The usage of an OpenAI-style answer or chunk, if it has one.
pub fn usage_of(v: &Value) -> Option<Usage> {
    let u = v.get("usage").filter(|u| u.is_object())?;
    let n = |p: &str| u.pointer(p).and_then(Value::as_u64).unwrap_or(0);
    Some(Usage {
        input: n("/prompt_tokens"),
        cached_input: n("/prompt_tokens_details/cached_tokens"),
        output: n("/completion_tokens"),
    })
}

/// Whether `data` (an event's data, JSON) mentions a non-null usage:
/// cheap enough to run on every line; only then is the JSON parsed.
fn mentions_usage(data: &[u8]) -> bool {
    const KEY: &[u8] = b"\"usage\"";
    let mut rest = data;
    while let Some(at) = rest.windows(KEY.len()).position(|w| w == KEY) {
        let after = &rest[at + KEY.len()..];
        let value = after
            .iter()
            .position(|b| !matches!(b, b' ' | b'\t' | b':'))
            .map(|i| after[i]);
        if value == Some(b'{') {
            return true;
        }
        rest = after;
    }
    false
}

/// Follows one stream.
pub struct Scanner {
    /// Drop the usage-only event (the client did not ask for it).
    strip_usage: bool,
    /// Bytes of the current, unfinished line (or event, when stripping).
    pending: BytesMut,
    pub usage: Option<Usage>,
    /// Bytes passed on so far (for an estimate when usage never comes).
    pub bytes: u64,
}

impl Scanner {
    pub fn new(strip_usage: bool) -> Self {
        Self {
            strip_usage,
            pending: BytesMut::new(),
            usage: None,
            bytes: 0,
        }
    }

    /// Takes the next piece of the stream; returns what to pass on.
    pub fn feed(&mut self, chunk: Bytes) -> Bytes {
        self.bytes += chunk.len() as u64;
        if self.strip_usage {
            return self.feed_events(&chunk);
        }
        self.pending.extend_from_slice(&chunk);
        while let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
            let line = self.pending.split_to(end + 1);
            self.look(&line);
        }
        chunk
    }

    /// The rest, at the end of the stream.
    pub fn finish(&mut self) -> Bytes {
        let rest = self.pending.split().freeze();
        if self.strip_usage {
            if self.look(&rest) {
                return Bytes::new();
            }
            return rest;
        }
        self.look(&rest);
        Bytes::new()
    }

    fn feed_events(&mut self, chunk: &[u8]) -> Bytes {
        self.pending.extend_from_slice(chunk);
        let mut out = BytesMut::new();
        while let Some(end) = event_end(&self.pending) {
            let event = self.pending.split_to(end);
            if !self.look(&event) {
                out.extend_from_slice(&event);
            }
        }
        out.freeze()
    }

    /// Reads the usage out of `text` (a line or an event) if it has one;
    /// true when it is a usage-only chunk (no choices to show).
    fn look(&mut self, text: &[u8]) -> bool {
        let mut usage_only = false;
        for line in text.split(|b| *b == b'\n') {
            let Some(data) = line.strip_prefix(b"data:") else {
                continue;
            };
            if !mentions_usage(data) {
                continue;
            }
            if let Ok(v) = serde_json::from_slice::<Value>(data.trim_ascii()) {
                if let Some(u) = usage_of(&v) {
                    self.usage = Some(u);
                    usage_only = v
                        .get("choices")
                        .and_then(Value::as_array)
                        .is_none_or(|c| c.is_empty());
                }
            }
        }
        usage_only
    }
}

/// Where the first complete event of `buf` ends (after its blank line).
fn event_end(buf: &[u8]) -> Option<usize> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = concat!(
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"usage\\\": 1}\"}}]}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":5,\"prompt_tokens_details\":{\"cached_tokens\":4}}}\n\n",
        "data: [DONE]\n\n",
    );

    fn run(strip: bool, piece: usize) -> (Vec<u8>, Scanner) {
        let mut s = Scanner::new(strip);
        let mut out = Vec::new();
        for chunk in STREAM.as_bytes().chunks(piece) {
            out.extend_from_slice(&s.feed(Bytes::copy_from_slice(chunk)));
        }
        out.extend_from_slice(&s.finish());
        (out, s)
    }

    #[test]
    fn a_stream_passes_untouched_and_its_last_chunk_tells_the_usage() {
        for piece in [1, 7, 64, STREAM.len()] {
            let (out, s) = run(false, piece);
            assert_eq!(out, STREAM.as_bytes(), "piece {piece}");
            let want = Usage {
                input: 12,
                cached_input: 4,
                output: 5,
            };
            assert_eq!(s.usage, Some(want), "piece {piece}");
            assert_eq!(s.bytes, STREAM.len() as u64);
        }
    }

    #[test]
    fn the_usage_chunk_is_dropped_when_the_client_did_not_ask_for_it() {
        for piece in [1, 5, STREAM.len()] {
            let (out, s) = run(true, piece);
            let out = String::from_utf8(out).unwrap();
            assert!(!out.contains("prompt_tokens"), "{out}");
            assert!(
                out.contains("tool_calls") && out.ends_with("data: [DONE]\n\n"),
                "{out}"
            );
            assert_eq!(s.usage.map(|u| u.output), Some(5));
        }
    }

    #[test]
    fn a_whole_answer_has_its_usage_and_null_is_none() {
        let v: Value =
            serde_json::from_str(r#"{"usage":{"prompt_tokens":3,"completion_tokens":2}}"#).unwrap();
        assert_eq!(
            usage_of(&v),
            Some(Usage {
                input: 3,
                cached_input: 0,
                output: 2
            })
        );
        assert_eq!(usage_of(&serde_json::json!({"usage": null})), None);
        assert!(!mentions_usage(br#"{"usage":null}"#));
        assert!(mentions_usage(br#"{"usage" : {"a":1}}"#));
    }
}
