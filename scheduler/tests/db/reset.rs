//! Password reset at the database level: the same answer whether or not
//! the account exists (a mail only if it does), a link that works once
//! within its hour, every session ended, the token never stored in plain
//! text, and the limits per email and per address.

use clawdeploy_scheduler::accounts::{self, reset};
use clawdeploy_scheduler::error::Error;
use clawdeploy_scheduler::mail::FakeMailer;
use clawdeploy_scheduler::outbox;

use crate::support::*;

fn link_token(mailer: &FakeMailer, to: &str) -> String {
    let mail = mailer
        .sent()
        .into_iter()
        .rev()
        .find(|m| m.to == to && m.subject == "Reset your ClawDeploy password")
        .expect("a reset mail");
    let (_, rest) = mail.text.split_once("#reset-password=").expect("a link");
    rest.chars().take_while(char::is_ascii_hexdigit).collect()
}

#[tokio::test]
async fn a_reset_link_works_once_ends_every_session_and_is_never_stored() {
    let app = app().await;
    let s = register(&app, "forgetful@example.com", "").await;
    let other_session = login(&app, "forgetful@example.com", "correct-horse-battery")
        .await
        .unwrap();

    // Unknown and known emails: the same answer; a mail only for the known.
    reset::forgot(&app, "nobody@example.com", None)
        .await
        .unwrap();
    reset::forgot(&app, "Forgetful@Example.com ", None)
        .await
        .unwrap();
    let mailer = FakeMailer::default();
    outbox::send_due(&app, &mailer, 20).await.unwrap();
    assert!(mailer.sent().iter().all(|m| m.to != "nobody@example.com"));
    let token = link_token(&mailer, "forgetful@example.com");
    assert_eq!(token.len(), 64);
    let stored: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM password_resets WHERE encode(token_hash, 'hex') = $1)
              + (SELECT count(*) FROM outbox WHERE secret_enc IS NOT NULL OR params::text LIKE '%' || $1 || '%')
              + (SELECT count(*) FROM audit_log WHERE detail::text LIKE '%' || $1 || '%')",
    )
    .bind(&token)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(stored, 0, "the token is nowhere in plain text");

    // A password the policy refuses leaves the link working.
    assert!(matches!(
        reset::reset(&app, &token, "short".into(), &Default::default()).await,
        Err(Error::Invalid { .. })
    ));
    assert_eq!(
        reset::reset(
            &app,
            &token,
            "a-brand-new-passphrase".into(),
            &Default::default()
        )
        .await
        .unwrap(),
        s.user_id
    );
    assert!(matches!(
        reset::reset(
            &app,
            &token,
            "another-new-passphrase".into(),
            &Default::default()
        )
        .await,
        Err(Error::InvalidToken(_))
    ));
    // Every session ended; the old password is gone, the new one works.
    for t in [&s.token, &other_session.token] {
        let hash = accounts::token_hash(t);
        assert_eq!(accounts::authenticate(&app.db, &hash).await.unwrap(), None);
    }
    assert!(
        login(&app, "forgetful@example.com", "correct-horse-battery")
            .await
            .is_err()
    );
    login(&app, "forgetful@example.com", "a-brand-new-passphrase")
        .await
        .unwrap();
    outbox::send_due(&app, &mailer, 20).await.unwrap();
    assert!(mailer
        .sent()
        .iter()
        .any(|m| m.to == "forgetful@example.com"
            && m.subject == "Your ClawDeploy password was changed"));
}

#[tokio::test]
async fn a_link_past_its_hour_fails_a_reset_voids_the_others_and_requests_are_limited() {
    let app = app().await;
    register(&app, "late-reset@example.com", "").await;
    reset::forgot(&app, "late-reset@example.com", None)
        .await
        .unwrap();
    reset::forgot(&app, "late-reset@example.com", None)
        .await
        .unwrap();
    let mailer = FakeMailer::default();
    outbox::send_due(&app, &mailer, 20).await.unwrap();
    let tokens: Vec<String> = mailer
        .sent()
        .iter()
        .filter_map(|m| m.text.split_once("#reset-password=").map(|(_, r)| r))
        .map(|r| r.chars().take_while(char::is_ascii_hexdigit).collect())
        .collect();
    assert_eq!(tokens.len(), 2);
    // The first, past its hour: refused.
    sqlx::query(
        "UPDATE password_resets SET expires_at = now() - interval '1 second'
          WHERE encode(token_hash, 'hex') = encode(sha256(convert_to($1, 'UTF8')), 'hex')",
    )
    .bind(&tokens[0])
    .execute(&app.db)
    .await
    .unwrap();
    assert!(matches!(
        reset::reset(
            &app,
            &tokens[0],
            "a-brand-new-passphrase".into(),
            &Default::default()
        )
        .await,
        Err(Error::InvalidToken(_))
    ));
    reset::reset(
        &app,
        &tokens[1],
        "a-brand-new-passphrase".into(),
        &Default::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM password_resets WHERE used_at IS NULL"
        )
        .await,
        0,
        "a reset voids every other link of the account"
    );

    // Five requests an hour per email (unknown ones too), then 429.
    for _ in 0..3 {
        reset::forgot(&app, "late-reset@example.com", None)
            .await
            .unwrap();
    }
    assert!(matches!(
        reset::forgot(&app, "late-reset@example.com", None).await,
        Err(Error::RateLimited { .. })
    ));
    for _ in 0..5 {
        reset::forgot(&app, "ghost@example.com", None)
            .await
            .unwrap();
    }
    assert!(matches!(
        reset::forgot(&app, "ghost@example.com", None).await,
        Err(Error::RateLimited { .. })
    ));
    // Twenty an hour from one address, whatever the emails.
    let from = Some(std::net::IpAddr::from([203, 0, 113, 9]));
    for i in 0..20 {
        reset::forgot(&app, &format!("spray{i}@example.com"), from)
            .await
            .unwrap();
    }
    assert!(matches!(
        reset::forgot(&app, "spray-last@example.com", from).await,
        Err(Error::RateLimited { .. })
    ));
}
