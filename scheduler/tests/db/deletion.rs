//! Deleting an account: asking (the password again) ends every session,
//! suspends the instance with its state and mails an undo link; the link,
//! or signing in, undoes it and the instance resumes; past the grace the
//! instance is released, the subscription ended and no personal data of
//! the account is left in any table. The export holds the account's data.

use clawdeploy_scheduler::billing::sync;
use clawdeploy_scheduler::lifecycle::{claim, complete, deletion, release};
use clawdeploy_scheduler::mail::FakeMailer;
use clawdeploy_scheduler::outbox;
use clawdeploy_scheduler::payments::FakeProvider;
use reqwest::Method;
use serde_json::json;

use crate::support::*;

const PW: &str = "correct-horse-battery";
const EMAIL: &str = "zebulon.erasable@example.com";
const NAME: &str = "Zebulon Erasable";
const AGENT: &str = "EraseMeBrowser/7.1";

fn undo_token(mailer: &FakeMailer) -> String {
    let mail = mailer
        .sent()
        .into_iter()
        .rev()
        .find(|m| m.to == EMAIL && m.subject == "Your ClawDeploy account will be deleted")
        .expect("a deletion mail");
    let (_, rest) = mail.text.split_once("#undo-deletion=").expect("a link");
    rest.chars().take_while(char::is_ascii_hexdigit).collect()
}

async fn instance_state(
    app: &clawdeploy_scheduler::App,
    user: uuid::Uuid,
) -> (String, Option<String>, String) {
    sqlx::query_as(
        "SELECT i.status, i.suspended_reason, c.state FROM instances i JOIN containers c ON c.id = i.container_id
          WHERE i.user_id = $1",
    )
    .bind(user)
    .fetch_one(&app.db)
    .await
    .unwrap()
}

/// Every row of every table of the database, as text.
async fn everything(app: &clawdeploy_scheduler::App) -> String {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables
          WHERE table_schema = 'public' AND table_type = 'BASE TABLE'",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    let mut all = String::new();
    for t in tables {
        let rows: Option<String> = sqlx::query_scalar(&format!(
            "SELECT string_agg(row_to_json(t)::text, '\n') FROM \"{t}\" t"
        ))
        .fetch_one(&app.db)
        .await
        .unwrap();
        all.push_str(&rows.unwrap_or_default());
        all.push('\n');
    }
    all
}

/// Signs in afresh and asks to delete the account: the answer's status.
async fn sign_in_and_delete(api: &Api) -> u16 {
    let (_, signed) = api
        .call(
            Method::POST,
            "/api/auth/login",
            None,
            Some(json!({"email": EMAIL, "password": PW})),
        )
        .await;
    let token = signed["token"].as_str().expect("a session").to_owned();
    let body = Some(json!({ "password": PW }));
    api.call(Method::DELETE, "/api/account", Some(&token), body)
        .await
        .0
}

