//! Mail through a real SMTP server (aiosmtpd on loopback, into a Maildir):
//! a signup's "gateway is live" mail arrives once, with links from the
//! configured origin; while the server is away (30 s, twenty signups) the
//! outbox keeps the mail, and each arrives once when it is back; a registration's verification
//! link proves the address, once, and unlocks custom domains.

use clawdeploy_e2e::smtp::SmtpServer;

use super::*;

const LIVE: &str = "Your OpenClaw gateway is live";

/// The "gateway is live" mails to `to`.
fn live_mail(smtp: &SmtpServer, to: &str) -> Result<Vec<clawdeploy_e2e::smtp::Received>> {
    Ok(smtp
        .messages_to(to)?
        .into_iter()
        .filter(|m| m.subject == LIVE)
        .collect())
}

/// A one-node cluster whose scheduler mails through an SMTP server of the
/// test's own, with links from `https://app.clawdeploy.test`, a pool of
/// `min_idle` and these scheduler flags besides.
async fn mailing_cluster(min_idle: u32, flags: &[&str]) -> Result<(SmtpServer, Cluster)> {
    let dir = clawdeploy_e2e::workspace_root()
        .join(".local/e2e")
        .join(format!("smtp-{}", uuid::Uuid::new_v4().simple()));
    let smtp = SmtpServer::start(&dir).await?;
    let mut scheduler_args = vec![
        "--smtp-url".to_owned(),
        smtp.url(),
        "--public-origin".to_owned(),
        "https://app.clawdeploy.test".to_owned(),
    ];
    scheduler_args.extend(flags.iter().map(|f| f.to_string()));
    let c = Cluster::start(ClusterOptions {
        nodes: 1,
        min_idle,
        max_idle: min_idle.max(1) * 2,
        scheduler_args,
        ..Default::default()
    })
    .await?;
    if min_idle > 0 {
        c.wait_idle_at_least(i64::from(min_idle), Duration::from_secs(90))
            .await?;
    }
    Ok((smtp, c))
}

