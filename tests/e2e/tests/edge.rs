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
    // HEAD answers with GET's head and no body, and the kept-alive
    // upstream connection then carries the next answer whole.
    for _ in 0..3 {
        let req = Request::head("/v1/models")
            .header("host", &alice)
            .header("authorization", format!("Bearer {gw}"))
            .body(body(Bytes::new()))?;
        let resp = conn.send(req).await?;
        assert_eq!(resp.status(), 200);
        let length: u64 = resp.headers()["content-length"].to_str()?.parse()?;
        assert!(length > 0, "HEAD kept GET's Content-Length");
        assert!(resp.into_body().collect().await?.to_bytes().is_empty());
        let (status, models) = conn.get(&alice, "/v1/models", Some(&gw)).await?;
        assert_eq!(status, 200);
        assert_eq!(
            models.len() as u64,
            length,
            "the GET after a HEAD came whole"
        );
    }
    let opened = c
        .edge_metric("clawdeploy_edge_upstream_connects_total")
        .await?
        - before;
    assert!(
        opened <= 2.0,
        "{opened} upstream connections for 36 requests"
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

/// The client's address a request carried through the edge, as the
/// gateway saw it in `X-Forwarded-For`.
async fn forwarded_for(conn: &mut EdgeConn, host: &str, gw: &str) -> Result<String> {
    let req = Request::post("/v1/echo")
        .header("host", host)
        .header("authorization", format!("Bearer {gw}"))
        .body(body("{}"))?;
    let r = conn.send(req).await?;
    anyhow::ensure!(r.status() == 200, "echo answered {}", r.status());
    let echo: Value = serde_json::from_slice(&r.into_body().collect().await?.to_bytes())?;
    Ok(echo["headers"]["x-forwarded-for"]
        .as_str()
        .unwrap_or_default()
        .to_owned())
}

/// A PROXY protocol v2 header for TCP over IPv4 from `client`.
fn proxy_v2(client: std::net::SocketAddrV4) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0x00, 12]);
    h.extend_from_slice(&client.ip().octets());
    h.extend_from_slice(&[127, 0, 0, 1]);
    h.extend_from_slice(&client.port().to_be_bytes());
    h.extend_from_slice(&443u16.to_be_bytes());
    h
}

/// Behind a load balancer (here 127.0.0.2 and 127.0.0.3), the edge reads
/// the PROXY protocol header, v1 on the plain listener and v2 before TLS,
/// and the client it names is the one `X-Forwarded-For` carries and the
/// per-address limit counts; the balancer's connections must carry one;
/// anyone else's bytes are never read as one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_load_balancer_the_proxy_protocol_names_the_client() -> Result<()> {
    let c = one_node(ClusterOptions {
        edge_tls: true,
        edge_args: [
            "--proxy-protocol-from",
            "127.0.0.2,127.0.0.3/32",
            "--max-conns-per-ip",
            "2",
        ]
        .map(String::from)
        .to_vec(),
        ..Default::default()
    })
    .await?;
    let (_, gw) = c
        .sign_up(
            "balanced@example.com",
            "balanced",
            json!({"openai": "sk-lb-1234567"}),
        )
        .await?;
    let lb = host("balanced");
    let ca = c.public_tls_dir().join("ca.crt.pem");
    let balancer: std::net::IpAddr = "127.0.0.2".parse()?;

    // Version 1 on the plain listener.
    let mut v1 = EdgeConn::via_balancer(
        c.edge,
        balancer,
        b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 80\r\n",
        None,
    )
    .await?;
    // (The plain listener redirects to HTTPS; the redirect is enough.)
    let r = v1
        .send(Request::get("/").header("host", &lb).body(body(""))?)
        .await?;
    assert_eq!(
        r.status(),
        308,
        "the plain listener answers after a v1 header"
    );
    // Version 2 before TLS, from the other balancer address.
    let mut v2 = EdgeConn::via_balancer(
        c.edge_tls,
        "127.0.0.3".parse()?,
        &proxy_v2("198.51.100.4:5555".parse()?),
        Some((&lb, &ca)),
    )
    .await?;
    assert_eq!(forwarded_for(&mut v2, &lb, &gw).await?, "198.51.100.4");
    // v1 before TLS works too, and a LOCAL v2 header (a health check)
    // leaves the balancer's own address.
    let mut v1_tls = EdgeConn::via_balancer(
        c.edge_tls,
        balancer,
        b"PROXY TCP6 2001:db8::5 ::1 4000 443\r\n",
        Some((&lb, &ca)),
    )
    .await?;
    assert_eq!(forwarded_for(&mut v1_tls, &lb, &gw).await?, "2001:db8::5");
    let mut local = EdgeConn::via_balancer(
        c.edge_tls,
        balancer,
        b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00",
        Some((&lb, &ca)),
    )
    .await?;
    assert_eq!(forwarded_for(&mut local, &lb, &gw).await?, "127.0.0.2");

    // The per-address limit counts the client the header names: two
    // connections for 203.0.113.50, a third refused, another client's fine.
    let header = |port: u16| proxy_v2(std::net::SocketAddrV4::new([203, 0, 113, 50].into(), port));
    let mut held = Vec::new();
    for port in [1001, 1002] {
        let mut conn =
            EdgeConn::via_balancer(c.edge_tls, balancer, &header(port), Some((&lb, &ca))).await?;
        assert_eq!(forwarded_for(&mut conn, &lb, &gw).await?, "203.0.113.50");
        held.push(conn);
    }
    let third = EdgeConn::via_balancer(c.edge_tls, balancer, &header(1003), Some((&lb, &ca))).await;
    assert!(
        third.is_err(),
        "a third connection for the same client is refused"
    );
    let mut other = EdgeConn::via_balancer(
        c.edge_tls,
        balancer,
        &proxy_v2("203.0.113.51:1004".parse()?),
        Some((&lb, &ca)),
    )
    .await?;
    assert_eq!(forwarded_for(&mut other, &lb, &gw).await?, "203.0.113.51");

    // The balancer's connection without a header is closed unanswered.
    let mut bare =
        EdgeConn::from_address(c.edge, balancer, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await?;
    time_until_closed(&mut bare, Duration::from_secs(5)).await?;
    assert!(
        c.edge_metric("clawdeploy_edge_connections_refused_total{reason=\"proxy_header\"}")
            .await?
            >= 1.0
    );
    // Anyone else's PROXY line is not a header: it is a bad request, and
    // the client is who connected.
    let mut spoof = EdgeConn::from_address(
        c.edge,
        "127.0.0.1".parse()?,
        b"PROXY TCP4 6.6.6.6 127.0.0.1 1 80\r\nGET / HTTP/1.1\r\nhost: x\r\n\r\n",
    )
    .await?;
    let mut answer = vec![0u8; 64];
    let n = spoof.read(&mut answer).await?;
    assert!(
        String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&answer[..n])
    );
    let mut direct = EdgeConn::tls(c.edge_tls, &lb, &ca, &["http/1.1"]).await?;
    assert_eq!(forwarded_for(&mut direct, &lb, &gw).await?, "127.0.0.1");
    Ok(())
}
