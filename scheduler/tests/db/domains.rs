//! Custom domains: the rules, DNS ownership checks against a real DNS
//! server on loopback, and the ACME rate caps.

use std::time::Duration;

use clawdeploy_scheduler::app::Config;
use clawdeploy_scheduler::lifecycle::claim;
use serde_json::{json, Value};

use crate::support::*;

#[tokio::test]
async fn custom_domains_need_a_plan_are_normalized_owned_once_and_bounded() {
    let app = app_with(Config {
        max_domains_per_instance: 2,
        edge_addresses: vec![
            "203.0.113.7".parse().unwrap(),
            "2001:db8::7".parse().unwrap(),
        ],
        ..Config::default()
    })
    .await;
    node(&app, "n1").await;
    idle(&app, "n1", 2).await;
    let base = serve(app.clone()).await;
    let mut tokens = Vec::new();
    for (email, sub) in [
        ("owner@example.com", "owner"),
        ("rival@example.com", "rival"),
    ] {
        let s = register(&app, email, "").await;
        let c = claim::claim(&app, request(s.user_id, sub)).await.unwrap();
        tokens.push((s.token, c.instance_id));
    }
    let http = reqwest::Client::new();
    let add = |token: &str, hostname: &str| {
        http.post(format!("{base}/api/instances/me/domains"))
            .bearer_auth(token)
            .json(&json!({"hostname": hostname}))
            .send()
    };
    let (owner, rival) = (&tokens[0], &tokens[1]);

    // The free tier has no custom domains.
    let r = add(&owner.0, "chat.example.org").await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "plan_required"
    );
    for (_, instance) in &tokens {
        clawdeploy_scheduler::billing::tier::set_tier(
            &app,
            *instance,
            clawdeploy_scheduler::model::Tier::Pro,
            "test",
        )
        .await
        .unwrap();
    }

    // Normalized, with the records to create.
    let r = add(&owner.0, " Chat.Example.ORG. ").await.unwrap();
    assert_eq!(r.status(), 201);
    let d = r.json::<Value>().await.unwrap()["domain"].clone();
    assert_eq!(d["hostname"], "chat.example.org");
    assert_eq!(d["state"], "pending_dns");
    assert_eq!(d["records"][0]["type"], "TXT");
    assert_eq!(
        d["records"][0]["name"],
        "_clawdeploy-challenge.chat.example.org"
    );
    assert!(
        d["records"][0]["value"].as_str().unwrap().len() >= 32,
        "{d}"
    );
    assert_eq!(d["records"][1]["type"], "CNAME");
    assert_eq!(d["records"][1]["value"], "owner.clawdeploy.localhost");

    // Once per instance; another account may claim the name too (with its
    // own token), but only a TXT check makes it the owner (the custom
    // domains end-to-end test shows the move); bad names refused; an apex
    // gets A and AAAA.
    let r = add(&owner.0, "chat.example.org").await.unwrap();
    assert_eq!(r.status(), 409);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "domain_exists"
    );
    let r = add(&rival.0, "CHAT.example.org").await.unwrap();
    assert_eq!(r.status(), 201);
    let claim = r.json::<Value>().await.unwrap()["domain"].clone();
    assert_eq!(claim["state"], "pending_dns");
    assert_ne!(claim["records"][0]["value"], d["records"][0]["value"]);
    for bad in [
        "10.0.0.1",
        "x.clawdeploy.localhost",
        "*.example.org",
        "intranet",
    ] {
        assert_eq!(add(&owner.0, bad).await.unwrap().status(), 422, "{bad}");
    }
    let r = add(&owner.0, "example.net").await.unwrap();
    assert_eq!(r.status(), 201);
    let d = r.json::<Value>().await.unwrap()["domain"].clone();
    let kinds: Vec<(&str, &str)> = d["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["type"].as_str().unwrap(), r["value"].as_str().unwrap()))
        .collect();
    assert_eq!(kinds[1..], [("A", "203.0.113.7"), ("AAAA", "2001:db8::7")]);

    // The bound (2 here), the list, removal.
    let r = add(&owner.0, "third.example.org").await.unwrap();
    assert_eq!(r.status(), 409);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "domain_limit"
    );
    let list: Value = http
        .get(format!("{base}/api/instances/me/domains"))
        .bearer_auth(&owner.0)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["domains"].as_array().unwrap().len(), 2, "{list}");
    let delete = || {
        http.delete(format!("{base}/api/instances/me/domains/chat.example.org"))
            .bearer_auth(&owner.0)
            .send()
    };
    assert_eq!(delete().await.unwrap().status(), 204);
    assert_eq!(delete().await.unwrap().status(), 404);
    // The rival's claim is untouched by the owner's removal (and cannot
    // be made twice).
    assert_eq!(
        add(&rival.0, "chat.example.org").await.unwrap().status(),
        409
    );
}

/// Debian's `pebble-challtestsrv` on loopback: a DNS server whose records a
/// test sets through its management API. Killed when dropped.
struct Challtestsrv {
    child: std::process::Child,
    dns: std::net::SocketAddr,
    management: String,
}

