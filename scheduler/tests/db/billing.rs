//! Billing: Stripe's webhooks (signed as Stripe signs them) and checkout
//! over the fake provider.

use std::time::Duration;

use clawdeploy_scheduler::app::Config;
use clawdeploy_scheduler::error::Error;
use clawdeploy_scheduler::lifecycle::claim;
use serde_json::json;

use crate::support::*;

// ------------------------------------------------------------ billing ---

const WHSEC: &str = "whsec_test_secret";

/// One of Stripe's sample objects (`tests/fixtures/stripe/<name>.json`).
fn fixture(name: &str) -> serde_json::Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/stripe")
        .join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// An event around `object`, as Stripe delivers it.
fn event(id: &str, kind: &str, created: i64, object: serde_json::Value) -> String {
    let mut e = fixture("event");
    e["id"] = json!(id);
    e["type"] = json!(kind);
    e["created"] = json!(created);
    e["api_version"] = json!(null);
    e["data"] = json!({"object": object});
    e.to_string()
}

fn subscription(status: &str, price: &str, reason: Option<&str>) -> serde_json::Value {
    let mut s = fixture("subscription");
    s["id"] = json!("sub_test1");
    s["customer"] = json!("cus_test1");
    s["status"] = json!(status);
    s["items"]["data"][0]["price"]["id"] = json!(price);
    s["cancellation_details"]["reason"] = json!(reason);
    s
}

fn invoice(customer: &str) -> serde_json::Value {
    let mut i = fixture("invoice");
    i["customer"] = json!(customer);
    i
}

