//! Email verification at the database level: a registration queues a mail
//! whose link proves the address once, within 24 hours; the token is never
//! stored in plain text; a new link is mailed on request (at most five an
//! hour) with the same answer whatever the state; checkout and custom
//! domains wait for a proven address.

use clawdeploy_scheduler::accounts::{self, verify, Registration};
use clawdeploy_scheduler::app::Config;
use clawdeploy_scheduler::billing::checkout::checkout;
use clawdeploy_scheduler::error::Error;
use clawdeploy_scheduler::mail::FakeMailer;
use clawdeploy_scheduler::model::Tier;
use clawdeploy_scheduler::outbox;
use clawdeploy_scheduler::payments::FakeProvider;

use crate::support::*;

async fn unverified(app: &clawdeploy_scheduler::App, email: &str) -> accounts::Session {
    accounts::register(
        app,
        Registration {
            email,
            password: "correct-horse-battery".into(),
            name: "",
            client: Default::default(),
            per_address_per_hour: 0,
        },
    )
    .await
    .unwrap()
}

/// The token in the link of the last verification mail to `to`.
fn token_mailed(mailer: &FakeMailer, to: &str) -> String {
    let mail = mailer
        .sent()
        .into_iter()
        .rev()
        .find(|m| m.to == to && m.subject == "Confirm your email address")
        .expect("a verification mail");
    let (_, rest) = mail.text.split_once("#verify-email=").expect("a link");
    rest.chars().take_while(char::is_ascii_hexdigit).collect()
}

#[tokio::test]
async fn registration_mails_a_link_that_proves_the_address_once() {
    let app = app_with(Config {
        public_origin: "https://app.example.com".into(),
        ..Config::default()
    })
    .await;
    let s = unverified(&app, "ver@example.com").await;
    assert!(!verify::is_verified(&app.db, s.user_id).await.unwrap());
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM outbox WHERE purpose = 'verify_email' AND secret_enc IS NOT NULL"
        )
        .await,
        1
    );
    let mailer = FakeMailer::default();
    outbox::send_due(&app, &mailer, 10).await.unwrap();
    let token = token_mailed(&mailer, "ver@example.com");
    assert_eq!(token.len(), 64, "256 random bits");
    assert!(mailer.sent()[0]
        .text
        .contains(&format!("https://app.example.com/#verify-email={token}")));
    // Sent: the outbox keeps no secret, and no table holds the token.
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM outbox WHERE secret_enc IS NOT NULL"
        )
        .await,
        0
    );
    let found: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM outbox WHERE params::text LIKE '%' || $1 || '%' OR coalesce(last_error, '') LIKE '%' || $1 || '%')
              + (SELECT count(*) FROM email_verifications WHERE encode(token_hash, 'hex') = $1)
              + (SELECT count(*) FROM audit_log WHERE detail::text LIKE '%' || $1 || '%')",
    )
    .bind(&token)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(found, 0);

    assert_eq!(
        verify::verify(&app, &token, &Default::default())
            .await
            .unwrap(),
        s.user_id
    );
    assert!(verify::is_verified(&app.db, s.user_id).await.unwrap());
    assert!(matches!(
        verify::verify(&app, &token, &Default::default()).await,
        Err(Error::InvalidToken(_))
    ));
    assert!(matches!(
        verify::verify(&app, "00", &Default::default()).await,
        Err(Error::InvalidToken(_))
    ));
}

#[tokio::test]
async fn an_expired_link_proves_nothing_and_a_new_one_is_mailed_on_request() {
    let app = app().await;
    let s = unverified(&app, "late@example.com").await;
    let mailer = FakeMailer::default();
    outbox::send_due(&app, &mailer, 10).await.unwrap();
    let old = token_mailed(&mailer, "late@example.com");
    sqlx::query("UPDATE email_verifications SET expires_at = now() - interval '1 second'")
        .execute(&app.db)
        .await
        .unwrap();
    assert!(matches!(
        verify::verify(&app, &old, &Default::default()).await,
        Err(Error::InvalidToken(_))
    ));
    assert!(!verify::is_verified(&app.db, s.user_id).await.unwrap());

    // Five links an hour at most; asking more answers the same and mails
    // nothing.
    for _ in 0..6 {
        verify::resend(&app, s.user_id).await.unwrap();
    }
    assert_eq!(
        count(&app, "SELECT count(*) FROM email_verifications").await,
        5
    );
    outbox::send_due(&app, &mailer, 10).await.unwrap();
    let new = token_mailed(&mailer, "late@example.com");
    assert_ne!(new, old);
    verify::verify(&app, &new, &Default::default())
        .await
        .unwrap();
    // Proven: a resend mails nothing.
    verify::resend(&app, s.user_id).await.unwrap();
    assert_eq!(
        count(&app, "SELECT count(*) FROM email_verifications").await,
        5
    );
}

