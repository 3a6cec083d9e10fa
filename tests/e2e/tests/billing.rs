//! Billing end to end, with Stripe replaced only by the local stand-in
//! (`clawdeploy-stripe-standin`, a real HTTP server serving Stripe's own
//! sample objects and sending webhooks signed as Stripe signs them): a
//! customer upgrades through Checkout and the container is resized live,
//! the portal opens, and when payments fail for good the grace period ends
//! in the free tier, live again.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use clawdeploy_e2e::ops::{docker_limits, Poller};
use clawdeploy_e2e::{bin_dir, free_addr, wait_for, Cluster, ClusterOptions, BASE_DOMAIN};
use reqwest::Method;
use serde_json::{json, Value};

const ORIGIN: &str = "http://app.clawdeploy.localhost";
const WHSEC: &str = "whsec_e2e_billing";

struct Standin(Child);

impl Drop for Standin {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until Docker enforces `want` (millicores, bytes) on the container,
/// and checks it was not restarted for it.
/// A one-node cluster (a pool of `min_idle`) billing through the Stripe
/// stand-in it starts on `stripe` (answering when this returns), with
/// `extra` scheduler flags.
async fn stripe_cluster(
    stripe: std::net::SocketAddr,
    min_idle: u32,
    extra: &[&str],
) -> Result<(Cluster, Standin)> {
    let stripe_base = format!("http://{stripe}/");
    let mut args = vec![
        "--stripe-secret-key",
        "sk_test_e2e",
        "--stripe-api-base",
        &stripe_base,
        "--stripe-webhook-secret",
        WHSEC,
        "--stripe-price-pro",
        "price_pro_e2e",
        "--public-origin",
        ORIGIN,
    ];
    args.extend_from_slice(extra);
    let c = Cluster::start(ClusterOptions {
        nodes: 1,
        min_idle,
        max_idle: min_idle * 2,
        scheduler_args: args.into_iter().map(String::from).collect(),
        ..Default::default()
    })
    .await?;
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/stripe");
    let standin = Standin(
        Command::new(bin_dir().join("clawdeploy-stripe-standin"))
            .args(["--listen", &stripe.to_string()])
            .args([
                "--webhook-url",
                &format!("http://{}/api/billing/webhook", c.http),
            ])
            .args(["--webhook-secret", WHSEC])
            .arg("--fixtures")
            .arg(&fixtures)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the Stripe stand-in")?,
    );
    wait_for(Duration::from_secs(10), "the stand-in up", || async {
        Ok(reqwest::get(format!("http://{stripe}/pay/none"))
            .await
            .is_ok())
    })
    .await?;
    Ok((c, standin))
}

async fn resized_in_place(
    c: &Cluster,
    docker_id: &str,
    started: &Value,
    want: (i64, i64),
) -> Result<()> {
    wait_for(Duration::from_secs(30), "the container resized", || async {
        let (cpu, memory, _) = docker_limits(c, docker_id)?;
        Ok((cpu, memory) == want)
    })
    .await?;
    anyhow::ensure!(
        docker_limits(c, docker_id)?.2 == *started,
        "the container restarted"
    );
    Ok(())
}

/// The account's (tier, status) from `GET /api/billing`.
async fn billing_state(http: &reqwest::Client, url: &str, token: &str) -> Result<(String, String)> {
    let v: Value = http
        .get(url)
        .bearer_auth(token)
        .send()
        .await?
        .json()
        .await?;
    let field = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
    Ok((field("tier"), field("status")))
}

#[tokio::test]
async fn an_upgrade_through_checkout_resizes_live_and_dunning_ends_in_the_free_tier() -> Result<()>
{
    let stripe = free_addr();
    let (c, _standin) = stripe_cluster(stripe, 2, &["--billing-grace-secs", "3"]).await?;
    c.wait_idle_at_least(2, Duration::from_secs(120)).await?;
    let (token, gw) = c
        .sign_up("payer@example.com", "payer", json!({"openai": "sk-pay"}))
        .await?;
    let docker_id: String = sqlx::query_scalar(
        "SELECT c.docker_id FROM instances i JOIN containers c ON c.id = i.container_id",
    )
    .fetch_one(&c.db)
    .await?;
    let (_, _, started) = docker_limits(&c, &docker_id)?;
    let api = |path: &str| c.api(path);
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;

    // A redirect off our origin is refused; a good request gets a page.
    let checkout = |success: &str| {
        http.post(api("/api/billing/checkout"))
            .bearer_auth(&token)
            .json(&json!({"tier": "pro", "successUrl": success, "cancelUrl": format!("{ORIGIN}/")}))
            .send()
    };
    let r = checkout("https://evil.example/").await?;
    assert_eq!(r.status(), 422);
    let r = checkout(&format!("{ORIGIN}/?upgraded=1")).await?;
    assert_eq!(r.status(), 200);
    let url = r.json::<Value>().await?["checkoutUrl"]
        .as_str()
        .context("checkoutUrl")?
        .to_owned();
    assert!(url.starts_with(&format!("http://{stripe}/pay/")), "{url}");
    assert!(http.get(&url).send().await?.text().await?.contains("Pay"));

    // Paid: the webhooks upgrade the account, and the container is resized
    // in place while a client keeps calling it.
    let polling = Poller::start(
        &c,
        format!("payer.{BASE_DOMAIN}"),
        gw.clone(),
        Duration::from_millis(50),
    );
    let paid = http.post(&url).send().await?;
    assert_eq!(
        paid.status(),
        303,
        "{}",
        paid.text().await.unwrap_or_default()
    );
    assert_eq!(
        paid.headers()["location"].to_str()?,
        format!("{ORIGIN}/?upgraded=1")
    );
    resized_in_place(&c, &docker_id, &started, (1000, 1 << 30)).await?;
    assert_eq!(
        billing_state(&http, &api("/api/billing"), &token).await?,
        ("pro".into(), "active".into())
    );
    let (_, me) = c.my_instance(Method::GET, &token, None).await?;
    assert_eq!(me["instance"]["tier"], "pro");
    let seen = polling.stop().await?;
    assert!(
        seen.iter().all(|(_, ok)| *ok),
        "the tenant answered throughout"
    );

    // The portal opens for a paying customer.
    let r = http
        .post(api("/api/billing/portal"))
        .bearer_auth(&token)
        .json(&json!({"returnUrl": format!("{ORIGIN}/")}))
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    assert!(r.json::<Value>().await?["portalUrl"]
        .as_str()
        .is_some_and(|u| u.contains("/portal/")));

    // Payments fail: past_due keeps pro; Stripe gives up (unpaid): a grace
    // period (3 s here), then free, resized down live.
    let sub: String = sqlx::query_scalar("SELECT subscription_id FROM billing_accounts")
        .fetch_one(&c.db)
        .await?;
    for status in ["past_due", "unpaid"] {
        let r = http
            .post(format!("http://{stripe}/_test/subscriptions/{sub}"))
            .json(&json!({"status": status}))
            .send()
            .await?;
        assert_eq!(r.status(), 204, "{status}");
        if status == "past_due" {
            assert_eq!(
                billing_state(&http, &api("/api/billing"), &token).await?,
                ("pro".into(), "past_due".into())
            );
        }
        // Webhook `created` times are in whole seconds: keep them apart.
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    resized_in_place(&c, &docker_id, &started, (500, 512 << 20)).await?;
    assert_eq!(
        billing_state(&http, &api("/api/billing"), &token).await?,
        ("free".into(), "canceled".into())
    );
    Ok(())
}

/// Every row of every table, as text.
async fn every_row(c: &Cluster) -> Result<String> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables
          WHERE table_schema = 'public' AND table_type = 'BASE TABLE'",
    )
    .fetch_all(&c.db)
    .await?;
    let mut all = String::new();
    for t in tables {
        let rows: Option<String> = sqlx::query_scalar(&format!(
            "SELECT string_agg(row_to_json(t)::text, '\n') FROM \"{t}\" t"
        ))
        .fetch_one(&c.db)
        .await?;
        all.push_str(&rows.unwrap_or_default());
    }
    Ok(all)
}