/// Posts a payload to the webhook with a signature header; status and body.
async fn deliver(base: &str, payload: &str, signature: &str) -> (u16, serde_json::Value) {
    let r = reqwest::Client::new()
        .post(format!("{base}/api/billing/webhook"))
        .header("stripe-signature", signature)
        .header("content-type", "application/json")
        .body(payload.to_owned())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

async fn signed(base: &str, payload: &str) -> (u16, serde_json::Value) {
    let sig = stripe_webhook::Webhook::generate_test_header(payload, WHSEC, None);
    deliver(base, payload, &sig).await
}

#[tokio::test]
async fn stripe_webhooks_are_verified_applied_once_in_order_and_end_in_grace() {
    let app = app_with(Config {
        stripe_webhook_secret: Some(WHSEC.into()),
        stripe_price_pro: Some("price_pro".into()),
        stripe_price_team: Some("price_team".into()),
        billing_grace: Duration::from_secs(1),
        ..Config::default()
    })
    .await;
    node(&app, "n1").await;
    idle(&app, "n1", 1).await;
    let session = register(&app, "payer@example.com", "Payer").await;
    let u = session.user_id;
    let claimed = claim::claim(&app, request(u, "payer")).await.unwrap();
    let container = claimed.container_id.unwrap();
    let base = serve(app.clone()).await;
    let limits = || async {
        let (tier, cpu, memory): (String, i32, i64) = sqlx::query_as(
            "SELECT i.tier, c.cpu_millis, c.memory_bytes FROM instances i JOIN containers c ON c.id = i.container_id WHERE c.id = $1",
        )
        .bind(container)
        .fetch_one(&app.db)
        .await
        .unwrap();
        (tier, cpu, memory)
    };
    let account = || async {
        sqlx::query_as::<_, (String, String)>(
            "SELECT tier, status FROM billing_accounts WHERE user_id = $1",
        )
        .bind(u)
        .fetch_one(&app.db)
        .await
        .unwrap()
    };
    let t0 = chrono::Utc::now().timestamp() - 100;

    // Checkout links customer and subscription to the account.
    let mut cs = fixture("checkout_session");
    cs["client_reference_id"] = json!(u.to_string());
    cs["customer"] = json!("cus_test1");
    cs["subscription"] = json!("sub_test1");
    let (status, body) = signed(
        &base,
        &event("evt_cs", "checkout.session.completed", t0, cs),
    )
    .await;
    assert_eq!(
        (status, body["outcome"].as_str()),
        (200, Some("linked")),
        "{body}"
    );

    // The subscription, active on pro: delivered five times at once, applied
    // once; the container is resized to pro's limits.
    let pro = event(
        "evt_sub1",
        "customer.subscription.updated",
        t0 + 10,
        subscription("active", "price_pro", None),
    );
    let answers = futures::future::join_all((0..5).map(|_| signed(&base, &pro))).await;
    let outcomes: Vec<&str> = answers
        .iter()
        .filter_map(|(_, b)| b["outcome"].as_str())
        .collect();
    assert!(answers.iter().all(|(s, _)| *s == 200), "{answers:?}");
    assert_eq!(
        outcomes.iter().filter(|o| **o == "applied").count(),
        1,
        "{outcomes:?}"
    );
    assert_eq!(
        outcomes.iter().filter(|o| **o == "duplicate").count(),
        4,
        "{outcomes:?}"
    );
    assert_eq!(limits().await, ("pro".into(), 1000, 1 << 30));
    assert_eq!(account().await, ("pro".into(), "active".into()));
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM audit_log WHERE action = 'instance.tier'"
        )
        .await,
        1
    );

    // Refused, nothing applied: a wrong signature, a stale timestamp, a
    // body changed after signing.
    let team = event(
        "evt_sub_team",
        "customer.subscription.updated",
        t0 + 20,
        subscription("active", "price_team", None),
    );
    let wrong = stripe_webhook::Webhook::generate_test_header(&team, "whsec_other", None);
    let old = stripe_webhook::Webhook::generate_test_header(
        &team,
        WHSEC,
        Some(chrono::Utc::now().timestamp() - 400),
    );
    let good = stripe_webhook::Webhook::generate_test_header(&team, WHSEC, None);
    let tampered = team.replace("price_team", "price_pro");
    for (payload, sig) in [(&team, &wrong), (&team, &old), (&tampered, &good)] {
        let (status, body) = deliver(&base, payload, sig).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["code"], "bad_request");
    }
    assert_eq!(count(&app, "SELECT count(*) FROM stripe_events").await, 2);
    assert_eq!(limits().await.0, "pro");

    // An update older than the applied state: acknowledged, not applied.
    let late = event(
        "evt_sub_late",
        "customer.subscription.updated",
        t0 + 5,
        subscription("active", "price_team", None),
    );
    let (status, body) = signed(&base, &late).await;
    assert_eq!((status, body["outcome"].as_str()), (200, Some("stale")));
    assert_eq!(limits().await.0, "pro");

    // Unknown customer, unknown type: acknowledged, no effect.
    let (status, body) = signed(
        &base,
        &event(
            "evt_inv_x",
            "invoice.payment_failed",
            t0 + 11,
            invoice("cus_nobody"),
        ),
    )
    .await;
    assert_eq!(
        (status, body["outcome"].as_str()),
        (200, Some("unknown_account"))
    );
    let (status, body) = signed(
        &base,
        &event("evt_price", "price.created", t0 + 11, fixture("price")),
    )
    .await;
    assert_eq!((status, body["outcome"].as_str()), (200, Some("ignored")));

    // Dunning: a failed payment keeps the tier (past_due); Stripe gives up
    // (unpaid): a grace period; paid during it: back to active, same tier.
    signed(
        &base,
        &event(
            "evt_inv_f1",
            "invoice.payment_failed",
            t0 + 30,
            invoice("cus_test1"),
        ),
    )
    .await;
    assert_eq!(account().await, ("pro".into(), "past_due".into()));
    // The customer hears of it once, however many events say it.
    signed(
        &base,
        &event(
            "evt_sub_past_due",
            "customer.subscription.updated",
            t0 + 35,
            subscription("past_due", "price_pro", None),
        ),
    )
    .await;
    let mails = |purpose: &'static str| {
        let app = app.clone();
        async move {
            count(
                &app,
                &format!("SELECT count(*) FROM outbox WHERE purpose = '{purpose}' AND recipient = 'payer@example.com'"),
            )
            .await
        }
    };
    assert_eq!(mails("payment_failed").await, 1);
    signed(
        &base,
        &event(
            "evt_sub_unpaid",
            "customer.subscription.updated",
            t0 + 40,
            subscription("unpaid", "price_pro", None),
        ),
    )
    .await;
    assert_eq!(account().await, ("pro".into(), "grace".into()));
    signed(
        &base,
        &event("evt_inv_p1", "invoice.paid", t0 + 50, invoice("cus_test1")),
    )
    .await;
    assert_eq!(account().await, ("pro".into(), "active".into()));
    assert_eq!(limits().await.0, "pro");

    // Unpaid again, and the grace period (1 s here) runs out: free, live.
    signed(
        &base,
        &event(
            "evt_sub_unpaid2",
            "customer.subscription.updated",
            t0 + 60,
            subscription("unpaid", "price_pro", None),
        ),
    )
    .await;
    let me: serde_json::Value = reqwest::Client::new()
        .get(format!("{base}/api/billing"))
        .bearer_auth(&session.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["status"], "grace", "{me}");
    assert!(me["graceUntil"].is_string(), "{me}");
    // Three days or less before the grace ends: one mail that says so.
    use clawdeploy_scheduler::billing::webhook::warn_grace_ending;
    assert_eq!(warn_grace_ending(&app).await.unwrap(), 1);
    assert_eq!(warn_grace_ending(&app).await.unwrap(), 0);
    assert_eq!(mails("grace_ending").await, 1);
    let mailer = clawdeploy_scheduler::mail::FakeMailer::default();
    clawdeploy_scheduler::outbox::send_due(&app, &mailer, 50)
        .await
        .unwrap();
    let subjects: Vec<String> = mailer
        .sent()
        .into_iter()
        .filter(|m| m.to == "payer@example.com")
        .map(|m| m.subject)
        .collect();
    for want in [
        "Your ClawDeploy payment failed",
        "Your ClawDeploy plan ends in 3 days",
    ] {
        assert!(
            subjects.iter().any(|s| s == want),
            "{want} not in {subjects:?}"
        );
    }
    let grace = mailer
        .sent()
        .into_iter()
        .find(|m| m.subject == "Your ClawDeploy plan ends in 3 days")
        .unwrap();
    assert!(grace.text.contains("Your pro plan"), "{}", grace.text);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        clawdeploy_scheduler::billing::webhook::end_grace(&app)
            .await
            .unwrap(),
        1
    );
    assert_eq!(limits().await, ("free".into(), 500, 512 << 20));
    assert_eq!(account().await, ("free".into(), "canceled".into()));

    // Subscribed again, then canceled by the customer (not for a failed
    // payment): down to free at once, no grace.
    signed(
        &base,
        &event(
            "evt_sub_again",
            "customer.subscription.updated",
            t0 + 70,
            subscription("active", "price_pro", None),
        ),
    )
    .await;
    assert_eq!(limits().await.0, "pro");
    let (status, body) = signed(
        &base,
        &event(
            "evt_sub_del",
            "customer.subscription.deleted",
            t0 + 80,
            subscription("canceled", "price_pro", Some("cancellation_requested")),
        ),
    )
    .await;
    assert_eq!(
        (status, body["outcome"].as_str()),
        (200, Some("applied")),
        "{body}"
    );
    assert_eq!(limits().await, ("free".into(), 500, 512 << 20));
    assert_eq!(account().await, ("free".into(), "canceled".into()));

    // A paying account's new instance starts at its tier.
    let team = user(&app, "team@example.com").await;
    sqlx::query(
        "INSERT INTO billing_accounts (user_id, tier, status) VALUES ($1, 'team', 'active')",
    )
    .bind(team)
    .execute(&app.db)
    .await
    .unwrap();
    let c = claim::claim(&app, request(team, "teamwork")).await.unwrap();
    let (tier, cpu, memory): (String, i32, i64) = sqlx::query_as(
        "SELECT i.tier, c.cpu_millis, c.memory_bytes FROM instances i JOIN containers c ON c.id = i.container_id WHERE i.id = $1",
    )
    .bind(c.instance_id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!((tier.as_str(), cpu, memory), ("team", 2000, 2 << 30));
}