impl Drop for Challtestsrv {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn challtestsrv() -> Challtestsrv {
    let (dns, management) = (free_port(), free_port());
    let child = std::process::Command::new("pebble-challtestsrv")
        .args(["-dns01", &format!("127.0.0.1:{dns}")])
        .args(["-management", &format!("127.0.0.1:{management}")])
        .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("pebble-challtestsrv (Debian's pebble; scripts/test installs it)");
    let management = format!("http://127.0.0.1:{management}");
    for _ in 0..100 {
        if reqwest::Client::new()
            .post(format!("{management}/clear-txt"))
            .json(&json!({"host": "warmup.example."}))
            .send()
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Challtestsrv {
        child,
        dns: format!("127.0.0.1:{dns}").parse().unwrap(),
        management,
    }
}

#[tokio::test]
async fn a_domain_is_verified_once_its_txt_record_holds_the_token() {
    let dns = challtestsrv().await;
    let app = app_with(Config {
        dns_nameservers: vec![dns.dns],
        ..Config::default()
    })
    .await;
    node(&app, "n1").await;
    idle(&app, "n1", 1).await;
    let base = serve(app.clone()).await;
    let s = register(&app, "dns@example.com", "").await;
    let c = claim::claim(&app, request(s.user_id, "dnsowner"))
        .await
        .unwrap();
    clawdeploy_scheduler::billing::tier::set_tier(
        &app,
        c.instance_id,
        clawdeploy_scheduler::model::Tier::Pro,
        "test",
    )
    .await
    .unwrap();
    let http = reqwest::Client::new();
    let d: Value = http
        .post(format!("{base}/api/instances/me/domains"))
        .bearer_auth(&s.token)
        .json(&json!({"hostname": "chat.example.org"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = d["domain"]["records"][0]["value"]
        .as_str()
        .unwrap()
        .to_owned();
    let verify = || async {
        let r = http
            .post(format!(
                "{base}/api/instances/me/domains/chat.example.org/verify"
            ))
            .bearer_auth(&s.token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json::<Value>().await.unwrap()["domain"].clone()
    };
    // No record yet (NXDOMAIN): still pending, and the customer is told why.
    let d = verify().await;
    assert_eq!(d["state"], "pending_dns", "{d}");
    assert!(
        d["reason"]
            .as_str()
            .unwrap()
            .contains("_clawdeploy-challenge.chat.example.org"),
        "{d}"
    );
    // A wrong value: still pending.
    let set = |value: String| {
        http.post(format!("{}/set-txt", dns.management))
            .json(&json!({"host": "_clawdeploy-challenge.chat.example.org.", "value": value}))
            .send()
    };
    set("not-the-token".into()).await.unwrap();
    assert_eq!(verify().await["state"], "pending_dns");
    // The token: verified at once (no cache between checks).
    http.post(format!("{}/clear-txt", dns.management))
        .json(&json!({"host": "_clawdeploy-challenge.chat.example.org."}))
        .send()
        .await
        .unwrap();
    set(token).await.unwrap();
    let d = verify().await;
    assert_eq!(
        (d["state"].as_str(), d["reason"].as_str()),
        (Some("verified"), Some("")),
        "{d}"
    );
}

#[tokio::test]
async fn acme_orders_wait_for_the_rate_caps_without_asking_the_ca() {
    // A CA nobody listens on: an order that reached it would fail loudly.
    let app = app_with(Config {
        acme: Some(clawdeploy_scheduler::acme::AcmeConfig {
            directory_url: "https://127.0.0.1:1/dir".into(),
            ca_bundle: None,
            contact: None,
        }),
        acme_orders_per_hostname_per_hour: 2,
        ..Config::default()
    })
    .await;
    let instance = instance(&app, "capped", None).await;
    sqlx::query(
        "INSERT INTO domains (hostname, instance_id, user_id, token, state)
         SELECT 'capped.example.org', id, user_id, 't', 'verified' FROM instances WHERE id = $1",
    )
    .bind(instance)
    .execute(&app.db)
    .await
    .unwrap();
    // Two orders for the name in the last hour (the oldest 50 minutes ago).
    sqlx::query(
        "INSERT INTO acme_orders (hostname, renewal, started_at, result)
         VALUES ('capped.example.org', false, now() - interval '50 minutes', 'failed'),
                ('capped.example.org', false, now() - interval '5 minutes', 'failed')",
    )
    .execute(&app.db)
    .await
    .unwrap();
    let tried = clawdeploy_scheduler::domains::issue::run_due(&app, 4)
        .await
        .unwrap();
    assert_eq!(tried, 1);
    let (state, reason, wait_secs): (String, String, f64) = sqlx::query_as(
        "SELECT state, reason, EXTRACT(EPOCH FROM next_attempt_at - now())::float8 FROM domains",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(state, "verified");
    assert!(reason.contains("rate limit"), "{reason}");
    // It waits until the oldest order leaves the hour: about 10 minutes.
    assert!((540.0..=600.0).contains(&wait_secs), "{wait_secs}");
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM acme_orders")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(orders, 2, "no order was started");
    // Nothing is due now.
    assert_eq!(
        clawdeploy_scheduler::domains::issue::run_due(&app, 4)
            .await
            .unwrap(),
        0
    );
}
