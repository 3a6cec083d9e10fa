//! OpenClaw gateway stand-in: reproduces the container contract in docs/architecture.md
//! (port 18789, `/healthz`, `/readyz`, token-authenticated `/v1/models` that
//! reflects the live `openclaw.json`, a token-gated echo WebSocket, and config
//! hot reload) with nothing but std, so it links statically into a `FROM
//! scratch` image. For proxy tests it also streams server-sent events
//! (`/v1/events`) and reports what a request carried (`POST /v1/echo`).
//!
//! One thread per connection keeps it simple; the stand-in serves tests and
//! benchmarks, not customers.

mod chat;

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

/// The config as last applied, plus what the HTTP API shows of it.
#[derive(Default)]
struct Applied {
    providers: Vec<String>,
    /// Each provider's `baseUrl` and `apiKey`, for chat completions.
    endpoints: std::collections::HashMap<String, chat::Endpoint>,
    default_model: Option<String>,
    reloads: u64,
}

struct Gateway {
    token: String,
    config_path: PathBuf,
    applied: RwLock<Applied>,
    started: Instant,
}

fn main() {
    sigterm::exit_on_term();
    let port: u16 = arg_value("--port")
        .and_then(|p| p.parse().ok())
        .unwrap_or(18789);
    let state_dir =
        std::env::var("OPENCLAW_STATE_DIR").unwrap_or_else(|_| "/home/node/.openclaw".into());
    let token = std::env::var("OPENCLAW_GATEWAY_TOKEN").unwrap_or_default();
    if token.is_empty() {
        eprintln!("openclaw-standin: OPENCLAW_GATEWAY_TOKEN is not set; refusing to start");
        std::process::exit(2);
    }
    let gateway = Arc::new(Gateway {
        token,
        config_path: PathBuf::from(state_dir).join("openclaw.json"),
        applied: RwLock::new(Applied::default()),
        started: Instant::now(),
    });
    reload_if_changed(&gateway, &mut None);
    {
        let gateway = gateway.clone();
        std::thread::spawn(move || watch_config(&gateway));
    }
    let listener = TcpListener::bind(("0.0.0.0", port)).unwrap_or_else(|e| {
        eprintln!("openclaw-standin: bind :{port}: {e}");
        std::process::exit(1);
    });
    eprintln!("openclaw-standin: gateway listening on :{port}");
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let gateway = gateway.clone();
        std::thread::spawn(move || {
            let _ = serve_connection(&gateway, stream);
        });
    }
}

fn arg_value(name: &str) -> Option<String> {
    let mut args = std::env::args().skip_while(|a| a != name);
    args.next()?;
    args.next()
}