#[tokio::test]
async fn checkout_makes_one_customer_per_account_and_keeps_redirects_home() {
    use clawdeploy_scheduler::billing::checkout::{checkout, portal};
    use clawdeploy_scheduler::model::Tier;
    use clawdeploy_scheduler::payments::FakeProvider;
    let cfg = Config {
        stripe_price_pro: Some("price_pro".into()),
        public_origin: "https://app.example.com".into(),
        ..Config::default()
    };
    let app = app_with(cfg.clone()).await;
    let fake = FakeProvider::default();
    let s = register(&app, "buyer@example.com", "Buyer").await;
    let ok = "https://app.example.com/?paid=1";

    // Refused before anything is created: a redirect off our origin, a
    // tier without a price, and the portal of an account that never paid.
    for (tier, url) in [
        (Tier::Pro, "https://evil.example/"),
        (Tier::Team, ok),
        (Tier::Free, ok),
    ] {
        let r = checkout(&app.db, &cfg, &fake, s.user_id, tier, url, ok, None).await;
        assert!(
            matches!(r, Err(Error::Invalid { .. })),
            "{tier:?} {url}: {r:?}"
        );
    }
    let r = portal(&app.db, &cfg, &fake, s.user_id, ok).await;
    assert!(
        matches!(
            r,
            Err(Error::Conflict {
                code: "no_customer",
                ..
            })
        ),
        "{r:?}"
    );
    assert!(fake.calls().is_empty(), "{:?}", fake.calls());

    // Two checkouts: one customer (named after the account), two sessions,
    // each with its own idempotency key; the portal then opens.
    let a = checkout(
        &app.db,
        &cfg,
        &fake,
        s.user_id,
        Tier::Pro,
        ok,
        ok,
        Some("k1"),
    )
    .await
    .unwrap();
    let b = checkout(&app.db, &cfg, &fake, s.user_id, Tier::Pro, ok, ok, None)
        .await
        .unwrap();
    assert_ne!(a, b);
    let calls = fake.calls();
    let customers: Vec<&String> = calls.iter().filter(|c| c.starts_with("customer")).collect();
    assert_eq!(customers.len(), 1, "{calls:?}");
    assert!(
        customers[0].ends_with("buyer@example.com Buyer"),
        "{calls:?}"
    );
    assert!(
        calls[1].contains(&format!("price_pro {}", s.user_id)),
        "{calls:?}"
    );
    assert!(
        calls[1].ends_with(&format!("checkout-{}-k1", s.user_id)),
        "{calls:?}"
    );
    let url = portal(&app.db, &cfg, &fake, s.user_id, ok).await.unwrap();
    assert!(url.starts_with("https://portal.fake/cus_fake_"), "{url}");
}

