//! Mail through a real SMTP server (aiosmtpd on loopback, into a Maildir):
//! a signup's "gateway is live" mail arrives once, with links from the
//! configured origin; while the server is away the outbox keeps the mail,
//! and each arrives once when it is back.

use clawdeploy_e2e::smtp::SmtpServer;

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_live_mail_arrives_once_and_waits_out_a_server_that_is_away() -> Result<()> {
    let dir = clawdeploy_e2e::workspace_root()
        .join(".local/e2e")
        .join(format!("smtp-{}", uuid::Uuid::new_v4().simple()));
    let mut smtp = SmtpServer::start(&dir).await?;
    let c = Cluster::start(ClusterOptions {
        nodes: 1,
        min_idle: 4,
        scheduler_args: vec![
            "--smtp-url".into(),
            smtp.url(),
            "--public-origin".into(),
            "https://app.clawdeploy.test".into(),
        ],
        ..Default::default()
    })
    .await?;
    c.wait_idle_at_least(4, Duration::from_secs(90)).await?;

    let first = c.register("mail-first@example.com").await?;
    let (status, v) = c
        .create_instance(&first, &json!({"subdomain": "mailfirst"}))
        .await?;
    assert_eq!(status, 201, "{v}");
    let url = v["instance"]["url"].as_str().context("url")?.to_owned();
    wait_for(Duration::from_secs(20), "the gateway-live mail", || async {
        Ok(!smtp.messages_to("mail-first@example.com")?.is_empty())
    })
    .await?;
    let mail = &smtp.messages_to("mail-first@example.com")?[0];
    assert_eq!(mail.subject, "Your OpenClaw gateway is live");
    assert!(
        mail.body.contains(&format!("live at {url}")),
        "{}",
        mail.body
    );
    assert!(
        mail.body.contains("https://app.clawdeploy.test/"),
        "the dashboard link comes from --public-origin: {}",
        mail.body
    );
    assert!(mail
        .body
        .contains("<a href=\"https://app.clawdeploy.test/\">"));

    // The server goes away: three more signups go live, their mail waits.
    smtp.stop();
    let emails = [
        "mail-1@example.com",
        "mail-2@example.com",
        "mail-3@example.com",
    ];
    for (i, email) in emails.iter().enumerate() {
        let token = c.register(email).await?;
        let (status, v) = c
            .create_instance(&token, &json!({"subdomain": format!("mailaway{i}")}))
            .await?;
        assert_eq!(status, 201, "{v}");
    }
    wait_for(
        Duration::from_secs(20),
        "a failed try kept in the outbox",
        || async {
            Ok(c.count(
                "SELECT count(*) FROM outbox WHERE state = 'pending' AND last_error IS NOT NULL",
            )
            .await?
                >= 1)
        },
    )
    .await?;
    assert_eq!(
        c.count("SELECT count(*) FROM outbox WHERE state = 'pending'")
            .await?,
        3
    );
    wait_for(
        Duration::from_secs(10),
        "the backlog in the metrics",
        || async {
            Ok(c.scheduler_metric(0, "clawdeploy_mail_outbox_pending")
                .await?
                == 3.0)
        },
    )
    .await?;

    // Back: each waiting mail arrives, once.
    smtp.resume().await?;
    wait_for(Duration::from_secs(60), "the waiting mail", || async {
        Ok(c.count("SELECT count(*) FROM outbox WHERE state = 'sent'")
            .await?
            == 4)
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    for email in emails.iter().chain(["mail-first@example.com"].iter()) {
        assert_eq!(smtp.messages_to(email)?.len(), 1, "{email}");
    }
    assert_eq!(smtp.messages()?.len(), 4);
    assert_eq!(
        c.count("SELECT count(*) FROM outbox WHERE state <> 'sent'")
            .await?,
        0
    );
    Ok(())
}
