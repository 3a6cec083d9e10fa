//! WebSockets, server-sent events and large uploads through pooled
//! upstream connections; a release closes its WebSockets at once.

use super::*;

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
