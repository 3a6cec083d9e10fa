//! The outbox over the fake mailer: a cause mails once, links come from
//! the configuration, a server that is away delays mail (and the rest of
//! the pass) with backoff, a refusal for good fails the mail, and two
//! senders never send one mail twice.

use clawdeploy_scheduler::app::Config;
use clawdeploy_scheduler::mail::FakeMailer;
use clawdeploy_scheduler::outbox;
use uuid::Uuid;

use crate::support::*;

async fn live(app: &clawdeploy_scheduler::App, ids: &[Uuid]) {
    let mut conn = app.db.acquire().await.unwrap();
    outbox::gateway_live(&mut conn, ids).await.unwrap();
}

/// Makes every pending mail due now (as if its wait were over).
async fn due_now(app: &clawdeploy_scheduler::App) {
    sqlx::query("UPDATE outbox SET next_attempt_at = now() WHERE state = 'pending'")
        .execute(&app.db)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_cause_mails_once_with_links_from_the_configuration() {
    let app = app_with(Config {
        public_origin: "https://app.example.com/".into(),
        base_domain: "claw.example".into(),
        ..Config::default()
    })
    .await;
    let a = instance(&app, "mailone", None).await;
    live(&app, &[a]).await;
    live(&app, &[a]).await;
    assert_eq!(count(&app, "SELECT count(*) FROM outbox").await, 1);

    let mailer = FakeMailer::default();
    let pass = outbox::send_due(&app, &mailer, 10).await.unwrap();
    assert_eq!((pass.sent, pass.failed, pass.deferred), (1, 0, 0));
    let sent = mailer.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].to, "mailone@example.com");
    assert!(
        sent[0]
            .text
            .contains("live at https://mailone.claw.example"),
        "{}",
        sent[0].text
    );
    assert!(
        sent[0].text.contains("https://app.example.com/"),
        "{}",
        sent[0].text
    );
    // Sent: nothing more to send, and the cause recorded again mails nothing.
    live(&app, &[a]).await;
    assert_eq!(outbox::send_due(&app, &mailer, 10).await.unwrap().sent, 0);
    assert_eq!(mailer.sent().len(), 1);
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM outbox WHERE state = 'sent' AND sent_at IS NOT NULL"
        )
        .await,
        1
    );
}

#[tokio::test]
async fn a_server_away_delays_the_pass_and_a_refusal_fails_the_mail() {
    let app = app().await;
    let ids = [
        instance(&app, "away-a", None).await,
        instance(&app, "away-b", None).await,
        instance(&app, "away-c", None).await,
    ];
    live(&app, &ids).await;
    let mailer = FakeMailer::default();

    // Away: the first try fails and the pass stops; the other two wait
    // untried, all three not due again at once.
    mailer.fail(Some(false));
    let pass = outbox::send_due(&app, &mailer, 10).await.unwrap();
    assert_eq!((pass.sent, pass.failed, pass.deferred), (0, 0, 3));
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM outbox WHERE attempts = 1 AND last_error IS NOT NULL"
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM outbox WHERE state = 'pending' AND next_attempt_at > now()"
        )
        .await,
        3
    );
    assert_eq!(
        outbox::send_due(&app, &mailer, 10).await.unwrap(),
        Default::default()
    );

    // Back: all three go.
    mailer.fail(None);
    due_now(&app).await;
    assert_eq!(outbox::send_due(&app, &mailer, 10).await.unwrap().sent, 3);
    assert_eq!(mailer.sent().len(), 3);

    // Refused for good: failed, not tried again.
    let d = instance(&app, "refused", None).await;
    live(&app, &[d]).await;
    mailer.fail(Some(true));
    let pass = outbox::send_due(&app, &mailer, 10).await.unwrap();
    assert_eq!((pass.sent, pass.failed), (0, 1));
    due_now(&app).await;
    assert_eq!(
        outbox::send_due(&app, &mailer, 10).await.unwrap(),
        Default::default()
    );
    assert_eq!(
        count(&app, "SELECT count(*) FROM outbox WHERE state = 'failed' AND last_error LIKE 'mail refused%'").await,
        1
    );
}

#[tokio::test]
async fn two_senders_never_send_one_mail_twice() {
    let app = app().await;
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(instance(&app, &format!("race{i}"), None).await);
    }
    live(&app, &ids).await;
    let mailer = std::sync::Arc::new(FakeMailer::default());
    let passes = futures::future::join_all((0..4).map(|_| {
        let (app, mailer) = (app.clone(), mailer.clone());
        async move { outbox::send_due(&app, &*mailer, 8).await.unwrap().sent }
    }))
    .await;
    let mut again = 0;
    while mailer.sent().len() < 20 && again < 5 {
        again += 1;
        outbox::send_due(&app, &*mailer, 8).await.unwrap();
    }
    let mut to: Vec<String> = mailer.sent().into_iter().map(|m| m.to).collect();
    to.sort();
    to.dedup();
    assert_eq!(to.len(), 20, "each mailed once: {passes:?}");
    assert_eq!(mailer.sent().len(), 20);
}
