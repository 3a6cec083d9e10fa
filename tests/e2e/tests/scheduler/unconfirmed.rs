//! Claims no agent confirms: moved once, then failed.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unconfirmed_claim_moves_to_a_fresh_container_and_the_first_is_destroyed() -> Result<()>
{
    let c = Cluster::start(ClusterOptions {
        min_idle: 4,
        claim_wait_secs: 1,
        claim_timeout_secs: Some(3),
        ..Default::default()
    })
    .await?;
    let by_node = c.wait_idle(4, true, Duration::from_secs(120)).await?;
    assert!(by_node.len() == 2, "{by_node:?}");
    let hung = c.node_ids[0].clone();
    // The agent hangs: its connection stays open, it answers nothing.
    c.pause_agent(0, true)?;
    let accounts = c.register_many("hung", 6).await?;
    let mut victim = None;
    for (i, account) in accounts.iter().enumerate() {
        let sub = format!("hung-{i}");
        let (status, body) = c
            .create_instance(
                account,
                &json!({"subdomain": sub, "apiKeys": {"openai": "sk"}}),
            )
            .await?;
        let (container, node) = placement_of(&c, &sub).await?;
        if node == hung {
            assert_eq!(status, 202, "{body}");
            assert!(body["instance"]["gatewayToken"].is_null());
            victim = Some((i, sub, container, body));
            break;
        }
        assert_eq!(status, 201, "{body}");
    }
    let (i, sub, first, body) = victim.context("no claim landed on the hung node")?;
    let url = body["instance"]["statusUrl"]
        .as_str()
        .context("status URL")?;
    // After the claim timeout it moves to a fresh container on the other node.
    let view = wait_ready(&c, &accounts[i], url, Duration::from_secs(30)).await?;
    let (second, node) = placement_of(&c, &sub).await?;
    assert_ne!(second, first);
    assert_ne!(node, hung);
    let gw = view["instance"]["gatewayToken"].as_str().context("token")?;
    models_ok(&c, &sub, gw).await?;
    let first_state: String =
        sqlx::query_scalar("SELECT state FROM containers WHERE id::text = $1")
            .bind(&first)
            .fetch_one(&c.db)
            .await?;
    assert_eq!(first_state, "destroying");
    assert_eq!(
        c.count(&format!(
            "SELECT claim_attempts::bigint FROM instances WHERE subdomain = '{sub}'"
        ))
        .await?,
        2
    );
    assert_eq!(audit_count(&c, "instance.claim_retry").await?, 1);
    assert!(
        c.scheduler_metric(0, "clawdeploy_assignments_total{result=\"retried\"}")
            .await?
            >= 1.0
    );
    // The agent wakes up: the abandoned container goes, the tenant stays
    // on its new one.
    c.pause_agent(0, false)?;
    wait_for(
        Duration::from_secs(60),
        "the first container destroyed",
        || async {
            let state: String =
                sqlx::query_scalar("SELECT state FROM containers WHERE id::text = $1")
                    .bind(&first)
                    .fetch_one(&c.db)
                    .await?;
            Ok(state == "destroyed")
        },
    )
    .await?;
    c.wait_docker_matches_db(Duration::from_secs(30)).await?;
    let (now, _) = placement_of(&c, &sub).await?;
    assert_eq!(now, second);
    models_ok(&c, &sub, gw).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_unconfirmed_twice_fails_and_frees_its_subdomain() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        min_idle: 4,
        claim_wait_secs: 1,
        claim_timeout_secs: Some(2),
        ..Default::default()
    })
    .await?;
    c.wait_idle(4, true, Duration::from_secs(120)).await?;
    let account = c.register("twice@example.com").await?;
    // Both agents hang: the claim and its retry both go unanswered.
    c.pause_agent(0, true)?;
    c.pause_agent(1, true)?;
    let (status, body) = c
        .create_instance(
            &account,
            &json!({"subdomain": "twice", "apiKeys": {"openai": "sk"}}),
        )
        .await?;
    assert_eq!(status, 202, "{body}");
    let url = body["instance"]["statusUrl"]
        .as_str()
        .context("status URL")?;
    let mut view = Value::Null;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        view = get_json(&c, url, &account).await?;
        if view["instance"]["status"] == "failed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(view["instance"]["status"], "failed", "{view}");
    assert!(view["instance"]["gatewayToken"].is_null());
    assert_eq!(audit_count(&c, "instance.claim_retry").await?, 1);
    assert_eq!(audit_count(&c, "instance.failed").await?, 1);
    // The containers of the first claim and of the retry, as audited (the
    // pool may retire an idle container of its own meanwhile).
    assert_eq!(
        c.count(
            "SELECT count(*) FROM containers WHERE state = 'destroying' AND id::text IN (
                SELECT detail->>'from' FROM audit_log WHERE action = 'instance.claim_retry'
                UNION SELECT detail->>'container' FROM audit_log WHERE action = 'instance.failed')"
        )
        .await?,
        2,
        "both unconfirmed containers are being destroyed"
    );
    // The agents wake up: both containers go, and the customer can try
    // again with the same subdomain.
    c.pause_agent(0, false)?;
    c.pause_agent(1, false)?;
    c.wait_nodes_connected(Duration::from_secs(30)).await?;
    wait_for(
        Duration::from_secs(60),
        "unconfirmed containers destroyed",
        || async {
            Ok(
                c.count("SELECT count(*) FROM containers WHERE state = 'destroying'")
                    .await?
                    == 0,
            )
        },
    )
    .await?;
    let (status, body) = c
        .create_instance(
            &account,
            &json!({"subdomain": "twice", "apiKeys": {"openai": "sk"}}),
        )
        .await?;
    assert!(status == 201 || status == 202, "{status}: {body}");
    let url = body["instance"]["statusUrl"]
        .as_str()
        .context("status URL")?;
    let view = wait_ready(&c, &account, url, Duration::from_secs(60)).await?;
    let gw = view["instance"]["gatewayToken"].as_str().context("token")?;
    models_ok(&c, "twice", gw).await?;
    c.wait_docker_matches_db(Duration::from_secs(30)).await?;
    Ok(())
}