/// Hot reload, as the real gateway does it: an inotify watch on the state
/// directory wakes the reloader when a file is written or renamed into it
/// (writers replace the config atomically). A slow poll is the backstop
/// should inotify be unavailable. Polling fast instead would cost every
/// idle container CPU (each path lookup crosses the container's root
/// filesystem).
fn watch_config(gateway: &Gateway) {
    let mut last = None;
    let dir = gateway
        .config_path
        .parent()
        .unwrap_or(std::path::Path::new("/"));
    match inotify::watch_dir(dir) {
        Ok(mut events) => {
            // A config written after the start-up read but before the
            // watch existed raised no event: look once now.
            reload_if_changed(gateway, &mut last);
            let mut buf = [0u8; 4096];
            loop {
                match events.read(&mut buf) {
                    // Which file changed does not matter: the reload
                    // compares the config file's identity itself.
                    Ok(n) if n > 0 => reload_if_changed(gateway, &mut last),
                    Ok(_) => break,
                    Err(e) => {
                        eprintln!("openclaw-standin: inotify read failed ({e}); polling instead");
                        break;
                    }
                }
            }
        }
        Err(e) => eprintln!("openclaw-standin: inotify unavailable ({e}); polling instead"),
    }
    loop {
        reload_if_changed(gateway, &mut last);
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Exits at once on SIGTERM, as a gateway shutting down cleanly does: as
/// PID 1 of its container the process would otherwise ignore the signal
/// and `docker stop` would wait its whole timeout before killing it.
#[allow(unsafe_code)]
mod sigterm {
    const SIGTERM: i32 = 15;

    extern "C" {
        fn signal(signum: i32, handler: extern "C" fn(i32)) -> usize;
        fn _exit(status: i32) -> !;
    }

    extern "C" fn on_term(_: i32) {
        // Only async-signal-safe calls here.
        unsafe { _exit(0) }
    }

    pub fn exit_on_term() {
        unsafe {
            signal(SIGTERM, on_term);
        }
    }
}

/// The two inotify calls the stand-in needs, declared against the C library
/// it links statically.
#[allow(unsafe_code)]
mod inotify {
    use std::ffi::CString;
    use std::fs::File;
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;

    extern "C" {
        fn inotify_init1(flags: i32) -> i32;
        fn inotify_add_watch(fd: i32, path: *const std::ffi::c_char, mask: u32) -> i32;
    }

    const IN_CLOEXEC: i32 = 0o2_000_000;
    const IN_MODIFY: u32 = 0x002;
    const IN_CLOSE_WRITE: u32 = 0x008;
    const IN_MOVED_TO: u32 = 0x080;
    const IN_CREATE: u32 = 0x100;
    const IN_DELETE: u32 = 0x200;

    /// A blocking stream of inotify events for `dir`: each read returns
    /// once something in it changed.
    pub fn watch_dir(dir: &Path) -> std::io::Result<File> {
        let path = CString::new(dir.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
        // SAFETY: plain syscall wrappers; the returned descriptor is owned
        // by the File from here on, and `path` outlives the call.
        let fd = unsafe { inotify_init1(IN_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let file = unsafe { File::from_raw_fd(fd) };
        let mask = IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE | IN_DELETE;
        if unsafe { inotify_add_watch(fd, path.as_ptr(), mask) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(file)
    }
}

type FileStamp = (SystemTime, u64, u64);

fn file_stamp(path: &std::path::Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.ino(), meta.len()))
}

fn reload_if_changed(gateway: &Gateway, last: &mut Option<FileStamp>) {
    let stamp = file_stamp(&gateway.config_path);
    if stamp == *last {
        return;
    }
    let Ok(text) = std::fs::read_to_string(&gateway.config_path) else {
        *last = stamp;
        return;
    };
    match serde_json::from_str::<Value>(&text) {
        Ok(config) => {
            let mut providers: Vec<String> = config
                .pointer("/models/providers")
                .and_then(Value::as_object)
                .map(|p| {
                    p.iter()
                        .filter(|(_, v)| {
                            v.get("apiKey")
                                .and_then(Value::as_str)
                                .is_some_and(|k| !k.is_empty())
                        })
                        .map(|(name, _)| name.clone())
                        .collect()
                })
                .unwrap_or_default();
            providers.sort();
            let endpoints = chat::endpoints_of(&config);
            let default_model = config
                .pointer("/agents/defaults/model/primary")
                .and_then(Value::as_str)
                .map(str::to_owned);
            let mut applied = gateway.applied.write().unwrap();
            applied.providers = providers;
            applied.endpoints = endpoints;
            applied.default_model = default_model;
            applied.reloads += 1;
            eprintln!(
                "openclaw-standin: config applied ({} providers)",
                applied.providers.len()
            );
            *last = stamp;
        }
        // A half-written file (a writer that does not rename): keep the old
        // config and look again on the next tick.
        Err(e) => eprintln!("openclaw-standin: config not applied: {e}"),
    }
}

/// A tiny catalogue so `/v1/models` looks like the real thing.
fn models_of(provider: &str) -> Vec<String> {
    match provider {
        "openai" => vec!["gpt-4o".into(), "gpt-4o-mini".into()],
        "anthropic" => vec!["claude-sonnet-4".into(), "claude-haiku-4".into()],
        "google" => vec!["gemini-2.5-pro".into()],
        other => vec![format!("{other}-default")],
    }
}

struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    /// How many body bytes arrived.
    body_bytes: u64,
    /// The body, when it came with a length of at most `KEPT_BODY` (a
    /// chat completion); larger ones are read and dropped.
    body: Vec<u8>,
}

const KEPT_BODY: u64 = 4 << 20;

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn read_request(reader: &mut BufReader<TcpStream>) -> std::io::Result<Option<Request>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let path = parts.next().unwrap_or_default().to_owned();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 {
            return Ok(None);
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    let mut req = Request {
        method,
        path,
        headers,
        body_bytes: 0,
        body: Vec::new(),
    };
    // Drain any request body so keep-alive stays in step.
    if req
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        req.body_bytes = drain_chunked(reader)?;
    } else if let Some(len) = req
        .header("content-length")
        .and_then(|v| v.parse::<u64>().ok())
    {
        req.body_bytes = if len <= KEPT_BODY {
            reader.by_ref().take(len).read_to_end(&mut req.body)? as u64
        } else {
            std::io::copy(&mut reader.by_ref().take(len), &mut std::io::sink())?
        };
    }
    Ok(Some(req))
}

/// Reads a chunked body (RFC 9112 §7.1) to its end; returns its length.
fn drain_chunked(reader: &mut BufReader<TcpStream>) -> std::io::Result<u64> {
    let mut total = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let size = line.trim().split(';').next().unwrap_or_default();
        let size = u64::from_str_radix(size, 16)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "bad chunk size"))?;
        if size == 0 {
            // Trailers, then the empty line.
            loop {
                let mut t = String::new();
                if reader.read_line(&mut t)? == 0 || t.trim_end().is_empty() {
                    return Ok(total);
                }
            }
        }
        total += std::io::copy(&mut reader.by_ref().take(size), &mut std::io::sink())?;
        let mut crlf = String::new();
        reader.read_line(&mut crlf)?;
    }
}