#[tokio::test]
async fn a_deleted_account_can_be_undone_within_its_grace_and_is_erased_after_it() {
    let app = app().await;
    node(&app, "n1").await;
    idle(&app, "n1", 2).await;
    let api = Api::serve(app.clone(), AGENT).await;
    let s = register(&app, EMAIL, NAME).await;
    let user = s.user_id;
    let c = claim::claim(&app, request(user, "erasable")).await.unwrap();
    let container = c.container_id.unwrap();
    complete::complete(&app, "n1", container, 1).await.unwrap();
    sqlx::query("INSERT INTO billing_accounts (user_id, customer_id, subscription_id, tier, status) VALUES ($1, 'cus_zeb', 'sub_zeb', 'pro', 'active')")
        .bind(user)
        .execute(&app.db)
        .await
        .unwrap();
    // A sign-in from a browser of its own, so the log holds an address
    // and user agent; the export holds it all.
    let (status, signed) = api
        .call(
            Method::POST,
            "/api/auth/login",
            None,
            Some(json!({"email": EMAIL, "password": PW})),
        )
        .await;
    assert_eq!(status, 200);
    let token = signed["token"].as_str().unwrap().to_owned();
    let (status, export) = api
        .call(Method::GET, "/api/account/export", Some(&token), None)
        .await;
    assert_eq!(status, 200, "{export}");
    assert_eq!(
        (&export["account"]["email"], &export["account"]["name"]),
        (&json!(EMAIL), &json!(NAME))
    );
    assert_eq!(export["instances"][0]["subdomain"], "erasable");
    assert_eq!(export["billing"]["tier"], "pro");
    assert!(export["securityLog"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["userAgent"] == AGENT));

    // Asking: the password again; then every session ends and the
    // instance stops with its state.
    let (status, body) = api
        .call(
            Method::DELETE,
            "/api/account",
            Some(&token),
            Some(json!({"password": "wrong-password"})),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("wrong_password"))
    );
    let (status, body) = api
        .call(
            Method::DELETE,
            "/api/account",
            Some(&token),
            Some(json!({"password": PW})),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    assert!(body["eraseAfter"].is_string());
    for t in [&token, &s.token] {
        let (status, _) = api.call(Method::GET, "/api/account", Some(t), None).await;
        assert_eq!(status, 401);
    }
    assert_eq!(
        instance_state(&app, user).await,
        (
            "suspended".into(),
            Some("account_deleted".into()),
            "suspended".into()
        )
    );
    let stripe = FakeProvider::default();
    let told = sync::pass_with(&app, Some(&stripe)).await.unwrap();
    assert_eq!(told.cancellations, 1);
    assert_eq!(
        deletion::erase_due_with(&app, Some(&stripe)).await.unwrap(),
        0
    );
    assert_eq!(stripe.calls(), ["cancel_at_period_end sub_zeb true"]);

    // The mailed link undoes it: the same container runs again.
    let mailer = FakeMailer::default();
    outbox::send_due(&app, &mailer, 20).await.unwrap();
    let link = undo_token(&mailer);
    let (status, body) = api
        .call(
            Method::POST,
            "/api/auth/undo-deletion",
            None,
            Some(json!({"token": link})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        instance_state(&app, user).await,
        ("ready".into(), None, "assigned".into())
    );
    let (status, _) = api
        .call(
            Method::POST,
            "/api/auth/undo-deletion",
            None,
            Some(json!({"token": link})),
        )
        .await;
    assert_eq!(status, 400, "the link works once");
    sync::pass_with(&app, Some(&stripe)).await.unwrap();
    assert_eq!(
        stripe.calls().last().unwrap(),
        "cancel_at_period_end sub_zeb false"
    );

    // Asked again, then undone by signing in.
    assert_eq!(sign_in_and_delete(&api).await, 202);
    let (status, _) = api
        .call(
            Method::POST,
            "/api/auth/login",
            None,
            Some(json!({"email": EMAIL, "password": PW})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(instance_state(&app, user).await.0, "ready");

    // Asked a third time and left past the grace: erased.
    assert_eq!(sign_in_and_delete(&api).await, 202);
    sync::pass_with(&app, Some(&stripe)).await.unwrap();
    assert_eq!(
        deletion::erase_due_with(&app, Some(&stripe)).await.unwrap(),
        0,
        "not before the grace is over"
    );
    sqlx::query(
        "UPDATE users SET deletion_requested_at = now() - interval '31 days' WHERE id = $1",
    )
    .bind(user)
    .execute(&app.db)
    .await
    .unwrap();
    assert_eq!(
        deletion::erase_due_with(&app, Some(&stripe)).await.unwrap(),
        1
    );
    assert_eq!(stripe.calls().last().unwrap(), "cancel_now sub_zeb");
    assert_eq!(
        deletion::erase_due_with(&app, Some(&stripe)).await.unwrap(),
        0
    );
    assert_eq!(
        sync::pass_with(&app, Some(&stripe)).await.unwrap(),
        Default::default()
    );

    // Its routes are gone, its instance released; after the release grace
    // its container is destroyed.
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM routes WHERE hostname LIKE 'erasable.%' AND removed_at IS NULL"
        )
        .await,
        0
    );
    sqlx::query("UPDATE instances SET released_at = now() - interval '30 days' WHERE user_id = $1")
        .bind(user)
        .execute(&app.db)
        .await
        .unwrap();
    release::sweep_expired(&app).await.unwrap();
    let (status, _, container_state) = instance_state(&app, user).await;
    assert_eq!(
        (status.as_str(), container_state.as_str()),
        ("deleted", "destroying")
    );

    // No personal data of the account in any table.
    let all = everything(&app).await;
    assert!(
        all.contains("\"subdomain\":\"erasable\""),
        "the dump holds the tables"
    );
    for personal in [
        EMAIL,
        "zebulon",
        NAME,
        AGENT,
        "127.0.0.1",
        "cus_zeb",
        "sk-erasable",
    ] {
        assert!(
            !all.to_lowercase().contains(&personal.to_lowercase()),
            "{personal} is still stored"
        );
    }
    assert!(login(&app, EMAIL, PW).await.is_err());
    assert_eq!(
        count(&app, &format!("SELECT count(*) FROM audit_log WHERE action = 'user.erased' AND subject = '{user}'")).await,
        1
    );
}
