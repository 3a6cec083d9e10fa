//! The profile over the router: name and time zone change at will (an
//! IANA name only); the email moves only when a link to the new address is
//! used, after the password is given again, with a notice to the old one;
//! a password reset voids a pending move.

use clawdeploy_scheduler::accounts::reset;
use clawdeploy_scheduler::mail::FakeMailer;
use clawdeploy_scheduler::outbox;
use reqwest::Method;
use serde_json::json;

use crate::support::*;

const PW: &str = "correct-horse-battery";

/// The token after `marker` in the last mail to `to` whose subject is
/// `subject`.
fn token_in(mailer: &FakeMailer, to: &str, subject: &str, marker: &str) -> String {
    let mail = mailer
        .sent()
        .into_iter()
        .rev()
        .find(|m| m.to == to && m.subject == subject)
        .unwrap_or_else(|| panic!("no mail '{subject}' to {to}"));
    let (_, rest) = mail.text.split_once(marker).expect("a link");
    rest.chars().take_while(char::is_ascii_hexdigit).collect()
}

#[tokio::test]
async fn name_and_time_zone_change_at_will_and_the_email_only_by_a_link_to_the_new_address() {
    let app = app().await;
    let api = Api::serve(app.clone(), "profile-test").await;
    let s = register(&app, "old@example.com", "Ada").await;
    sqlx::query("INSERT INTO billing_accounts (user_id, customer_id) VALUES ($1, 'cus_ada')")
        .bind(s.user_id)
        .execute(&app.db)
        .await
        .unwrap();
    register(&app, "taken@example.com", "").await;
    let t = Some(s.token.as_str());

    let (status, p) = api.call(Method::GET, "/api/account", t, None).await;
    assert_eq!(status, 200, "{p}");
    assert_eq!(
        (
            &p["email"],
            &p["name"],
            &p["timezone"],
            &p["emailVerified"],
            &p["mfaEnabled"]
        ),
        (
            &json!("old@example.com"),
            &json!("Ada"),
            &json!("UTC"),
            &json!(true),
            &json!(false)
        )
    );
    let (status, body) = api
        .call(
            Method::PATCH,
            "/api/account",
            t,
            Some(json!({"timezone": "Mars/Olympus_Mons"})),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("invalid_field"))
    );
    let (status, p) = api
        .call(
            Method::PATCH,
            "/api/account",
            t,
            Some(json!({"name": "Ada Lovelace", "timezone": "Europe/Berlin"})),
        )
        .await;
    assert_eq!(status, 200, "{p}");
    assert_eq!(
        (&p["name"], &p["timezone"]),
        (&json!("Ada Lovelace"), &json!("Europe/Berlin"))
    );
    let (_, p) = api
        .call(Method::PATCH, "/api/account", t, Some(json!({})))
        .await;
    assert_eq!(p["timezone"], "Europe/Berlin", "absent fields are kept");

    // The email: the password again, an address nobody uses.
    let change = |email: &str, pw: &str| json!({"newEmail": email, "password": pw});
    let cases = [
        (
            change("new@example.com", "wrong-password"),
            403,
            "wrong_password",
        ),
        (change("taken@example.com", PW), 409, "email_taken"),
        (change("Old@Example.com", PW), 422, "invalid_field"),
        (change("not-an-address", PW), 422, "invalid_field"),
    ];
    for (body, want, code) in cases {
        let (status, b) = api
            .call(Method::POST, "/api/account/email", t, Some(body.clone()))
            .await;
        assert_eq!(
            (status, b["error"]["code"].as_str()),
            (want, Some(code)),
            "{body}"
        );
    }
    let (status, _) = api
        .call(
            Method::POST,
            "/api/account/email",
            t,
            Some(change("new@example.com", PW)),
        )
        .await;
    assert_eq!(status, 202);
    let (_, p) = api.call(Method::GET, "/api/account", t, None).await;
    assert_eq!(
        (&p["email"], &p["pendingEmail"]),
        (&json!("old@example.com"), &json!("new@example.com"))
    );

    let mailer = FakeMailer::default();
    outbox::send_due(&app, &mailer, 20).await.unwrap();
    let notice = mailer
        .sent()
        .into_iter()
        .find(|m| m.to == "old@example.com" && m.subject.contains("about to change"))
        .expect("a notice to the old address");
    assert!(notice.text.contains("new@example.com"), "{}", notice.text);
    let token = token_in(
        &mailer,
        "new@example.com",
        "Confirm your new email address",
        "#verify-email=",
    );
    let (status, body) = api
        .call(
            Method::POST,
            "/api/auth/verify-email",
            None,
            Some(json!({"token": token})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, p) = api.call(Method::GET, "/api/account", t, None).await;
    assert_eq!(
        (&p["email"], &p["pendingEmail"], &p["emailVerified"]),
        (&json!("new@example.com"), &json!(null), &json!(true))
    );
    assert!(login(&app, "new@example.com", PW).await.is_ok());
    // Its Stripe customer follows (receipts go to the new address), once.
    let stripe = clawdeploy_scheduler::payments::FakeProvider::default();
    let told = clawdeploy_scheduler::billing::sync::pass_with(&app, Some(&stripe))
        .await
        .unwrap();
    assert_eq!(told.emails, 1);
    assert_eq!(stripe.calls(), ["customer_email cus_ada new@example.com"]);
    let again = clawdeploy_scheduler::billing::sync::pass_with(&app, Some(&stripe))
        .await
        .unwrap();
    assert_eq!(again.emails, 0);
    assert!(login(&app, "old@example.com", PW).await.is_err());
    let (status, _) = api
        .call(
            Method::POST,
            "/api/auth/verify-email",
            None,
            Some(json!({"token": token})),
        )
        .await;
    assert_eq!(status, 400, "a link works once");

    let (_, log) = api
        .call(Method::GET, "/api/account/security-log", t, None)
        .await;
    let kinds: Vec<&str> = log["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds[..4],
        [
            "login_succeeded",
            "email_changed",
            "email_change_requested",
            "profile_updated"
        ],
        "{kinds:?}"
    );

    // A move asked for before a password reset dies with the old password.
    let (status, _) = api
        .call(
            Method::POST,
            "/api/account/email",
            t,
            Some(change("newer@example.com", PW)),
        )
        .await;
    assert_eq!(status, 202);
    reset::forgot(&app, "new@example.com", None).await.unwrap();
    outbox::send_due(&app, &mailer, 20).await.unwrap();
    let move_token = token_in(
        &mailer,
        "newer@example.com",
        "Confirm your new email address",
        "#verify-email=",
    );
    let reset_token = token_in(
        &mailer,
        "new@example.com",
        "Reset your ClawDeploy password",
        "#reset-password=",
    );
    reset::reset(
        &app,
        &reset_token,
        "quite-different-passphrase".into(),
        &Default::default(),
    )
    .await
    .unwrap();
    let (status, _) = api
        .call(
            Method::POST,
            "/api/auth/verify-email",
            None,
            Some(json!({"token": move_token})),
        )
        .await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn an_unproven_address_cannot_be_moved() {
    let app = app().await;
    let api = Api::serve(app.clone(), "profile-test").await;
    let fresh = api.register("fresh@example.com").await;
    let (status, body) = api
        .call(
            Method::POST,
            "/api/account/email",
            Some(&fresh),
            Some(json!({"newEmail": "elsewhere@example.com", "password": PW})),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("email_unverified"))
    );
}
