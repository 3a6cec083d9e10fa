//! An edge restarted without the scheduler, and the PROXY protocol behind
//! a load balancer.

use super::*;

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
