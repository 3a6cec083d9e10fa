//! AI credits in the database: a purchase is applied once per
//! PaymentIntent, refunds and disputes take back no more than was bought
//! and never below zero, and the 90 % warnings are queued once each.

use clawdeploy_scheduler::billing::credits::{self, Purchase};

use crate::support::*;

async fn balance(app: &clawdeploy_scheduler::app::App, user: uuid::Uuid) -> i64 {
    sqlx::query_scalar("SELECT balance_micros FROM credit_balances WHERE user_id = $1")
        .bind(user)
        .fetch_one(&app.db)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_purchase_counts_once_and_a_claw_back_never_takes_more_than_it_names() {
    let app = app().await;
    let u = user(&app, "credits@example.com").await;
    let buy = |pi: &'static str, cents: i64| Purchase {
        account: u,
        payment_intent: pi,
        amount_cents: cents,
        kind: "checkout",
        payment_method: Some("pm_card_visa"),
    };
    let mut tx = app.db.begin().await.unwrap();
    assert!(credits::credit(&mut tx, buy("pi_1", 2000)).await.unwrap());
    assert!(
        !credits::credit(&mut tx, buy("pi_1", 2000)).await.unwrap(),
        "a redelivery"
    );
    assert!(credits::credit(&mut tx, buy("pi_2", 500)).await.unwrap());
    tx.commit().await.unwrap();
    assert_eq!(balance(&app, u).await, 25_000_000);

    let mut tx = app.db.begin().await.unwrap();
    // A partial refund, then the whole: the second takes only the rest.
    assert_eq!(
        credits::claw_back(&mut tx, "pi_1", 500).await.unwrap(),
        Some((u, 5_000_000))
    );
    assert_eq!(
        credits::claw_back(&mut tx, "pi_1", 2000).await.unwrap(),
        Some((u, 15_000_000))
    );
    assert_eq!(
        credits::claw_back(&mut tx, "pi_1", 2000).await.unwrap(),
        Some((u, 0)),
        "once"
    );
    assert_eq!(
        credits::claw_back(&mut tx, "pi_1", 9999).await.unwrap(),
        Some((u, 0)),
        "never more than bought"
    );
    assert_eq!(
        credits::claw_back(&mut tx, "pi_unknown", 100)
            .await
            .unwrap(),
        None
    );
    tx.commit().await.unwrap();
    assert_eq!(balance(&app, u).await, 5_000_000);

    // Spent already: a dispute takes the balance to zero, not below.
    sqlx::query("UPDATE credit_balances SET balance_micros = 1000000 WHERE user_id = $1")
        .bind(u)
        .execute(&app.db)
        .await
        .unwrap();
    let mut tx = app.db.begin().await.unwrap();
    assert_eq!(
        credits::claw_back(&mut tx, "pi_2", 500).await.unwrap(),
        Some((u, 5_000_000))
    );
    tx.commit().await.unwrap();
    assert_eq!(balance(&app, u).await, 0);
    let card: Option<String> = sqlx::query_scalar(
        "SELECT credits_payment_method FROM billing_accounts WHERE user_id = $1",
    )
    .bind(u)
    .fetch_optional(&app.db)
    .await
    .unwrap()
    .flatten();
    assert_eq!(
        card, None,
        "no billing row: the card is kept once the account has a customer"
    );
}

#[tokio::test]
async fn ninety_percent_of_free_messages_or_of_bought_credits_is_mailed_once() {
    let app = app().await;
    let u = user(&app, "near@example.com").await;
    let i = instance(&app, "nearly", None).await;
    sqlx::query(
        "INSERT INTO message_quota (instance_id, month, user_id, used)
         VALUES ($1, date_trunc('month', now() AT TIME ZONE 'UTC')::date, $2, 89)",
    )
    .bind(i)
    .bind(u)
    .execute(&app.db)
    .await
    .unwrap();
    assert_eq!(credits::warn_low(&app).await.unwrap(), 0, "89 of 100");
    sqlx::query("UPDATE message_quota SET used = 90")
        .execute(&app.db)
        .await
        .unwrap();
    assert_eq!(credits::warn_low(&app).await.unwrap(), 1);
    assert_eq!(credits::warn_low(&app).await.unwrap(), 0, "once a month");

    let mut tx = app.db.begin().await.unwrap();
    let p = Purchase {
        account: u,
        payment_intent: "pi_low",
        amount_cents: 1000,
        kind: "top_up",
        payment_method: None,
    };
    credits::credit(&mut tx, p).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(credits::warn_low(&app).await.unwrap(), 0, "all $10 left");
    sqlx::query("UPDATE credit_balances SET balance_micros = 1000000")
        .execute(&app.db)
        .await
        .unwrap();
    assert_eq!(credits::warn_low(&app).await.unwrap(), 1, "$1 of $10 left");
    assert_eq!(
        credits::warn_low(&app).await.unwrap(),
        0,
        "once per purchase"
    );
    let mails: Vec<(String, serde_json::Value)> =
        sqlx::query_as("SELECT purpose, params FROM outbox WHERE purpose IN ('messages_near_limit', 'credits_low') ORDER BY purpose")
            .fetch_all(&app.db)
            .await
            .unwrap();
    assert_eq!(mails.len(), 2, "{mails:?}");
    assert_eq!(mails[0].1["left"], "$1.00");
    assert_eq!(mails[1].1["used"], "90");
}