/// `GET /v1/events?n=&interval_ms=`: server-sent events, one chunk each,
/// spaced out, so a test sees whether a proxy passes them on as they come.
fn serve_events(req: &Request, writer: &mut TcpStream) -> std::io::Result<()> {
    let query = req.path.split_once('?').map_or("", |(_, q)| q);
    let param = |name: &str, default: u64| {
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == name)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(default)
    };
    let (n, interval) = (param("n", 3), param("interval_ms", 200));
    write!(
        writer,
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
    )?;
    writer.flush()?;
    for i in 0..n {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(interval));
        }
        let event = format!("id: {i}\ndata: {{\"seq\":{i}}}\n\n");
        writer.write_all(format!("{:x}\r\n{event}\r\n", event.len()).as_bytes())?;
    }
    writer.write_all(b"0\r\n\r\n")?;
    writer.flush()
}

fn serve_connection(gateway: &Gateway, stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    while let Some(req) = read_request(&mut reader)? {
        let close = req
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        if req
            .header("upgrade")
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
        {
            return serve_websocket(gateway, &req, reader, writer);
        }
        if req.path.starts_with("/v1/events") && authorized(gateway, &req) {
            serve_events(&req, &mut writer)?;
            continue;
        }
        if req.method == "POST" && req.path == "/v1/chat/completions" && authorized(gateway, &req) {
            let endpoints = gateway.applied.read().unwrap().endpoints.clone();
            let default_model = gateway.applied.read().unwrap().default_model.clone();
            // The answer is relayed until the provider closes: this
            // connection closes with it.
            return chat::complete(&endpoints, default_model.as_deref(), &req.body, &mut writer);
        }
        let (status, body) = route(gateway, &req);
        let body = body.to_string();
        // HEAD: GET's head, Content-Length included, and no body.
        let sent = if req.method == "HEAD" { "" } else { &body };
        // One write, so one segment, as a real server's buffered response:
        // `write!` on the bare socket sends each piece on its own.
        let response = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{}\r\n{sent}",
            body.len(),
            if close { "connection: close\r\n" } else { "" }
        );
        writer.write_all(response.as_bytes())?;
        if close {
            break;
        }
    }
    Ok(())
}

fn authorized(gateway: &Gateway, req: &Request) -> bool {
    req.header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| t == gateway.token)
}

fn route(gateway: &Gateway, req: &Request) -> (&'static str, Value) {
    let path = req.path.split('?').next().unwrap_or_default();
    let method = match req.method.as_str() {
        "HEAD" => "GET",
        m => m,
    };
    match (method, path) {
        ("GET", "/healthz") => ("200 OK", json!({"ok": true, "status": "live"})),
        // Ready as soon as it listens: an empty config is a valid one.
        ("GET", "/readyz") => (
            "200 OK",
            json!({"ok": true, "status": "ready", "uptimeMs": gateway.started.elapsed().as_millis() as u64}),
        ),
        ("GET", "/v1/models") => {
            if !authorized(gateway, req) {
                return (
                    "401 Unauthorized",
                    json!({"error": {"code": "unauthorized", "message": "missing or wrong gateway token"}}),
                );
            }
            let applied = gateway.applied.read().unwrap();
            let data: Vec<Value> = applied
                .providers
                .iter()
                .flat_map(|p| models_of(p).into_iter().map(move |m| json!({"id": format!("{p}/{m}"), "object": "model", "owned_by": p})))
                .collect();
            (
                "200 OK",
                json!({
                    "object": "list",
                    "data": data,
                    "providers": applied.providers,
                    "defaultModel": applied.default_model,
                    "configReloads": applied.reloads,
                }),
            )
        }
        // What arrived: the body's length and the headers, for proxy tests.
        ("POST", "/v1/echo") if authorized(gateway, req) => {
            let headers: serde_json::Map<String, Value> = req
                .headers
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), Value::from(v.as_str())))
                .collect();
            (
                "200 OK",
                json!({"bodyBytes": req.body_bytes, "headers": headers}),
            )
        }
        _ => (
            "404 Not Found",
            json!({"error": {"code": "not_found", "message": "no such endpoint"}}),
        ),
    }
}

