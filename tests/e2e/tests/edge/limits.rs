//! The edge's own headers, and its limits and timeouts.

use super::*;

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