#[tokio::test]
async fn checkout_and_custom_domains_wait_for_a_proven_address() {
    let cfg = Config {
        stripe_price_pro: Some("price_pro".into()),
        public_origin: "https://app.example.com".into(),
        ..Config::default()
    };
    let app = app_with(cfg.clone()).await;
    let s = unverified(&app, "buyer-unverified@example.com").await;
    let ok = "https://app.example.com/?paid=1";
    let fake = FakeProvider::default();
    let r = checkout(&app.db, &cfg, &fake, s.user_id, Tier::Pro, ok, ok, None).await;
    assert!(matches!(r, Err(Error::EmailUnverified)), "{r:?}");
    let r = clawdeploy_scheduler::domains::add(&app, s.user_id, "chat.example.org").await;
    assert!(matches!(r, Err(Error::EmailUnverified)), "{r:?}");

    let mailer = FakeMailer::default();
    outbox::send_due(&app, &mailer, 10).await.unwrap();
    verify::verify(
        &app,
        &token_mailed(&mailer, "buyer-unverified@example.com"),
        &Default::default(),
    )
    .await
    .unwrap();
    checkout(&app.db, &cfg, &fake, s.user_id, Tier::Pro, ok, ok, None)
        .await
        .unwrap();
    // Past the address check: the free plan is what stops it now.
    let r = clawdeploy_scheduler::domains::add(&app, s.user_id, "chat.example.org").await;
    assert!(!matches!(r, Err(Error::EmailUnverified)), "{r:?}");
}

/// The live route's paused reason and version for `subdomain`.
async fn route_of(app: &clawdeploy_scheduler::App, subdomain: &str) -> (String, i64) {
    sqlx::query_as(
        "SELECT paused, version FROM routes WHERE hostname LIKE $1 || '.%' AND removed_at IS NULL",
    )
    .bind(subdomain)
    .fetch_one(&app.db)
    .await
    .unwrap()
}

#[tokio::test]
async fn an_instance_left_unproven_past_the_grace_is_suspended_and_resumes_on_proof() {
    use clawdeploy_scheduler::lifecycle::{claim, complete, verification};
    let app = app().await;
    node(&app, "n1").await;
    idle(&app, "n1", 2).await;
    let s = unverified(&app, "slow@example.com").await;
    let keen = unverified(&app, "keen@example.com").await;
    let mut claimed = Vec::new();
    for (u, sub) in [(s.user_id, "slow"), (keen.user_id, "keen")] {
        let c = claim::claim(&app, request(u, sub)).await.unwrap();
        complete::complete(&app, "n1", c.container_id.unwrap(), 1)
            .await
            .unwrap();
        claimed.push(c);
    }
    let mailer = FakeMailer::default();
    outbox::send_due(&app, &mailer, 10).await.unwrap();
    verify::verify(
        &app,
        &token_mailed(&mailer, "keen@example.com"),
        &Default::default(),
    )
    .await
    .unwrap();

    // Within the grace: nothing happens.
    assert_eq!(verification::suspend_overdue(&app).await.unwrap(), 0);
    // Past it (48 hours by default): the unproven one is suspended, its
    // container stopped with its state, its route paused; not the other.
    sqlx::query("UPDATE users SET created_at = now() - interval '49 hours'")
        .execute(&app.db)
        .await
        .unwrap();
    let (_, before) = route_of(&app, "slow").await;
    assert_eq!(verification::suspend_overdue(&app).await.unwrap(), 1);
    assert_eq!(verification::suspend_overdue(&app).await.unwrap(), 0);
    let state: (String, Option<String>, String) = sqlx::query_as(
        "SELECT i.status, i.suspended_reason, c.state FROM instances i JOIN containers c ON c.id = i.container_id
          WHERE i.id = $1",
    )
    .bind(claimed[0].instance_id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(
        state,
        (
            "suspended".into(),
            Some("email_unverified".into()),
            "suspended".into()
        )
    );
    let (paused, version) = route_of(&app, "slow").await;
    assert_eq!(paused, "email_unverified");
    assert!(version > before, "a new route version for the edges");
    assert_eq!(route_of(&app, "keen").await.0, "");

    // Proven: the same container runs again, the route answers again.
    verification::verify_email(
        &app,
        &token_mailed(&mailer, "slow@example.com"),
        &Default::default(),
    )
    .await
    .unwrap();
    let state: (String, Option<String>, String, uuid::Uuid) = sqlx::query_as(
        "SELECT i.status, i.suspended_reason, c.state, c.id FROM instances i JOIN containers c ON c.id = i.container_id
          WHERE i.id = $1",
    )
    .bind(claimed[0].instance_id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(
        state,
        (
            "ready".into(),
            None,
            "assigned".into(),
            claimed[0].container_id.unwrap()
        )
    );
    assert_eq!(route_of(&app, "slow").await.0, "");
    assert_eq!(
        count(&app, "SELECT count(*) FROM audit_log WHERE action IN ('instance.suspended', 'instance.resumed')").await,
        2
    );
}