#[tokio::test]
async fn a_deleted_account_comes_back_within_its_grace_and_is_erased_after_it() -> Result<()> {
    use clawdeploy_e2e::ops::{placement, volume_dir};
    use clawdeploy_e2e::smtp::SmtpServer;
    let stripe = free_addr();
    let smtp = SmtpServer::start(
        &clawdeploy_e2e::workspace_root()
            .join(".local/e2e")
            .join(format!("smtp-deletion-{}", uuid::Uuid::new_v4().simple())),
    )
    .await?;
    let (c, _standin) = stripe_cluster(
        stripe,
        1,
        &["--release-grace-secs", "1", "--smtp-url", &smtp.url()],
    )
    .await?;
    c.wait_idle_at_least(1, Duration::from_secs(120)).await?;
    let email = "leaver@example.com";
    let (token, gw) = c.sign_up(email, "leaver", json!({})).await?;
    let host = format!("leaver.{BASE_DOMAIN}");
    let instance: uuid::Uuid =
        sqlx::query_scalar("SELECT id FROM instances WHERE subdomain = 'leaver'")
            .fetch_one(&c.db)
            .await?;
    let (container, node) = placement(&c, instance).await?;
    let note = volume_dir(&c, &node, container).join("notes.txt");
    std::fs::write(&note, "kept through the grace")?;

    // A paying customer: a subscription at the stand-in.
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let r = http
        .post(c.api("/api/billing/checkout"))
        .bearer_auth(&token)
        .json(&json!({"tier": "pro", "successUrl": format!("{ORIGIN}/"), "cancelUrl": format!("{ORIGIN}/")}))
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    let url = r.json::<Value>().await?["checkoutUrl"]
        .as_str()
        .context("checkoutUrl")?
        .to_owned();
    assert_eq!(http.post(&url).send().await?.status(), 303);
    let sub: String = sqlx::query_scalar(
        "SELECT subscription_id FROM billing_accounts WHERE subscription_id IS NOT NULL",
    )
    .fetch_one(&c.db)
    .await?;
    let subscription = || async {
        let v: Value = http
            .get(format!("http://{stripe}/v1/subscriptions/{sub}"))
            .bearer_auth("sk_test_e2e")
            .send()
            .await?
            .json()
            .await?;
        anyhow::Ok(v)
    };
    let delete = |token: String| {
        let http = http.clone();
        let url = c.api("/api/account");
        async move {
            let r = http
                .delete(url)
                .bearer_auth(token)
                .json(&json!({"password": "correct-horse-battery"}))
                .send()
                .await?;
            anyhow::Ok(r.status().as_u16())
        }
    };

    // The account moves to a new address first: Stripe's customer follows.
    let old_email = email;
    let email = "leaver-new@example.com";
    let r = http
        .post(c.api("/api/account/email"))
        .bearer_auth(&token)
        .json(&json!({"newEmail": email, "password": "correct-horse-battery"}))
        .send()
        .await?;
    assert_eq!(r.status(), 202);
    let link = smtp
        .link_token(email, "Confirm your new email address", "verify-email")
        .await?;
    let r = http
        .post(c.api("/api/auth/verify-email"))
        .json(&json!({ "token": link }))
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    let customer: String = sqlx::query_scalar("SELECT customer_id FROM billing_accounts")
        .fetch_one(&c.db)
        .await?;
    wait_for(
        Duration::from_secs(20),
        "Stripe's customer moved",
        || async {
            let v: Value = http
                .get(format!("http://{stripe}/v1/customers/{customer}"))
                .bearer_auth("sk_test_e2e")
                .send()
                .await?
                .json()
                .await?;
            Ok(v["email"] == email)
        },
    )
    .await?;

    // Deleted: the session ends, the gateway pauses and says why, the
    // subscription is set to end with its period.
    assert_eq!(delete(token.clone()).await?, 202);
    let r = http
        .get(c.api("/api/account"))
        .bearer_auth(&token)
        .send()
        .await?;
    assert_eq!(r.status(), 401);
    wait_for(Duration::from_secs(20), "the edge to pause it", || async {
        Ok(c.edge_get(&host, "/v1/models", Some(&gw)).await?.0 == 403)
    })
    .await?;
    let (_, body) = c.edge_get(&host, "/v1/models", Some(&gw)).await?;
    assert!(body.contains("being deleted"), "{body}");
    wait_for(Duration::from_secs(20), "Stripe told", || async {
        Ok(subscription().await?["cancel_at_period_end"] == true)
    })
    .await?;

    // The mailed link undoes it: the same container, its state kept; the
    // subscription continues.
    let undo = smtp
        .link_token(
            email,
            "Your ClawDeploy account will be deleted",
            "undo-deletion",
        )
        .await?;
    let r = http
        .post(c.api("/api/auth/undo-deletion"))
        .json(&json!({"token": undo}))
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    wait_for(Duration::from_secs(5), "the gateway back", || async {
        Ok(c.edge_get(&host, "/v1/models", Some(&gw)).await?.0 == 200)
    })
    .await?;
    assert_eq!(placement(&c, instance).await?, (container, node.clone()));
    assert_eq!(std::fs::read_to_string(&note)?, "kept through the grace");
    wait_for(Duration::from_secs(20), "Stripe told again", || async {
        Ok(subscription().await?["cancel_at_period_end"] == false)
    })
    .await?;

    // Deleted again and left past the 30 days (shifted in the database):
    // erased.
    let r = http
        .post(c.api("/api/auth/login"))
        .json(&json!({"email": email, "password": "correct-horse-battery"}))
        .send()
        .await?;
    let token = r.json::<Value>().await?["token"]
        .as_str()
        .context("token")?
        .to_owned();
    assert_eq!(delete(token).await?, 202);
    sqlx::query(
        "UPDATE users SET deletion_requested_at = now() - interval '31 days' WHERE email = $1",
    )
    .bind(email)
    .execute(&c.db)
    .await?;
    wait_for(Duration::from_secs(30), "the account erased", || async {
        Ok(
            c.count("SELECT count(*) FROM users WHERE purged_at IS NOT NULL")
                .await?
                == 1,
        )
    })
    .await?;
    wait_for(
        Duration::from_secs(20),
        "the subscription cancelled",
        || async { Ok(subscription().await?["status"] == "canceled") },
    )
    .await?;
    assert_eq!(c.edge_get(&host, "/v1/models", Some(&gw)).await?.0, 404);
    wait_for(
        Duration::from_secs(60),
        "the container destroyed",
        || async {
            let out = std::process::Command::new("docker")
                .args(["ps", "-aq", "--filter"])
                .arg(format!("label=clawdeploy.container={container}"))
                .output()?;
            Ok(out.stdout.is_empty())
        },
    )
    .await?;
    let all = every_row(&c).await?;
    assert!(
        all.contains("\"subdomain\":\"leaver\""),
        "the dump holds the tables"
    );
    for personal in [email, old_email, "cus_"] {
        assert!(!all.contains(personal), "{personal} is still stored");
    }
    let r = http
        .post(c.api("/api/auth/login"))
        .json(&json!({"email": email, "password": "correct-horse-battery"}))
        .send()
        .await?;
    assert_eq!(r.status(), 401);
    Ok(())
}

