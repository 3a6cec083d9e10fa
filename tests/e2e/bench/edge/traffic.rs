//! The edge's own extras: route changes under load and many WebSockets held
//! at once.

use super::*;

pub(crate) async fn route_lag(c: &Cluster, n: usize) -> Result<()> {
    for i in 0..n {
        let token = c.register(&format!("lag{i}@example.com")).await?;
        let (status, body) = c
            .create_instance(&token, &json!({"subdomain": format!("lag{i}")}))
            .await?;
        ensure!(status == 201, "signup answered {status}: {body}");
        let (status, body) = c.my_instance(reqwest::Method::DELETE, &token, None).await?;
        ensure!(status == 200, "release answered {status}: {body}");
    }
    let text = c
        .client
        .get(format!("http://{}/metrics", c.edge_admin))
        .send()
        .await?
        .text()
        .await?;
    let name = "clawdeploy_edge_route_update_lag_seconds";
    let value = |suffix: &str| clawdeploy_e2e::metric_value(&text, &format!("{name}{suffix}"));
    let (sum, count) = (value("_sum").unwrap_or(0.0), value("_count").unwrap_or(0.0));
    let buckets: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{name}_bucket{{le=\"")))
        .filter_map(|rest| {
            let (le, v) = rest.split_once("\"} ")?;
            Some((le.parse().ok()?, v.parse().ok()?))
        })
        .collect();
    let bound = |q: f64| {
        buckets
            .iter()
            .find(|(_, c)| *c >= q * count)
            .map_or(f64::INFINITY, |(le, _)| *le)
    };
    println!(
        "\nroute update lag (scheduler sends → edge applied), {count} changes: mean {:.2} ms, p50 ≤ {} ms, p99 ≤ {} ms",
        sum / count.max(1.0) * 1000.0,
        bound(0.5) * 1000.0,
        bound(0.99) * 1000.0
    );
    Ok(())
}

/// Gives the tenant container the whole machine (a pool container gets half
/// a core, which would cap every proxy alike) and room for many connections
/// (the stand-in spends a thread on each). Through the desired state, as a
/// resize.
pub(crate) async fn make_room(c: &Cluster, container: uuid::Uuid, pids: i32) -> Result<()> {
    sqlx::query(
        "UPDATE containers SET pids = $2, memory_bytes = $3, cpu_millis = 2000 WHERE id = $1",
    )
    .bind(container)
    .bind(pids)
    .bind(4_i64 << 30)
    .execute(&c.db)
    .await?;
    sqlx::query("UPDATE nodes SET generation = generation + 1")
        .execute(&c.db)
        .await?;
    // The scheduler pushes a node's desired state on this event.
    sqlx::query("SELECT pg_notify('clawdeploy_events', $1)")
        .bind(format!("bench\nn {}", c.node_ids[0]))
        .execute(&c.db)
        .await?;
    let docker_id: String = sqlx::query_scalar("SELECT docker_id FROM containers WHERE id = $1")
        .bind(container)
        .fetch_one(&c.db)
        .await?;
    wait_for(Duration::from_secs(30), "the container resized", || async {
        Ok(c.docker_inspect(&docker_id)?["HostConfig"]["PidsLimit"] == i64::from(pids))
    })
    .await
}

/// A WebSocket over TLS (`wss://`), as customers open them.
pub(crate) async fn open_ws(
    edge: SocketAddr,
    source: std::net::IpAddr,
    gw: &str,
    tls: &tokio_rustls::TlsConnector,
) -> Result<Ws> {
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    let tcp = socket.connect(edge).await?;
    let name = rustls::pki_types::ServerName::try_from(format!("alice.{BASE_DOMAIN}"))?;
    let stream = tls.connect(name, tcp).await?;
    let mut req = format!("wss://alice.{BASE_DOMAIN}/ws").into_client_request()?;
    req.headers_mut()
        .insert("host", format!("alice.{BASE_DOMAIN}").parse()?);
    let (mut ws, _) = tokio_tungstenite::client_async(req, stream).await?;
    ws.send(Message::text(gw)).await?;
    let hello = ws.next().await.context("no hello")??;
    ensure!(hello.to_text()?.contains("\"ok\":true"), "refused: {hello}");
    Ok(ws)
}

pub(crate) async fn websockets(c: &Cluster, gw: &str, n: usize) -> Result<()> {
    let pid = c.edge_pid().context("edge pid")?;
    let tls = clawdeploy_e2e::edge_client::tls_connector(
        &c.public_tls_dir().join("ca.crt.pem"),
        &["http/1.1"],
    )?;
    let before = rss_kib(pid).unwrap_or(0);
    let started = Instant::now();
    // 500 per source address keeps each under the per-address limit.
    let opened: Vec<Result<Ws>> = futures::stream::iter(0..n)
        .map(|i| {
            let source = std::net::Ipv4Addr::new(127, 0, 1, 10 + (i / 500) as u8).into();
            let tls = &tls;
            async move {
                // A client retries once, as browsers' reconnect logic does:
                // the stand-in's accept backlog is small.
                match open_ws(c.edge_tls, source, gw, tls).await {
                    Ok(ws) => Ok(ws),
                    Err(_) => open_ws(c.edge_tls, source, gw, tls).await,
                }
            }
        })
        .buffer_unordered(128)
        .collect()
        .await;
    let took = started.elapsed();
    let failures: Vec<String> = opened
        .iter()
        .filter_map(|r| r.as_ref().err().map(|e| e.to_string()))
        .take(3)
        .collect();
    let mut live: Vec<Ws> = opened.into_iter().filter_map(Result::ok).collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(pid).unwrap_or(0);
    let gauge = c.edge_metric("clawdeploy_edge_websockets").await?;
    // They are live: a sample echoes.
    let mut echoed = 0;
    for ws in live.iter_mut().step_by((n / 100).max(1)) {
        use tokio_tungstenite::tungstenite::Message;
        ws.send(Message::text("still there?")).await?;
        if let Some(Ok(m)) = ws.next().await {
            echoed += usize::from(m.to_text().unwrap_or_default() == "still there?");
        }
    }
    let held = live.len();
    println!(
        "\nWebSockets through the edge: {held}/{n} open (edge gauge {gauge}) in {:.1} s; \
         sample echo {echoed}/{}; edge RSS {} → {} MiB: {:.1} KiB per connection{}",
        took.as_secs_f64(),
        live.iter().step_by((n / 100).max(1)).count(),
        before / 1024,
        after / 1024,
        (after.saturating_sub(before)) as f64 / held.max(1) as f64,
        if failures.is_empty() {
            String::new()
        } else {
            format!("; first failures: {failures:?}")
        }
    );
    drop(live);
    Ok(())
}