/// The token of the link (`#<fragment>=<token>`) in the mail titled
/// `subject` to `to`, once it has arrived.
async fn mailed_token(
    smtp: &SmtpServer,
    to: &str,
    subject: &str,
    fragment: &str,
) -> Result<String> {
    smtp.link_token(to, subject, fragment).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_live_mail_arrives_once_and_waits_out_a_server_that_is_away() -> Result<()> {
    let (mut smtp, c) = mailing_cluster(4, &[]).await?;

    let first = c.register("mail-first@example.com").await?;
    let (status, v) = c
        .create_instance(&first, &json!({"subdomain": "mailfirst"}))
        .await?;
    assert_eq!(status, 201, "{v}");
    let url = v["instance"]["url"].as_str().context("url")?.to_owned();
    wait_for(Duration::from_secs(20), "the gateway-live mail", || async {
        Ok(!live_mail(&smtp, "mail-first@example.com")?.is_empty())
    })
    .await?;
    let mail = &live_mail(&smtp, "mail-first@example.com")?[0];
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

    // The server goes away for 30 s: twenty accounts sign up meanwhile,
    // three of them with a gateway; their mail waits.
    smtp.stop();
    let away = std::time::Instant::now();
    let emails: Vec<String> = (0..20).map(|i| format!("mail-{i}@example.com")).collect();
    for (i, email) in emails.iter().enumerate() {
        let token = c.register(email).await?;
        if i < 3 {
            let (status, v) = c
                .create_instance(&token, &json!({"subdomain": format!("mailaway{i}")}))
                .await?;
            assert_eq!(status, 201, "{v}");
        }
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
        c.count("SELECT count(*) FROM outbox WHERE state = 'pending' AND purpose = 'gateway_live'")
            .await?,
        3
    );
    // Three gateway-live mails and the twenty registrations' links wait.
    wait_for(
        Duration::from_secs(10),
        "the backlog in the metrics",
        || async {
            Ok(c.scheduler_metric(0, "clawdeploy_mail_outbox_pending")
                .await?
                == 23.0)
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(away.elapsed())).await;

    // Back: each waiting mail arrives, once.
    smtp.resume().await?;
    wait_for(Duration::from_secs(90), "the waiting mail", || async {
        Ok(c.count("SELECT count(*) FROM outbox WHERE state = 'sent'")
            .await?
            == 25)
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (i, email) in emails.iter().enumerate() {
        let want = if i < 3 { 1 } else { 0 };
        assert_eq!(live_mail(&smtp, email)?.len(), want, "{email}");
        assert_eq!(
            smtp.messages_to(email)?.len(),
            want + 1,
            "{email}: and its link"
        );
    }
    assert_eq!(live_mail(&smtp, "mail-first@example.com")?.len(), 1);
    assert_eq!(smtp.messages()?.len(), 25);
    assert_eq!(
        c.count("SELECT count(*) FROM outbox WHERE state <> 'sent'")
            .await?,
        0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mailed_link_proves_the_address_once_and_unlocks_custom_domains() -> Result<()> {
    let (smtp, c) = mailing_cluster(1, &[]).await?;
    let token = c.register_unverified("proves@example.com").await?;
    let add_domain = || async {
        let r = c
            .client
            .post(c.api("/api/instances/me/domains"))
            .bearer_auth(&token)
            .json(&json!({"hostname": "chat.example.org"}))
            .send()
            .await?;
        let status = r.status().as_u16();
        let v: Value = r.json().await?;
        anyhow::Ok((
            status,
            v["error"]["code"].as_str().unwrap_or_default().to_owned(),
        ))
    };
    // The gateway comes at once; custom domains wait for the address.
    let (status, v) = c
        .create_instance(&token, &json!({"subdomain": "proves"}))
        .await?;
    assert_eq!(status, 201, "{v}");
    assert_eq!(add_domain().await?, (403, "email_unverified".to_owned()));

    let link_token = mailed_token(
        &smtp,
        "proves@example.com",
        "Confirm your email address",
        "verify-email",
    )
    .await?;
    assert!(
        smtp.messages_to("proves@example.com")?
            .iter()
            .any(|m| m.body.contains(&format!(
                "https://app.clawdeploy.test/#verify-email={link_token}"
            ))),
        "the link comes from --public-origin"
    );
    assert_eq!(link_token.len(), 64);

    // The link's token, as the page posts it: once.
    let c = &c;
    let verify = |t: String| async move {
        let r = c
            .client
            .post(c.api("/api/auth/verify-email"))
            .json(&json!({"token": t}))
            .send()
            .await?;
        let status = r.status().as_u16();
        let v: Value = r.json().await?;
        anyhow::Ok((status, v))
    };
    let (status, v) = verify(link_token.clone()).await?;
    assert_eq!((status, &v["verified"]), (200, &json!(true)), "{v}");
    let (status, v) = verify(link_token).await?;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("invalid_token"))
    );
    // Proven: what stops the domain now is the free plan.
    assert_eq!(add_domain().await?, (403, "plan_required".to_owned()));
    // Asking for another link answers the same, and mails nothing now.
    let r = c
        .client
        .post(c.api("/api/auth/resend-verification"))
        .bearer_auth(&token)
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 202);
    assert_eq!(
        c.count("SELECT count(*) FROM email_verifications").await?,
        1
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_grace_an_unproven_gateway_pauses_and_proof_resumes_it_in_seconds() -> Result<()> {
    use clawdeploy_e2e::ops::{placement, volume_dir};
    let (smtp, c) = mailing_cluster(1, &["--verify-grace-hours", "0.005"]).await?;
    let token = c.register_unverified("pauses@example.com").await?;
    let (status, v) = c
        .create_instance(&token, &json!({"subdomain": "pauses"}))
        .await?;
    assert_eq!(status, 201, "{v}");
    let gw = v["instance"]["gatewayToken"]
        .as_str()
        .context("token")?
        .to_owned();
    let host = host("pauses");
    assert_eq!(c.edge_get(&host, "/v1/models", Some(&gw)).await?.0, 200);
    let instance: uuid::Uuid = v["instance"]["id"].as_str().context("id")?.parse()?;
    let (container, node) = placement(&c, instance).await?;
    let note = volume_dir(&c, &node, container).join("notes.txt");
    std::fs::write(&note, "kept while paused")?;

    // Past the grace: the gateway is stopped and the edge says why.
    wait_for(Duration::from_secs(60), "the edge to pause it", || async {
        Ok(c.edge_get(&host, "/v1/models", Some(&gw)).await?.0 == 403)
    })
    .await?;
    let (_, body) = c.edge_get(&host, "/v1/models", Some(&gw)).await?;
    assert!(body.contains("confirms their email address"), "{body}");
    let running = || {
        let out = std::process::Command::new("docker")
            .args(["ps", "-q", "--filter"])
            .arg(format!("label=clawdeploy.container={container}"))
            .output()?;
        anyhow::Ok(!out.stdout.is_empty())
    };
    wait_for(Duration::from_secs(20), "the container to stop", || async {
        Ok(!running()?)
    })
    .await?;

    // The mailed link proves the address: the same container answers
    // again within seconds, its state kept.
    let link_token = mailed_token(
        &smtp,
        "pauses@example.com",
        "Confirm your email address",
        "verify-email",
    )
    .await?;
    let r = c
        .client
        .post(c.api("/api/auth/verify-email"))
        .json(&json!({"token": link_token}))
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 200);
    let proven = Instant::now();
    wait_for(
        Duration::from_secs(5),
        "the gateway to answer again",
        || async { Ok(c.edge_get(&host, "/v1/models", Some(&gw)).await?.0 == 200) },
    )
    .await?;
    println!("resumed {:?} after the proof", proven.elapsed());
    assert_eq!(placement(&c, instance).await?, (container, node.clone()));
    assert_eq!(std::fs::read_to_string(&note)?, "kept while paused");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_password_is_reset_by_its_mailed_link_once_and_every_session_ends() -> Result<()>
{
    let (smtp, c) = mailing_cluster(0, &[]).await?;
    let old_session = c.register("resets@example.com").await?;
    let c = &c;
    let forgot = |email: &'static str| async move {
        let r = c
            .client
            .post(c.api("/api/auth/password/forgot"))
            .json(&json!({ "email": email }))
            .send()
            .await?;
        let status = r.status().as_u16();
        anyhow::Ok((status, r.bytes().await?))
    };
    // Known and unknown: byte for byte the same answer.
    let unknown = forgot("nobody-here@example.com").await?;
    let known = forgot("resets@example.com").await?;
    assert_eq!(unknown, known);
    assert_eq!(known.0, 202);

    let token = mailed_token(
        &smtp,
        "resets@example.com",
        "Reset your ClawDeploy password",
        "reset-password",
    )
    .await?;
    assert!(smtp.messages_to("nobody-here@example.com")?.is_empty());

    let reset = |t: String, p: &'static str| async move {
        let r = c
            .client
            .post(c.api("/api/auth/password/reset"))
            .json(&json!({"token": t, "password": p}))
            .send()
            .await?;
        let status = r.status().as_u16();
        let v: Value = r.json().await?;
        anyhow::Ok((status, v))
    };
    let (status, v) = reset(token.clone(), "a-brand-new-passphrase").await?;
    assert_eq!(status, 200, "{v}");
    let (status, v) = reset(token, "another-new-passphrase").await?;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("invalid_token"))
    );
    // The session from before is over; the new password signs in.
    let r = c
        .client
        .get(c.api("/api/instances/me"))
        .bearer_auth(&old_session)
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 401);
    let (status, _, _) = login(c, "resets@example.com", "a-brand-new-passphrase").await?;
    assert_eq!(status, 200);
    let (status, _, _) = login(c, "resets@example.com", PASSWORD).await?;
    assert_eq!(status, 401);
    wait_for(Duration::from_secs(20), "the notice", || async {
        Ok(smtp
            .messages_to("resets@example.com")?
            .iter()
            .any(|m| m.subject == "Your ClawDeploy password was changed"))
    })
    .await?;
    Ok(())
}
