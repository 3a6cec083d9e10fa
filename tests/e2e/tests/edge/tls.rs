//! TLS with a wildcard certificate over HTTP/1.1 and HTTP/2, and its
//! reload without dropping connections.

use super::*;

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
