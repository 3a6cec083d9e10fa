//! The signup page in a real browser: headless Chromium (Debian's
//! `chromium` and `chromium-driver`) driven over WebDriver signs up through
//! the page, reads the URL and gateway token it shows, and the URL answers
//! through the edge with that token; the dashboard then shows the instance,
//! and an upgrade through the local Stripe stand-in's checkout shows the new
//! tier.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use clawdeploy_e2e::{bin_dir, free_addr, wait_for, Cluster, ClusterOptions, BASE_DOMAIN};
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::json;

struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn browser(dir: &std::path::Path) -> Result<(Driver, Client)> {
    let port = free_addr().port();
    let driver = Driver(
        Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting chromedriver (apt-get install chromium chromium-driver)")?,
    );
    let status = format!("http://127.0.0.1:{port}/status");
    wait_for(Duration::from_secs(20), "chromedriver", || async {
        Ok(reqwest::get(&status).await?.status().is_success())
    })
    .await?;
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({"args": [
            "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
            format!("--user-data-dir={}", dir.join("chromium").display()),
        ]}),
    );
    let client = ClientBuilder::new(HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .context("opening a Chromium session")?;
    Ok((driver, client))
}

/// The text of element `id` once `ready` accepts it.
async fn text_when(
    b: &Client,
    id: &str,
    within: Duration,
    ready: impl Fn(&str) -> bool,
) -> Result<String> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let text = b.find(Locator::Id(id)).await?.text().await?;
        if ready(&text) {
            return Ok(text);
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "#{id} still says {text:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_signs_up_in_a_real_browser_and_the_url_answers() -> Result<()> {
    let stripe = free_addr();
    let c = Cluster::start(ClusterOptions {
        nodes: 1,
        min_idle: 2,
        scheduler_args: [
            "--stripe-secret-key",
            "sk_test_browser",
            "--stripe-api-base",
            &format!("http://{stripe}/"),
            "--stripe-webhook-secret",
            "whsec_browser",
            "--stripe-price-pro",
            "price_browser_pro",
        ]
        .map(String::from)
        .to_vec(),
        ..Default::default()
    })
    .await?;
    let _stripe = Driver(
        Command::new(bin_dir().join("clawdeploy-stripe-standin"))
            .args(["--listen", &stripe.to_string()])
            .args([
                "--webhook-url",
                &format!("http://{}/api/billing/webhook", c.http),
            ])
            .args(["--webhook-secret", "whsec_browser"])
            .arg("--fixtures")
            .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/stripe"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the Stripe stand-in")?,
    );
    c.wait_idle(2, false, Duration::from_secs(120)).await?;
    // A name someone already has, to see the availability check say so.
    c.sign_up("first@example.com", "taken-name", json!({}))
        .await?;
    // The page runs only its own script (by hash): what follows shows it runs.
    let page = c.client.get(c.api("/")).send().await?;
    let csp = page.headers()["content-security-policy"]
        .to_str()?
        .to_owned();
    assert!(csp.contains("script-src 'sha256-"), "{csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    let (_driver, b) = browser(&c.dir).await?;
    let result = async {
        b.goto(&format!("http://{}/", c.http)).await?;
        let field = |id: &'static str| b.find(Locator::Id(id));
        field("email")
            .await?
            .send_keys("browser@example.com")
            .await?;
        field("password")
            .await?
            .send_keys("a-good-long-password")
            .await?;
        field("subdomain").await?.send_keys("taken-name").await?;
        text_when(&b, "availability", Duration::from_secs(10), |t| {
            t.contains("is taken")
        })
        .await?;
        field("subdomain").await?.clear().await?;
        field("subdomain").await?.send_keys("browser").await?;
        text_when(&b, "availability", Duration::from_secs(10), |t| {
            t == format!("browser.{BASE_DOMAIN} is available")
        })
        .await?;
        field("key")
            .await?
            .send_keys("sk-browser-test-0123456789")
            .await?;
        field("create").await?.click().await?;

        let url = text_when(&b, "result-url", Duration::from_secs(30), |t| !t.is_empty()).await?;
        let token = text_when(&b, "result-token", Duration::from_secs(5), |t| {
            !t.is_empty()
        })
        .await?;
        assert_eq!(
            url,
            format!("http://browser.{BASE_DOMAIN}:{}", c.edge.port())
        );
        let (status, models) = c
            .edge_get(
                &format!("browser.{BASE_DOMAIN}"),
                "/v1/models",
                Some(&token),
            )
            .await?;
        assert_eq!(status, 200, "{models}");
        assert!(models.contains("openai"), "{models}");
        // The dashboard shows the instance, its key masked.
        text_when(&b, "dash-status", Duration::from_secs(10), |t| t == "ready").await?;
        let keys = text_when(&b, "dash-keys", Duration::from_secs(5), |t| t != "none").await?;
        assert_eq!(keys, "openai sk-…6789");
        let page = b.source().await?;
        assert!(
            !page.contains("sk-browser-test-0123456789"),
            "the key is shown in full"
        );
        // Upgrade: the page sends us to the (local) Checkout; paying there
        // brings us back, and the dashboard shows the new tier. Billing
        // wants a proven address: proven here as its link would prove it
        // (the link has a test of its own).
        sqlx::query(
            "UPDATE users SET email_verified_at = now() WHERE email = 'browser@example.com'",
        )
        .execute(&c.db)
        .await?;
        assert_eq!(
            text_when(&b, "dash-tier", Duration::from_secs(5), |t| !t.is_empty()).await?,
            "free"
        );
        b.wait()
            .at_most(Duration::from_secs(10))
            .for_element(Locator::Id("upgrade-pro"))
            .await?
            .click()
            .await?;
        b.wait()
            .at_most(Duration::from_secs(10))
            .for_element(Locator::Id("pay"))
            .await?
            .click()
            .await?;
        let home = format!("http://{}/", c.http);
        wait_for(Duration::from_secs(10), "back on the page", || async {
            Ok(b.current_url().await?.as_str() == home)
        })
        .await?;
        wait_for(
            Duration::from_secs(20),
            "the dashboard showing pro",
            || async {
                b.refresh().await?;
                Ok(
                    text_when(&b, "dash-tier", Duration::from_secs(5), |t| !t.is_empty()).await?
                        == "pro",
                )
            },
        )
        .await?;
        // A payment fails (the stand-in sends the subscription's update):
        // the dashboard says so.
        let sub: String = sqlx::query_scalar("SELECT subscription_id FROM billing_accounts")
            .fetch_one(&c.db)
            .await?;
        let r = reqwest::Client::new()
            .post(format!("http://{stripe}/_test/subscriptions/{sub}"))
            .json(&json!({"status": "past_due"}))
            .send()
            .await?;
        assert_eq!(r.status(), 204);
        b.refresh().await?;
        let banner = text_when(&b, "billing-banner", Duration::from_secs(10), |t| {
            !t.is_empty()
        })
        .await?;
        assert!(banner.contains("payment failed"), "{banner}");

        // Model usage and AI credits, as the spec draws them; credits are
        // bought through the stand-in's Checkout and show once paid.
        sqlx::query(
            "INSERT INTO llm_usage_monthly (instance_id, month, model, pay_mode, user_id, messages, input_tokens, output_tokens)
             SELECT id, date_trunc('month', now() AT TIME ZONE 'UTC')::date, 'openai/gpt-4o', 'byok', user_id, 3, 40000, 5000
               FROM instances WHERE subdomain = 'browser'",
        )
        .execute(&c.db)
        .await?;
        b.refresh().await?;
        assert_eq!(text_when(&b, "usage-messages", Duration::from_secs(10), |t| !t.is_empty()).await?, "3");
        assert_eq!(text_when(&b, "usage-tokens", Duration::from_secs(5), |t| !t.is_empty()).await?, "45K");
        assert_eq!(text_when(&b, "usage-balance", Duration::from_secs(5), |t| !t.is_empty()).await?, "$0.0000");
        b.find(Locator::Id("buy-credits")).await?.click().await?;
        b.wait()
            .at_most(Duration::from_secs(10))
            .for_element(Locator::Id("pay"))
            .await?
            .click()
            .await?;
        wait_for(Duration::from_secs(20), "the dashboard showing $20", || async {
            b.refresh().await?;
            Ok(text_when(&b, "usage-balance", Duration::from_secs(5), |t| !t.is_empty()).await? == "$20.00")
        })
        .await?;
        anyhow::Ok(())
    }
    .await;
    b.close().await.ok();
    result
}