/// A signed event billing cannot read (its object lacks fields billing's
/// API version requires, as when the endpoint was made with another
/// version) is kept whole for an operator and acknowledged, once per
/// event, counting redeliveries; nothing is applied. The same payload
/// unsigned is refused and not kept.
#[tokio::test]
async fn a_signed_event_billing_cannot_read_is_kept_and_acknowledged() {
    let app = app_with(Config {
        stripe_webhook_secret: Some(WHSEC.into()),
        ..Config::default()
    })
    .await;
    let base = serve(app.clone()).await;
    let mut unreadable: serde_json::Value = serde_json::from_str(&event(
        "evt_other_version",
        "customer.subscription.updated",
        chrono::Utc::now().timestamp(),
        json!({"id": "sub_test1", "object": "subscription"}),
    ))
    .unwrap();
    unreadable["api_version"] = json!("2019-02-19");
    let payload = unreadable.to_string();
    for delivery in 1..=2 {
        let (status, body) = signed(&base, &payload).await;
        assert_eq!(
            (status, body["outcome"].as_str()),
            (200, Some("unreadable")),
            "{body}"
        );
        let kept: (String, String, String, i32, bool) = sqlx::query_as(
            "SELECT type, api_version, payload, deliveries, resolved_at IS NULL
               FROM stripe_unreadable_events WHERE id = 'evt_other_version'",
        )
        .fetch_one(&app.db)
        .await
        .unwrap();
        assert_eq!(
            kept,
            (
                "customer.subscription.updated".into(),
                "2019-02-19".into(),
                payload.clone(),
                delivery,
                true
            )
        );
    }
    assert_eq!(count(&app, "SELECT count(*) FROM stripe_events").await, 0);
    assert_eq!(
        count(&app, "SELECT count(*) FROM billing_accounts").await,
        0
    );

    // Not signed by Stripe: refused, and nothing is kept.
    let forged = payload.replace("evt_other_version", "evt_forged");
    let sig = stripe_webhook::Webhook::generate_test_header(&forged, "whsec_other", None);
    let (status, body) = deliver(&base, &forged, &sig).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        count(&app, "SELECT count(*) FROM stripe_unreadable_events").await,
        1
    );
}
