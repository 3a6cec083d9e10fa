//! The edge in depth, on the real system: TLS with a wildcard certificate
//! (HTTP/1.1 and HTTP/2, reloads), WebSockets and server-sent events,
//! streamed uploads, header hygiene, limits and timeouts, releases, and a
//! restart without the scheduler.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use clawdeploy_e2e::edge_client::{body, EdgeConn, PublicPki, ReqBody};
use clawdeploy_e2e::{peak_rss_kib, wait_for, Cluster, ClusterOptions, BASE_DOMAIN};
use futures::{SinkExt, StreamExt};
use http::Request;
use http_body_util::{BodyExt, StreamBody};
use reqwest::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn host(sub: &str) -> String {
    format!("{sub}.{BASE_DOMAIN}")
}

async fn one_node(opts: ClusterOptions) -> Result<Cluster> {
    let c = Cluster::start(ClusterOptions {
        nodes: 1,
        min_idle: 2,
        ..opts
    })
    .await?;
    c.wait_idle_at_least(2, Duration::from_secs(120)).await?;
    Ok(c)
}

/// Reads from `s` until it closes; how long that took.
async fn time_until_closed(s: &mut tokio::net::TcpStream, within: Duration) -> Result<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((started + within).into(), s.read(&mut buf)).await {
            Err(_) => anyhow::bail!("still open after {within:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(started.elapsed()),
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_serves_the_wildcard_over_h2_and_http11_and_reloads_without_dropping() -> Result<()> {
    let c = one_node(ClusterOptions {
        edge_tls: true,
        ..Default::default()
    })
    .await?;
    let token = c.register("alice@example.com").await?;
    let (status, created) = c
        .create_instance(
            &token,
            &json!({"subdomain": "alice", "apiKeys": {"openai": "sk-a"}}),
        )
        .await?;
    assert_eq!(status, 201, "{created}");
    assert_eq!(
        created["instance"]["url"],
        format!("https://alice.{BASE_DOMAIN}:{}", c.edge_tls.port())
    );
    let gw = created["instance"]["gatewayToken"]
        .as_str()
        .context("gateway token")?
        .to_owned();
    let alice = host("alice");
    let ca = c.public_tls_dir().join("ca.crt.pem");

    // HTTP/2 when offered, HTTP/1.1 when that is all the client speaks.
    let mut h2 = EdgeConn::tls(c.edge_tls, &alice, &ca, &["h2", "http/1.1"]).await?;
    assert_eq!(h2.alpn.as_deref(), Some(&b"h2"[..]));
    let (status, models) = h2.get(&alice, "/v1/models", Some(&gw)).await?;
    assert_eq!(status, 200, "{models}");
    assert!(models.contains("openai"), "{models}");
    let mut h1 = EdgeConn::tls(c.edge_tls, &alice, &ca, &["http/1.1"]).await?;
    assert_eq!(h1.alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(h1.get(&alice, "/v1/models", Some(&gw)).await?.0, 200);
    let served_first = h1.peer_cert.clone().context("peer certificate")?;

    // Unknown hosts under the wildcard get the edge's own 404.
    let (status, page) = h2.get(&host("nobody"), "/", None).await?;
    assert_eq!(status, 404);
    assert_eq!(
        serde_json::from_str::<Value>(&page)?["error"]["code"],
        "unknown_host"
    );

    // Plain HTTP redirects to the same URL over HTTPS.
    let no_follow = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let r = no_follow
        .get(format!("http://{}/v1/models?x=1", c.edge))
        .header("host", &alice)
        .send()
        .await?;
    assert_eq!(r.status(), 308);
    assert_eq!(
        r.headers()["location"],
        format!("https://{alice}:{}/v1/models?x=1", c.edge_tls.port()).as_str()
    );

    // A new certificate in the files: new handshakes get it, and the
    // connections already open keep working.
    let second = PublicPki::open(&c.public_tls_dir())?.issue_wildcard(BASE_DOMAIN, 2)?;
    wait_for(
        Duration::from_secs(15),
        "the new certificate served",
        || async {
            let conn = EdgeConn::tls(c.edge_tls, &alice, &ca, &["http/1.1"]).await?;
            Ok(conn.peer_cert.as_deref() == Some(&second[..]))
        },
    )
    .await?;
    assert_ne!(served_first, second);
    assert_eq!(h1.get(&alice, "/v1/models", Some(&gw)).await?.0, 200);
    assert_eq!(h2.get(&alice, "/v1/models", Some(&gw)).await?.0, 200);
    assert!(
        c.edge_metric("clawdeploy_edge_tls_reloads_total{result=\"ok\"}")
            .await?
            >= 1.0
    );

    // A broken file never replaces a working certificate.
    std::fs::write(
        c.public_tls_dir().join("edge.crt.pem"),
        b"not a certificate",
    )?;
    wait_for(
        Duration::from_secs(15),
        "the failed reload counted",
        || async {
            Ok(
                c.edge_metric("clawdeploy_edge_tls_reloads_total{result=\"error\"}")
                    .await?
                    >= 1.0,
            )
        },
    )
    .await?;
    let conn = EdgeConn::tls(c.edge_tls, &alice, &ca, &["h2"]).await?;
    assert_eq!(conn.peer_cert.as_deref(), Some(&second[..]));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_events_and_large_uploads_stream_through_a_pooled_upstream() -> Result<()> {
    let c = one_node(ClusterOptions::default()).await?;
    let (_, gw) = c
        .sign_up("alice@example.com", "alice", json!({"openai": "sk-a"}))
        .await?;
    let alice = host("alice");

    assert_eq!(c.ws_echo(&alice, &gw, "ping-1").await?, "ping-1");

    // Server-sent events arrive as they are sent, not when the stream ends.
    let mut conn = EdgeConn::plain(c.edge).await?;
    let req = Request::get("/v1/events?n=3&interval_ms=800")
        .header("host", &alice)
        .header("authorization", format!("Bearer {gw}"))
        .body(body(Bytes::new()))?;
    let started = Instant::now();
    let resp = conn.send(req).await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut events = resp.into_body();
    let mut seen = String::new();
    let mut first_at = None;
    while let Some(frame) = events.frame().await {
        if let Ok(data) = frame?.into_data() {
            seen.push_str(&String::from_utf8_lossy(&data));
            if first_at.is_none() && seen.contains("\"seq\":0") {
                first_at = Some(started.elapsed());
            }
        }
    }
    let (first, total) = (first_at.context("no first event")?, started.elapsed());
    assert!(seen.contains("\"seq\":2"), "{seen}");
    assert!(
        first < Duration::from_millis(600) && total >= Duration::from_millis(1500),
        "first event after {first:?}, stream ended after {total:?}: buffered?"
    );

    // A 192 MiB upload of unknown length streams through without the edge
    // holding it: its peak memory stays far below the body's size.
    let chunk = Bytes::from(vec![7u8; 1024 * 1024]);
    let chunks = futures::stream::iter(
        (0..192).map(move |_| Ok::<_, std::io::Error>(hyper::body::Frame::data(chunk.clone()))),
    );
    let upload: ReqBody = BodyExt::boxed(StreamBody::new(chunks));
    let req = Request::post("/v1/echo")
        .header("host", &alice)
        .header("authorization", format!("Bearer {gw}"))
        .body(upload)?;
    let resp = conn.send(req).await?;
    assert_eq!(resp.status(), 200);
    let echo: Value = serde_json::from_slice(&resp.into_body().collect().await?.to_bytes())?;
    assert_eq!(echo["bodyBytes"], 192 * 1024 * 1024, "{echo}");
    assert_eq!(echo["headers"]["transfer-encoding"], "chunked");
    let peak_kib = peak_rss_kib(c.edge_pid().context("edge pid")?).context("edge VmHWM")?;
    assert!(
        peak_kib < 96 * 1024,
        "edge peak RSS {} MiB after a 192 MiB upload",
        peak_kib >> 10
    );

    // Keep-alive upstream: 30 requests over one client connection open at
    // most a couple of connections to the container.
    let before = c
        .edge_metric("clawdeploy_edge_upstream_connects_total")
        .await?;
    for _ in 0..30 {
        assert_eq!(conn.get(&alice, "/v1/models", Some(&gw)).await?.0, 200);
    }
    let opened = c
        .edge_metric("clawdeploy_edge_upstream_connects_total")
        .await?
        - before;
    assert!(
        opened <= 2.0,
        "{opened} upstream connections for 30 requests"
    );
    assert!(
        c.edge_metric("clawdeploy_edge_upstream_seconds_count")
            .await?
            >= 30.0
    );
    assert!(
        c.edge_metric("clawdeploy_edge_requests_total{class=\"2xx\",route=\"known\"}")
            .await?
            >= 30.0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_are_the_edges_and_limits_and_timeouts_hold() -> Result<()> {
    let c = one_node(ClusterOptions {
        edge_args: [
            "--max-body-bytes",
            "1048576",
            "--max-header-bytes",
            "8192",
            "--header-timeout-secs",
            "2",
            "--idle-timeout-secs",
            "3",
            "--max-conns-per-ip",
            "20",
        ]
        .map(String::from)
        .to_vec(),
        ..Default::default()
    })
    .await?;
    let (_, gw) = c
        .sign_up("alice@example.com", "alice", json!({"openai": "sk-a"}))
        .await?;
    let alice = host("alice");

    // Spoofed forwarding headers are replaced; hop-by-hop ones go nowhere.
    let r = c
        .client
        .post(format!("http://{}/v1/echo", c.edge))
        .header("host", "ALICE.clawdeploy.localhost.:80")
        .bearer_auth(&gw)
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-real-ip", "6.6.6.6")
        .header("forwarded", "for=6.6.6.6")
        .header("x-forwarded-proto", "https")
        .header("connection", "keep-alive, x-secret")
        .header("x-secret", "hop")
        .body("{}")
        .send()
        .await?;
    assert_eq!(r.status(), 200, "normalised host routes");
    let echo: Value = r.json().await?;
    let h = &echo["headers"];
    assert_eq!(h["x-forwarded-for"], "127.0.0.1", "{echo}");
    assert_eq!(h["x-real-ip"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], alice);
    assert!(h.get("forwarded").is_none(), "{echo}");
    assert!(h.get("x-secret").is_none(), "{echo}");

    // The 404 page: JSON for programs, HTML for browsers.
    let r = c
        .client
        .get(format!("http://{}/", c.edge))
        .header("host", host("nobody"))
        .header("accept", "text/html")
        .send()
        .await?;
    assert_eq!(r.status(), 404);
    assert!(r.headers()["content-type"]
        .to_str()?
        .starts_with("text/html"));
    assert!(r.text().await?.contains("No ClawDeploy instance"));

    // Oversized head: 431. Oversized body, declared or streamed: 413.
    let r = c
        .client
        .get(format!("http://{}/v1/models", c.edge))
        .header("host", &alice)
        .header("x-big", "a".repeat(16 * 1024))
        .send()
        .await?;
    assert_eq!(r.status(), 431);
    let r = c
        .client
        .post(format!("http://{}/v1/echo", c.edge))
        .header("host", &alice)
        .bearer_auth(&gw)
        .body(vec![0u8; 2 * 1024 * 1024])
        .send()
        .await?;
    assert_eq!(r.status(), 413);
    let body_json: Value = r.json().await?;
    assert_eq!(body_json["error"]["code"], "body_too_large");
    let mut conn = EdgeConn::plain(c.edge).await?;
    let chunk = Bytes::from(vec![1u8; 64 * 1024]);
    let chunks = futures::stream::iter(
        (0..40).map(move |_| Ok::<_, std::io::Error>(hyper::body::Frame::data(chunk.clone()))),
    );
    let req = Request::post("/v1/echo")
        .header("host", &alice)
        .header("authorization", format!("Bearer {gw}"))
        .body(BodyExt::boxed(StreamBody::new(chunks)))?;
    assert_eq!(conn.send(req).await?.status(), 413);

    // A client that never finishes its head is cut off by the header timeout.
    let mut slow = tokio::net::TcpStream::connect(c.edge).await?;
    slow.write_all(format!("GET /v1/models HTTP/1.1\r\nHost: {alice}\r\n").as_bytes())
        .await?;
    let cut = time_until_closed(&mut slow, Duration::from_secs(8)).await?;
    assert!(cut >= Duration::from_millis(1500), "cut after {cut:?}");

    // A kept-alive HTTP/1.1 connection waiting for its next request head
    // gets the header timeout; an HTTP/2 connection with no streams is
    // closed by the idle timeout.
    let mut waiting = tokio::net::TcpStream::connect(c.edge).await?;
    waiting
        .write_all(format!("GET /healthz HTTP/1.1\r\nHost: {alice}\r\n\r\n").as_bytes())
        .await?;
    let mut buf = [0u8; 1024];
    let n = waiting.read(&mut buf).await?;
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let closed = time_until_closed(&mut waiting, Duration::from_secs(10)).await?;
    assert!(
        closed >= Duration::from_millis(1500),
        "closed after {closed:?}"
    );
    let mut h2c = EdgeConn::plain_h2(c.edge).await?;
    assert_eq!(h2c.get(&alice, "/healthz", None).await?.0, 200);
    wait_for(
        Duration::from_secs(10),
        "the idle HTTP/2 connection closed",
        || async {
            Ok(
                c.edge_metric("clawdeploy_edge_timeouts_total{kind=\"idle\"}")
                    .await?
                    >= 1.0,
            )
        },
    )
    .await?;
    assert!(
        h2c.get(&alice, "/healthz", None).await.is_err(),
        "still open"
    );

    // Twenty connections from one address; the twenty-first is refused
    // while another address is still served.
    let mut held = Vec::new();
    for _ in 0..20 {
        let s = tokio::net::TcpSocket::new_v4()?;
        s.bind("127.0.0.2:0".parse()?)?;
        held.push(s.connect(c.edge).await?);
    }
    let s = tokio::net::TcpSocket::new_v4()?;
    s.bind("127.0.0.2:0".parse()?)?;
    let mut refused = s.connect(c.edge).await?;
    let _ = refused
        .write_all(format!("GET /healthz HTTP/1.1\r\nHost: {alice}\r\n\r\n").as_bytes())
        .await;
    time_until_closed(&mut refused, Duration::from_secs(5)).await?;
    assert_eq!(c.edge_get(&alice, "/healthz", None).await?.0, 200);
    assert!(
        c.edge_metric("clawdeploy_edge_connections_refused_total")
            .await?
            >= 1.0
    );
    drop(held);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_subdomain_404s_at_once_and_its_websockets_close() -> Result<()> {
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};
    let c = one_node(ClusterOptions::default()).await?;
    let (token, gw) = c
        .sign_up("alice@example.com", "alice", json!({"openai": "sk-a"}))
        .await?;
    let alice = host("alice");
    let container: String = sqlx::query_scalar(
        "SELECT c.docker_id FROM instances i JOIN containers c ON c.id = i.container_id",
    )
    .fetch_one(&c.db)
    .await?;

    let stream = tokio::net::TcpStream::connect(c.edge).await?;
    let mut req = format!("ws://{}/ws", c.edge).into_client_request()?;
    req.headers_mut().insert("host", alice.parse()?);
    let (mut ws, _) = tokio_tungstenite::client_async(req, stream).await?;
    ws.send(Message::text(gw.clone())).await?;
    ws.next().await.context("hello")??;
    assert_eq!(c.edge_metric("clawdeploy_edge_websockets").await?, 1.0);

    let (status, released) = c.my_instance(Method::DELETE, &token, None).await?;
    assert_eq!(status, 200, "{released}");
    assert_eq!(released["status"], "deleting");
    // The answer waited for the edge: the very next request is a 404.
    let (status, page) = c.edge_get(&alice, "/v1/models", Some(&gw)).await?;
    assert_eq!(status, 404, "{page}");
    assert!(page.contains("unknown_host"));
    // The live WebSocket is closed with its route.
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) => return,
                Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => continue,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the WebSocket outlived its route");
    assert!(
        c.edge_metric("clawdeploy_edge_websockets_ended_total{reason=\"route_changed\"}")
            .await?
            >= 1.0
    );
    // The edge measured how long the removal took to reach it.
    assert!(
        c.edge_metric("clawdeploy_edge_route_update_lag_seconds_count")
            .await?
            >= 1.0
    );
    // Then the container stops with its volume kept, for the grace period.
    wait_for(Duration::from_secs(30), "the container stopped", || async {
        let v = c.docker_inspect(&container)?;
        Ok(v["State"]["Running"] == false)
    })
    .await?;
    let (status, _) = c.my_instance(Method::DELETE, &token, None).await?;
    assert_eq!(status, 404, "nothing left to release");
    // The subdomain is not reissued while it cools down.
    let other = c.register("mallory@example.com").await?;
    let (status, body) = c
        .create_instance(&other, &json!({"subdomain": "alice"}))
        .await?;
    assert_eq!(status, 409, "{body}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_restarted_without_the_scheduler_serves_its_cached_routes() -> Result<()> {
    let mut c = one_node(ClusterOptions::default()).await?;
    let (_, gw) = c
        .sign_up("alice@example.com", "alice", json!({"openai": "sk-a"}))
        .await?;
    let alice = host("alice");

    // A restart (SIGTERM, as systemd does) while the scheduler is away.
    c.kill_scheduler();
    c.stop_edge().await?;
    c.start_edge()?;
    wait_for(
        Duration::from_secs(20),
        "the edge serving alice",
        || async { Ok(c.edge_get(&alice, "/v1/models", Some(&gw)).await?.0 == 200) },
    )
    .await?;
    assert_eq!(
        c.edge_metric("clawdeploy_edge_scheduler_connected").await?,
        0.0,
        "served from the cache, not the scheduler"
    );
    assert_eq!(c.edge_get(&host("bob"), "/", None).await?.0, 404);

    // The scheduler returns: the edge reconnects and takes new routes.
    c.start_scheduler()?;
    c.wait_http_up().await?;
    wait_for(Duration::from_secs(20), "the edge reconnected", || async {
        Ok(c.edge_metric("clawdeploy_edge_scheduler_connected").await? == 1.0)
    })
    .await?;
    c.wait_nodes_connected(Duration::from_secs(30)).await?;
    let (_, bob_gw) = c
        .sign_up("bob@example.com", "bob", json!({"anthropic": "sk-b"}))
        .await?;
    assert_eq!(
        c.edge_get(&host("bob"), "/v1/models", Some(&bob_gw))
            .await?
            .0,
        200
    );
    Ok(())
}