/// Types `text` into the field `id`.
async fn type_into(b: &Client, id: &str, text: &str) -> Result<()> {
    let typed = async {
        let f = b
            .wait()
            .at_most(Duration::from_secs(10))
            .for_element(Locator::Id(id))
            .await?;
        f.clear().await?;
        f.send_keys(text).await?;
        anyhow::Ok(())
    };
    typed.await.with_context(|| format!("typing into #{id}"))
}

async fn click(b: &Client, id: &str) -> Result<()> {
    let clicked = async {
        b.wait()
            .at_most(Duration::from_secs(10))
            .for_element(Locator::Id(id))
            .await?
            .click()
            .await?;
        anyhow::Ok(())
    };
    clicked.await.with_context(|| format!("clicking #{id}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_password_and_two_factor_sign_in_go_through_the_page() -> Result<()> {
    use clawdeploy_e2e::{smtp::SmtpServer, totp};
    let email = "two-steps@example.com";
    let new_password = "a-fresh-long-passphrase";
    let smtp = SmtpServer::start(
        &clawdeploy_e2e::workspace_root()
            .join(".local/e2e")
            .join(format!("smtp-browser-{}", uuid::Uuid::new_v4().simple())),
    )
    .await?;
    let c = Cluster::start(ClusterOptions {
        nodes: 1,
        min_idle: 0,
        scheduler_args: vec!["--smtp-url".into(), smtp.url()],
        ..Default::default()
    })
    .await?;
    c.register(email).await?;
    let (_driver, b) = browser(&c.dir).await?;
    let home = format!("http://{}/", c.http);
    let secrets = std::cell::RefCell::new(vec![new_password.to_owned()]);
    let result = async {
        // Forgot: asked from the login form; the link comes by mail.
        b.goto(&home).await?;
        click(&b, "show-login").await?;
        type_into(&b, "login-email", email).await?;
        click(&b, "forgot").await?;
        text_when(&b, "login-error", Duration::from_secs(10), |t| {
            t.contains("on its way")
        })
        .await?;
        let token = smtp
            .link_token(email, "Reset your ClawDeploy password", "reset-password")
            .await?;
        secrets.borrow_mut().push(token.clone());
        // The link as mailed, opened on this scheduler's page.
        b.goto(&format!("{home}#reset-password={token}")).await?;
        type_into(&b, "reset-password", new_password).await?;
        b.find(Locator::Css("#reset button[type=submit]"))
            .await?
            .click()
            .await?;
        text_when(&b, "verified", Duration::from_secs(10), |t| {
            t.contains("Your password is set")
        })
        .await?;
        assert!(
            !b.current_url().await?.as_str().contains(&token),
            "the token leaves the address bar"
        );
        // Sign in with it.
        type_into(&b, "login-email", email).await?;
        type_into(&b, "login-password", new_password).await?;
        b.find(Locator::Css("#login button[type=submit]"))
            .await?
            .click()
            .await?;
        text_when(&b, "acct-email", Duration::from_secs(10), |t| t == email).await?;

        // Two-factor sign-in: the page shows the secret (and its QR code);
        // the code comes from an independent RFC 6238.
        type_into(&b, "mfa-password", new_password).await?;
        click(&b, "mfa-begin").await?;
        let secret =
            text_when(&b, "mfa-secret", Duration::from_secs(10), |t| !t.is_empty()).await?;
        secrets.borrow_mut().push(secret.clone());
        let qr = b
            .find(Locator::Id("mfa-qr"))
            .await?
            .attr("src")
            .await?
            .unwrap_or_default();
        assert!(qr.starts_with("data:image/png;base64,"), "{qr:.40}");
        let natural: serde_json::Value = b
            .execute(
                "return document.getElementById('mfa-qr').naturalWidth;",
                vec![],
            )
            .await?;
        assert!(natural.as_u64().unwrap_or(0) > 0, "the QR code is drawn");
        type_into(&b, "mfa-code", &totp::code(&secret, 0)?).await?;
        click(&b, "mfa-confirm").await?;
        let codes = text_when(&b, "mfa-recovery", Duration::from_secs(10), |t| {
            !t.is_empty()
        })
        .await?;
        assert_eq!(codes.lines().count(), 10, "{codes}");
        secrets
            .borrow_mut()
            .extend(codes.lines().map(str::to_owned));
        text_when(&b, "acct-mfa", Duration::from_secs(10), |t| {
            t == "two-factor sign-in on"
        })
        .await?;

        // Signed out everywhere, then in again: the password, then a code
        // (the next step's: the one used to confirm cannot serve twice).
        click(&b, "sign-out-everywhere").await?;
        wait_for(Duration::from_secs(10), "the page signed out", || async {
            Ok(!b.find(Locator::Id("account")).await?.is_displayed().await?)
        })
        .await?;
        click(&b, "show-login").await?;
        type_into(&b, "login-email", email).await?;
        type_into(&b, "login-password", new_password).await?;
        b.find(Locator::Css("#login button[type=submit]"))
            .await?
            .click()
            .await?;
        type_into(&b, "mfa-login-code", &totp::code(&secret, 1)?).await?;
        click(&b, "mfa-login-submit").await?;
        text_when(&b, "acct-email", Duration::from_secs(10), |t| t == email).await?;
        let log = text_when(&b, "security-log", Duration::from_secs(10), |t| {
            t.contains("mfa enabled")
        })
        .await?;
        assert!(log.contains("login succeeded"), "{log}");
        let sessions = b.find(Locator::Id("sessions")).await?.text().await?;
        assert!(sessions.contains("This session"), "{sessions}");
        anyhow::Ok(())
    }
    .await;
    b.close().await.ok();
    result?;

    // Nothing secret in any log of the run.
    for entry in std::fs::read_dir(c.dir.join("logs"))? {
        let path = entry?.path();
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        for s in secrets.borrow().iter() {
            let s = s.trim();
            assert!(
                s.is_empty() || !text.contains(s),
                "{} holds a secret",
                path.display()
            );
        }
    }
    Ok(())
}