// ------------------------------------------------------------- WebSocket ---

const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

fn serve_websocket(
    gateway: &Gateway,
    req: &Request,
    mut reader: BufReader<TcpStream>,
    mut writer: TcpStream,
) -> std::io::Result<()> {
    let Some(key) = req.header("sec-websocket-key") else {
        writer.write_all(
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        )?;
        return Ok(());
    };
    let accept = base64(
        &sha1_smol::Sha1::from(format!("{key}{WS_GUID}"))
            .digest()
            .bytes(),
    );
    writer.write_all(
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {accept}\r\n\r\n"
        )
        .as_bytes(),
    )?;
    // The first frame must carry the gateway token (raw, or {"token": ...}).
    let mut authed = false;
    while let Some((opcode, payload)) = read_frame(&mut reader)? {
        match opcode {
            0x8 => {
                write_frame(&mut writer, 0x8, &payload)?;
                return Ok(());
            }
            0x9 => write_frame(&mut writer, 0xA, &payload)?,
            0x1 | 0x2 if !authed => {
                let text = String::from_utf8_lossy(&payload);
                let presented = serde_json::from_str::<Value>(&text)
                    .ok()
                    .and_then(|v| v.get("token").and_then(Value::as_str).map(str::to_owned))
                    .unwrap_or_else(|| text.trim().to_owned());
                if presented != gateway.token {
                    // 1008: policy violation.
                    write_frame(
                        &mut writer,
                        0x8,
                        &[0x03, 0xF0, b'u', b'n', b'a', b'u', b't', b'h'],
                    )?;
                    return Ok(());
                }
                authed = true;
                write_frame(&mut writer, 0x1, br#"{"type":"hello","ok":true}"#)?;
            }
            0x1 | 0x2 => write_frame(&mut writer, opcode, &payload)?,
            _ => {}
        }
    }
    Ok(())
}

fn read_frame(reader: &mut impl Read) -> std::io::Result<Option<(u8, Vec<u8>)>> {
    let mut head = [0u8; 2];
    if reader.read_exact(&mut head).is_err() {
        return Ok(None);
    }
    let opcode = head[0] & 0x0F;
    let masked = head[1] & 0x80 != 0;
    let mut len = u64::from(head[1] & 0x7F);
    if len == 126 {
        let mut b = [0u8; 2];
        reader.read_exact(&mut b)?;
        len = u64::from(u16::from_be_bytes(b));
    } else if len == 127 {
        let mut b = [0u8; 8];
        reader.read_exact(&mut b)?;
        len = u64::from_be_bytes(b);
    }
    if len > 16 << 20 {
        return Err(std::io::Error::other("frame too large"));
    }
    let mut mask = [0u8; 4];
    if masked {
        reader.read_exact(&mut mask)?;
    }
    let mut payload = vec![0u8; len as usize];
    reader.read_exact(&mut payload)?;
    if masked {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
    }
    Ok(Some((opcode, payload)))
}

fn write_frame(writer: &mut impl Write, opcode: u8, payload: &[u8]) -> std::io::Result<()> {
    let mut frame = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => frame.push(n as u8),
        n if n <= 0xFFFF => {
            frame.push(126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(payload);
    writer.write_all(&frame)?;
    writer.flush()
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn websocket_accept_matches_rfc6455_example() {
        let digest = sha1_smol::Sha1::from(format!("dGhlIHNhbXBsZSBub25jZQ=={WS_GUID}"))
            .digest()
            .bytes();
        assert_eq!(base64(&digest), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn frames_round_trip() {
        let mut buf = Vec::new();
        write_frame(&mut buf, 0x1, &[7u8; 300]).unwrap();
        let (op, payload) = read_frame(&mut buf.as_slice()).unwrap().unwrap();
        assert_eq!(op, 0x1);
        assert_eq!(payload, vec![7u8; 300]);
    }
}
