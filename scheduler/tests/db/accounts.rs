//! Registrations and their per-address limit.

use clawdeploy_scheduler::error::Error;

use crate::support::*;

/// Registrations are limited per address per hour, taken emails included;
/// the refusal says when the window frees a slot. Other addresses, and
/// registrations with no known address, are not affected.
#[tokio::test]
async fn registrations_are_limited_per_address() {
    use clawdeploy_scheduler::accounts::{self, Registration};
    let app = app().await;
    let from = |email: &'static str, ip: [u8; 4]| Registration {
        email,
        password: "correct-horse-battery".into(),
        name: "",
        client: accounts::Client::new(Some(std::net::IpAddr::from(ip)), "test"),
        per_address_per_hour: 3,
    };
    accounts::register(&app, from("a1@example.com", [203, 0, 113, 1]))
        .await
        .unwrap();
    accounts::register(&app, from("a2@example.com", [203, 0, 113, 1]))
        .await
        .unwrap();
    let taken = accounts::register(&app, from("a1@example.com", [203, 0, 113, 1])).await;
    assert!(matches!(
        taken,
        Err(Error::Conflict {
            code: "email_taken",
            ..
        })
    ));
    match accounts::register(&app, from("a3@example.com", [203, 0, 113, 1])).await {
        Err(Error::RateLimited { retry_after_secs }) => {
            assert!(
                (3500..=3600).contains(&retry_after_secs),
                "{retry_after_secs}"
            )
        }
        Err(e) => panic!("the fourth attempt is limited, not {e}"),
        Ok(_) => panic!("the fourth attempt is limited"),
    }
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM users WHERE email = 'a3@example.com'"
        )
        .await,
        0
    );
    accounts::register(&app, from("b1@example.com", [203, 0, 113, 2]))
        .await
        .unwrap();
    register(&app, "c1@example.com", "").await;
    // An hour later the window has room again.
    sqlx::query("UPDATE registration_attempts SET at = at - interval '61 minutes'")
        .execute(&app.db)
        .await
        .unwrap();
    accounts::register(&app, from("a3@example.com", [203, 0, 113, 1]))
        .await
        .unwrap();
}
