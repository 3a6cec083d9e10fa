//! Custom domains end to end: real pebble (Let's Encrypt's test CA), its
//! DNS server on loopback with records set through its management API, the
//! real edge terminating TLS with the certificate pebble issued, and the
//! tenant's gateway behind it.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use clawdeploy_e2e::acme::Pebble;
use clawdeploy_e2e::edge_client::EdgeConn;
use clawdeploy_e2e::{free_addr, wait_for, Cluster, ClusterOptions, ADMIN_TOKEN, BASE_DOMAIN};
use reqwest::Method;
use serde_json::{json, Value};

/// A second edge process, stopped with the test.
struct SecondEdge(std::process::Child, SocketAddr);

impl Drop for SecondEdge {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A one-node cluster pointed at pebble (certificates valid for
/// `validity_secs`) and its DNS server, with fast retries and re-checks.
/// Pebble validates HTTP-01 on `acme_port`: the cluster's edge, or, with
/// `second_edge`, another edge only the CA talks to (whichever edge the
/// CA reaches must answer).
struct Setup {
    c: Cluster,
    pebble: Pebble,
    acme_port: u16,
    _second: Option<SecondEdge>,
}

async fn start(validity_secs: u64, second_edge: bool) -> Result<Setup> {
    let acme = free_addr();
    let dir = clawdeploy_e2e::workspace_root()
        .join(".local/e2e")
        .join(format!("pebble-{}", uuid::Uuid::new_v4().simple()));
    let pebble = Pebble::start(&dir, acme.port(), validity_secs).await?;
    let mut args = pebble.scheduler_args();
    args.extend(["--acme-retry-base-secs", "2", "--domain-recheck-secs", "3"].map(String::from));
    let c = Cluster::start(ClusterOptions {
        nodes: 1,
        min_idle: 3,
        edge_tls: true,
        edge_listen: (!second_edge).then_some(acme),
        scheduler_args: args,
        ..Default::default()
    })
    .await?;
    let second = if second_edge {
        let admin = free_addr();
        let edge = SecondEdge(c.spawn_edge("edge-2", acme, admin, None)?, admin);
        c.wait_http_up_on(admin).await?;
        Some(edge)
    } else {
        None
    };
    c.wait_idle_at_least(2, Duration::from_secs(120)).await?;
    Ok(Setup {
        c,
        pebble,
        acme_port: acme.port(),
        _second: second,
    })
}

/// A signed-up account: its API token, instance id and gateway token.
struct Tenant {
    token: String,
    instance: String,
    gateway: String,
}

async fn tenant(c: &Cluster, name: &str, tier: &str) -> Result<Tenant> {
    let token = c.register(&format!("{name}@example.com")).await?;
    let (status, created) = c
        .create_instance(
            &token,
            &json!({"subdomain": name, "apiKeys": {"openai": "sk-x"}}),
        )
        .await?;
    anyhow::ensure!(status == 201, "{created}");
    let t = Tenant {
        token,
        instance: created["instance"]["id"].as_str().context("id")?.to_owned(),
        gateway: created["instance"]["gatewayToken"]
            .as_str()
            .context("gateway token")?
            .to_owned(),
    };
    set_tier(c, &t, tier).await?;
    Ok(t)
}

async fn set_tier(c: &Cluster, t: &Tenant, tier: &str) -> Result<()> {
    let (status, v) = c
        .admin(
            Method::PUT,
            &format!("/admin/instances/{}/tier", t.instance),
            Some(json!({"tier": tier})),
            Some(ADMIN_TOKEN),
        )
        .await?;
    anyhow::ensure!(status == 200, "tier {tier}: {status} {v}");
    Ok(())
}

async fn call(
    c: &Cluster,
    t: &Tenant,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<(u16, Value)> {
    c.admin(method, path, body, Some(&t.token)).await
}

async fn add(c: &Cluster, t: &Tenant, hostname: &str) -> Result<(u16, Value)> {
    call(
        c,
        t,
        Method::POST,
        "/api/instances/me/domains",
        Some(json!({"hostname": hostname})),
    )
    .await
}

async fn verify(c: &Cluster, t: &Tenant, hostname: &str) -> Result<Value> {
    let (status, v) = call(
        c,
        t,
        Method::POST,
        &format!("/api/instances/me/domains/{hostname}/verify"),
        None,
    )
    .await?;
    anyhow::ensure!(status == 200, "verify {hostname}: {status} {v}");
    Ok(v["domain"].clone())
}

/// The account's view of one of its domains (`Null` when it has none).
async fn domain(c: &Cluster, t: &Tenant, hostname: &str) -> Result<Value> {
    let (status, v) = call(c, t, Method::GET, "/api/instances/me/domains", None).await?;
    anyhow::ensure!(status == 200, "{status} {v}");
    Ok(v["domains"]
        .as_array()
        .context("domains")?
        .iter()
        .find(|d| d["hostname"] == hostname)
        .cloned()
        .unwrap_or(Value::Null))
}

async fn wait_state(
    c: &Cluster,
    t: &Tenant,
    hostname: &str,
    state: &str,
    within: Duration,
) -> Result<Value> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let d = domain(c, t, hostname).await?;
        if d["state"] == state {
            return Ok(d);
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "{hostname} not {state} within {within:?}; last seen: {d}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The TXT value the account must publish for `hostname`.
fn txt_of(d: &Value) -> Result<String> {
    d["records"]
        .as_array()
        .context("records")?
        .iter()
        .find(|r| r["type"] == "TXT")
        .and_then(|r| r["value"].as_str())
        .map(str::to_owned)
        .context("a TXT record")
}

/// Plain HTTP to the edge for `host`: status and `Location`.
async fn plain(edge: SocketAddr, host: &str) -> Result<(u16, String)> {
    let r = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?
        .get(format!("http://{edge}/v1/models"))
        .header("host", host)
        .send()
        .await?;
    let location = r
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    Ok((r.status().as_u16(), location))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_domain_is_proven_issued_served_renewed_and_switched_off() -> Result<()> {
    let Setup { c, pebble, .. } = start(30, false).await?;
    let root = c.dir.join("pebble-root.pem");
    pebble.issuing_root(&root).await?;
    let alice = tenant(&c, "alice", "pro").await?;
    let name = "chat.example.org";

    // A free account may not add one.
    let bob = tenant(&c, "bob", "free").await?;
    let (status, v) = add(&c, &bob, "bob.example.org").await?;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (403, Some("plan_required")),
        "{v}"
    );

    // Added: pending until the records exist, with the records to create.
    let (status, v) = add(&c, &alice, "Chat.Example.org.").await?;
    assert_eq!(status, 201, "{v}");
    let d = &v["domain"];
    assert_eq!(
        (d["hostname"].as_str(), d["state"].as_str()),
        (Some(name), Some("pending_dns"))
    );
    let txt = txt_of(d)?;
    let cname = d["records"]
        .as_array()
        .context("records")?
        .iter()
        .find(|r| r["type"] == "CNAME")
        .context("a CNAME record")?
        .clone();
    assert_eq!(cname["value"], format!("alice.{BASE_DOMAIN}"));
    let still = verify(&c, &alice, name).await?;
    assert_eq!(still["state"], "pending_dns");
    assert!(
        still["reason"].as_str().unwrap_or_default().contains("TXT"),
        "{still}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(domain(&c, &alice, name).await?["state"], "pending_dns");

    // The records exist: proven, then issued and served.
    pebble
        .set_txt(&format!("_clawdeploy-challenge.{name}"), &txt)
        .await?;
    pebble
        .set_cname(name, cname["value"].as_str().context("CNAME value")?)
        .await?;
    let proven = verify(&c, &alice, name).await?;
    assert_ne!(proven["state"], "pending_dns", "{proven}");
    let active = wait_state(&c, &alice, name, "active", Duration::from_secs(60)).await?;
    assert!(active["certificateNotAfter"].is_string(), "{active}");

    // HTTPS to the custom name through the edge, trusting only pebble's
    // root, reaches alice's gateway with her token; HTTP redirects.
    let mut held = EdgeConn::tls(c.edge_tls, name, &root, &["h2"]).await?;
    assert_eq!(held.alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(
        held.get(name, "/v1/models", Some(&alice.gateway)).await?.0,
        200
    );
    assert_eq!(
        held.get(name, "/v1/models", Some("wrong-token")).await?.0,
        401
    );
    let first_cert = held.peer_cert.clone().context("peer certificate")?;
    assert_eq!(
        plain(c.edge, name).await?,
        (
            308,
            format!("https://{name}:{}/v1/models", c.edge_tls.port())
        )
    );
    let issued: i64 = c
        .count(&format!(
            "SELECT count(*) FROM acme_orders WHERE hostname = '{name}' AND result = 'issued'"
        ))
        .await?;
    assert_eq!(issued, 1);

    // Renewal (at two thirds of 30 s): new handshakes get the new
    // certificate, the HTTP/2 connection opened before stays up.
    wait_for(
        Duration::from_secs(60),
        "a renewed certificate served",
        || async {
            let conn = EdgeConn::tls(c.edge_tls, name, &root, &["h2"]).await?;
            Ok(conn.peer_cert.as_deref() != Some(&first_cert[..]))
        },
    )
    .await?;
    assert_eq!(
        held.get(name, "/v1/models", Some(&alice.gateway)).await?.0,
        200
    );
    let renewals: i64 = c
        .count(&format!(
            "SELECT count(*) FROM acme_orders WHERE hostname = '{name}' AND renewal AND result = 'issued'"
        ))
        .await?;
    assert!(renewals >= 1);

    // A downgrade switches it off: 404 at the edge, even on the connection
    // already open; the certificate is kept.
    set_tier(&c, &alice, "free").await?;
    let off = domain(&c, &alice, name).await?;
    assert_eq!(off["state"], "off", "{off}");
    assert!(
        off["reason"].as_str().unwrap_or_default().contains("plan"),
        "{off}"
    );
    wait_for(
        Duration::from_secs(10),
        "404 after the downgrade",
        || async { Ok(plain(c.edge, name).await?.0 == 404) },
    )
    .await?;
    assert_eq!(
        held.get(name, "/v1/models", Some(&alice.gateway)).await?.0,
        404
    );

    // An upgrade restores it at once, from the certificate it has: no new
    // order.
    let orders: i64 = c
        .count(&format!(
            "SELECT count(*) FROM acme_orders WHERE hostname = '{name}'"
        ))
        .await?;
    set_tier(&c, &alice, "pro").await?;
    let back = domain(&c, &alice, name).await?;
    assert_eq!(back["state"], "active", "{back}");
    wait_for(
        Duration::from_secs(10),
        "served again after the upgrade",
        || async {
            let mut conn = EdgeConn::tls(c.edge_tls, name, &root, &["http/1.1"]).await?;
            Ok(conn.get(name, "/v1/models", Some(&alice.gateway)).await?.0 == 200)
        },
    )
    .await?;
    let fresh: i64 = c
        .count(&format!(
            "SELECT count(*) FROM acme_orders WHERE hostname = '{name}' AND NOT renewal"
        ))
        .await?;
    assert_eq!(fresh, 1, "the upgrade ordered a new certificate");
    assert!(orders >= 2);

    // The TXT record removed: the next re-check switches it off, with the
    // reason shown.
    pebble
        .clear_txt(&format!("_clawdeploy-challenge.{name}"))
        .await?;
    let gone = wait_state(&c, &alice, name, "off", Duration::from_secs(30)).await?;
    assert!(
        gone["reason"].as_str().unwrap_or_default().contains("TXT"),
        "{gone}"
    );
    assert_eq!(plain(c.edge, name).await?.0, 404);

    // Removing it: gone from the list.
    let (status, _) = call(
        &c,
        &alice,
        Method::DELETE,
        &format!("/api/instances/me/domains/{name}"),
        None,
    )
    .await?;
    assert_eq!(status, 204);
    assert!(domain(&c, &alice, name).await?.is_null());
    for m in [
        "clawdeploy_acme_orders_total{result=\"issued\"}",
        "clawdeploy_domain_checks_total{result=\"missing\"}",
    ] {
        assert!(c.scheduler_metric(0, m).await? >= 1.0, "{m}");
    }
    assert!(
        c.edge_metric("clawdeploy_edge_acme_challenges_total{result=\"answered\"}")
            .await?
            >= 2.0
    );
    Ok(())
}

/// A plain HTTP server on `addr` that answers every request with a body
/// that is not the key authorization.
async fn wrong_answers(addr: SocketAddr) -> Result<tokio::task::JoinHandle<()>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind(addr).await?;
    Ok(tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 15\r\nconnection: close\r\n\r\nnot-the-key-auth")
                    .await;
            });
        }
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_has_one_owner_and_failed_challenges_show_the_cas_reason_then_succeed() -> Result<()>
{
    // The CA reaches only the second edge: it answers the challenges
    // it got over its route stream.
    let Setup {
        c,
        pebble,
        acme_port,
        _second,
    } = start(3600, true).await?;
    let alice = tenant(&c, "carol", "pro").await?;
    let bob = tenant(&c, "dave", "team").await?;

    // Two accounts race for one name: both may claim it, the one whose
    // token the TXT record holds owns it; the other cannot take it.
    let name = "race.example.net";
    let (s1, a) = add(&c, &alice, name).await?;
    let (s2, b) = add(&c, &bob, name).await?;
    assert_eq!((s1, s2), (201, 201), "{a} {b}");
    let (ta, tb) = (txt_of(&a["domain"])?, txt_of(&b["domain"])?);
    assert_ne!(ta, tb);
    pebble
        .set_txt(&format!("_clawdeploy-challenge.{name}"), &ta)
        .await?;
    let (va, vb) = tokio::join!(verify(&c, &alice, name), verify(&c, &bob, name));
    assert_ne!(va?["state"], "pending_dns");
    let vb = vb?;
    assert_eq!(vb["state"], "pending_dns", "{vb}");
    wait_state(&c, &alice, name, "active", Duration::from_secs(60)).await?;
    assert_eq!(verify(&c, &bob, name).await?["state"], "pending_dns");
    let owners: i64 = c
        .count(&format!(
            "SELECT count(*) FROM domains WHERE hostname = '{name}' AND state <> 'pending_dns'"
        ))
        .await?;
    assert_eq!(owners, 1);
    // Once the TXT record holds the other account's token, the name moves.
    pebble
        .set_txt(&format!("_clawdeploy-challenge.{name}"), &tb)
        .await?;
    assert_ne!(verify(&c, &bob, name).await?["state"], "pending_dns");
    assert!(domain(&c, &alice, name).await?.is_null());
    wait_state(&c, &bob, name, "active", Duration::from_secs(60)).await?;

    // An unreachable challenge (the name points where no edge listens):
    // failed, with the CA's reason; fixed, a later retry succeeds.
    let down = "down.example.net";
    let (_, d) = add(&c, &alice, down).await?;
    pebble
        .set_txt(
            &format!("_clawdeploy-challenge.{down}"),
            &txt_of(&d["domain"])?,
        )
        .await?;
    pebble.add_a(down, "127.0.0.3").await?;
    verify(&c, &alice, down).await?;
    let failed = wait_state(&c, &alice, down, "failed", Duration::from_secs(60)).await?;
    let reason = failed["reason"].as_str().unwrap_or_default().to_owned();
    assert!(
        reason.contains("127.0.0.3") || reason.to_lowercase().contains("connect"),
        "{failed}"
    );
    pebble.clear_a(down).await?;
    wait_state(&c, &alice, down, "active", Duration::from_secs(60)).await?;

    // A wrong key authorization (another server answers the challenge).
    let wrong = "wrong.example.net";
    let impostor = wrong_answers(SocketAddr::from(([127, 0, 0, 4], acme_port))).await?;
    let (_, d) = add(&c, &bob, wrong).await?;
    pebble
        .set_txt(
            &format!("_clawdeploy-challenge.{wrong}"),
            &txt_of(&d["domain"])?,
        )
        .await?;
    pebble.add_a(wrong, "127.0.0.4").await?;
    verify(&c, &bob, wrong).await?;
    let failed = wait_state(&c, &bob, wrong, "failed", Duration::from_secs(60)).await?;
    assert!(
        failed["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("key authorization"),
        "{failed}"
    );
    pebble.clear_a(wrong).await?;
    impostor.abort();
    wait_state(&c, &bob, wrong, "active", Duration::from_secs(60)).await?;
    let failures: i64 = c
        .count("SELECT count(*) FROM acme_orders WHERE result = 'failed'")
        .await?;
    assert!(failures >= 2);
    assert!(
        c.scheduler_metric(0, "clawdeploy_acme_orders_total{result=\"failed\"}")
            .await?
            >= 2.0
    );
    // The CA's requests all went to the second edge, which answered them
    // from its own route stream; the first saw none.
    let second = _second.as_ref().context("second edge")?.1;
    let answered = "clawdeploy_edge_acme_challenges_total{result=\"answered\"}";
    assert!(c.metric_at(second, answered).await? >= 4.0);
    assert_eq!(c.edge_metric(answered).await.unwrap_or(0.0), 0.0);
    Ok(())
}