/// What the account's AI credits are (balance and leases unspent).
async fn balance(c: &Cluster, token: &str) -> Result<i64> {
    let r: Value = c
        .client
        .get(c.api("/api/credits"))
        .bearer_auth(token)
        .send()
        .await?
        .json()
        .await?;
    r["balanceMicros"].as_i64().context("balanceMicros")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credits_bought_through_checkout_and_topped_up_off_session_arrive_once() -> Result<()> {
    let stripe = free_addr();
    let (c, _standin) = stripe_cluster(stripe, 1, &[]).await?;
    let (token, _) = c.sign_up("buyer@example.com", "buyer", json!({})).await?;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let post = |path: &str, body: Value| {
        http.post(c.api(path))
            .bearer_auth(&token)
            .header("idempotency-key", uuid::Uuid::new_v4().to_string())
            .json(&body)
            .send()
    };
    assert_eq!(balance(&c, &token).await?, 0);
    // Out of range amounts are refused.
    for cents in [499, 50_001, -5] {
        let r = post(
            "/api/credits/checkout",
            json!({"amountCents": cents,
            "successUrl": format!("{ORIGIN}/"), "cancelUrl": format!("{ORIGIN}/")}),
        )
        .await?;
        assert_eq!(r.status(), 422, "{cents}");
    }
    // No card saved yet: a top-up is refused.
    let r = post("/api/credits/top-up", json!({"amountCents": 1000})).await?;
    assert_eq!(r.status(), 409);

    // $20 through Checkout (payment mode): once, however often Stripe
    // delivers its webhooks.
    let r = post(
        "/api/credits/checkout",
        json!({"amountCents": 2000,
        "successUrl": format!("{ORIGIN}/?credits=1"), "cancelUrl": format!("{ORIGIN}/")}),
    )
    .await?;
    assert_eq!(r.status(), 200);
    let url = r.json::<Value>().await?["checkoutUrl"]
        .as_str()
        .context("checkoutUrl")?
        .to_owned();
    let paid = http
        .post(&url)
        .form(&[("card", "authenticationRequired")])
        .send()
        .await?;
    assert_eq!(
        paid.status(),
        303,
        "{}",
        paid.text().await.unwrap_or_default()
    );
    assert_eq!(balance(&c, &token).await?, 20_000_000);
    for kind in ["checkout.session.completed", "payment_intent.succeeded"] {
        for _ in 0..2 {
            let r = http
                .post(format!("http://{stripe}/_test/events/resend"))
                .json(&json!({"type": kind}))
                .send()
                .await?;
            assert!(r.status().is_success());
        }
    }
    assert_eq!(balance(&c, &token).await?, 20_000_000, "applied once");
    let unreadable: i64 = sqlx::query_scalar("SELECT count(*) FROM stripe_unreadable_events")
        .fetch_one(&c.db)
        .await?;
    assert_eq!(unreadable, 0, "every event parsed");

    // An off-session top-up the bank wants authenticated changes nothing
    // until the customer authenticates and payment_intent.succeeded comes.
    let r = post("/api/credits/top-up", json!({"amountCents": 1000})).await?;
    assert_eq!(r.status(), 200);
    let up: Value = r.json().await?;
    assert_eq!(up["requiresAction"], true, "{up}");
    assert!(
        up["clientSecret"]
            .as_str()
            .is_some_and(|s| s.contains("_secret_")),
        "{up}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        balance(&c, &token).await?,
        20_000_000,
        "nothing before authentication"
    );
    let pi = up["paymentIntent"].as_str().context("paymentIntent")?;
    let r = http
        .post(format!(
            "http://{stripe}/_test/payment_intents/{pi}/authenticate"
        ))
        .send()
        .await?;
    assert!(r.status().is_success());
    assert_eq!(balance(&c, &token).await?, 30_000_000);

    // A refund of the top-up takes its $10 back; a dispute of the first
    // purchase takes what is left (never below zero).
    let r = http
        .post(format!("http://{stripe}/_test/payment_intents/{pi}/refund"))
        .send()
        .await?;
    assert!(r.status().is_success());
    assert_eq!(balance(&c, &token).await?, 20_000_000);
    let first: String = sqlx::query_scalar(
        "SELECT payment_intent_id FROM credit_purchases WHERE kind = 'checkout'",
    )
    .fetch_one(&c.db)
    .await?;
    sqlx::query("UPDATE credit_balances SET balance_micros = 5000000")
        .execute(&c.db)
        .await?;
    let r = http
        .post(format!(
            "http://{stripe}/_test/payment_intents/{first}/dispute"
        ))
        .send()
        .await?;
    assert!(r.status().is_success());
    assert_eq!(
        balance(&c, &token).await?,
        0,
        "taken back down to zero, not below"
    );
    let unreadable: i64 = sqlx::query_scalar("SELECT count(*) FROM stripe_unreadable_events")
        .fetch_one(&c.db)
        .await?;
    assert_eq!(unreadable, 0, "the refund and the dispute parsed");
    Ok(())
}
