//! Backups on the real system, through the S3-compatible store that
//! `scripts/test` starts: the daily schedule (shortened) stores one and the
//! customer sees it; a restore brings back a file deleted after it; an
//! archive corrupted in the store is refused by the importer and the tenant
//! stays where it was, live; a released instance is exported before its
//! data is destroyed.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clawdeploy_e2e::ops::{archive_store, placement, volume_dir};
use clawdeploy_e2e::{wait_for, Cluster, ClusterOptions, ADMIN_TOKEN, BASE_DOMAIN};
use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

async fn my_backups(c: &Cluster, token: &str) -> Result<Vec<Value>> {
    let r = c
        .client
        .get(c.api("/api/instances/me/backups"))
        .bearer_auth(token)
        .send()
        .await?;
    anyhow::ensure!(r.status() == 200, "backups answered {}", r.status());
    let v: Value = r.json().await?;
    Ok(v["backups"].as_array().context("backups")?.clone())
}

/// Restores `backup`, retrying while a scheduled backup holds the
/// instance; returns the migration once it ended.
async fn restore(c: &Cluster, instance: Uuid, backup: &str) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let started = loop {
        let (status, v) = c
            .admin(
                Method::POST,
                &format!("/admin/instances/{instance}/restore"),
                Some(json!({"backupId": backup})),
                Some(ADMIN_TOKEN),
            )
            .await?;
        if status == 202 {
            break v;
        }
        anyhow::ensure!(
            status == 409
                && v["error"]["code"] == "backup_in_progress"
                && Instant::now() < deadline,
            "restore answered {status}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let id = started["id"].as_str().context("id")?.to_owned();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (_, v) = c
            .admin(
                Method::GET,
                &format!("/admin/migrations/{id}"),
                None,
                Some(ADMIN_TOKEN),
            )
            .await?;
        if v["state"] == "done" || v["state"] == "rolled_back" {
            return Ok(v);
        }
        anyhow::ensure!(Instant::now() < deadline, "restore did not end: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn answers(c: &Cluster, host: &str, gw: &str) -> Result<()> {
    wait_for(Duration::from_secs(30), "the tenant answering", || async {
        Ok(c.edge_get(host, "/v1/models", Some(gw)).await?.0 == 200)
    })
    .await
}

#[tokio::test]
async fn backups_restore_refuse_a_corrupt_archive_and_precede_destruction() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        nodes: 1,
        min_idle: 2,
        max_idle: 4,
        scheduler_args: ["--backup-interval-secs", "15", "--release-grace-secs", "4"]
            .map(String::from)
            .to_vec(),
        ..Default::default()
    })
    .await?;
    c.wait_idle_at_least(2, Duration::from_secs(120)).await?;
    let (token, gw) = c
        .sign_up(
            "keeper@example.com",
            "keeper",
            json!({"openai": "sk-keep-1"}),
        )
        .await?;
    let host = format!("keeper.{BASE_DOMAIN}");
    let instance: Uuid = sqlx::query_scalar("SELECT id FROM instances WHERE subdomain = 'keeper'")
        .fetch_one(&c.db)
        .await?;
    let (container, node) = placement(&c, instance).await?;
    std::fs::write(
        volume_dir(&c, &node, container).join("diary.txt"),
        "day one",
    )?;

    // The schedule (every 15 s here, daily by default) stores a backup; the
    // customer sees it, and its archive is in the store.
    let deadline = Instant::now() + Duration::from_secs(60);
    let stored = loop {
        let list = my_backups(&c, &token).await?;
        if let Some(b) = list
            .iter()
            .find(|b| b["state"] == "stored" && b["kind"] == "scheduled")
        {
            break b.clone();
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no scheduled backup stored: {list:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let backup = stored;
    assert!(backup["bytes"].as_i64().unwrap_or(0) > 0, "{backup}");
    let backup_id = backup["id"].as_str().context("id")?.to_owned();
    let key: String = sqlx::query_scalar("SELECT archive_key FROM backups WHERE id = $1::uuid")
        .bind(&backup_id)
        .fetch_one(&c.db)
        .await?;
    let archives = archive_store();
    assert_eq!(
        archives.size(&key).await?,
        backup["bytes"].as_i64().map(|b| b as u64)
    );
    answers(&c, &host, &gw).await?;

    // The file is deleted after the backup; the restore brings it back in a
    // new container, with the same gateway token.
    let (container, node) = placement(&c, instance).await?;
    std::fs::remove_file(volume_dir(&c, &node, container).join("diary.txt"))?;
    let done = restore(&c, instance, &backup_id).await?;
    assert_eq!(done["state"], "done", "{done}");
    assert_eq!(done["kind"], "restore");
    let (restored, node) = placement(&c, instance).await?;
    assert_ne!(restored, container);
    assert_eq!(
        std::fs::read_to_string(volume_dir(&c, &node, restored).join("diary.txt"))?,
        "day one"
    );
    answers(&c, &host, &gw).await?;
    // A restore keeps its backup: it can be restored again.
    assert_eq!(
        archives.size(&key).await?,
        backup["bytes"].as_i64().map(|b| b as u64)
    );

    // A byte flipped in the stored archive: the importer refuses it, the
    // restore rolls back and the tenant runs where it was.
    let http = reqwest::Client::new();
    let mut bytes = http
        .get(archives.download_url(&key).await?)
        .send()
        .await?
        .bytes()
        .await?
        .to_vec();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    let put = http
        .put(archives.upload_url(&key).await?)
        .body(bytes)
        .send()
        .await?;
    assert!(put.status().is_success());
    let ended = restore(&c, instance, &backup_id).await?;
    assert_eq!(ended["state"], "rolled_back", "{ended}");
    assert!(
        ended["error"]
            .as_str()
            .unwrap_or("")
            .contains("does not match"),
        "{ended}"
    );
    assert_eq!(placement(&c, instance).await?.0, restored);
    answers(&c, &host, &gw).await?;

    // Released: once the grace period (4 s here) is over, the data is
    // exported, and only then destroyed.
    let (status, _) = c.my_instance(Method::DELETE, &token, None).await?;
    assert_eq!(status, 200);
    wait_for(
        Duration::from_secs(90),
        "the released instance destroyed",
        || async {
            let status: String = sqlx::query_scalar("SELECT status FROM instances WHERE id = $1")
                .bind(instance)
                .fetch_one(&c.db)
                .await?;
            Ok(status == "deleted")
        },
    )
    .await?;
    let (release_key, at, destroyed_after): (String, String, bool) = sqlx::query_as(
        "SELECT b.archive_key, b.finished_at::text,
                b.finished_at <= (SELECT max(at) FROM audit_log WHERE action = 'instance.destroyed' AND subject = $1::text)
           FROM backups b WHERE b.instance_id = $1 AND b.kind = 'release' AND b.state = 'stored'",
    )
    .bind(instance)
    .fetch_one(&c.db)
    .await?;
    assert!(destroyed_after, "exported at {at}, destroyed before it");
    assert!(archives.size(&release_key).await?.unwrap_or(0) > 0);
    Ok(())
}

#[tokio::test]
async fn backups_past_their_retention_leave_the_archive_store() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        nodes: 1,
        min_idle: 1,
        max_idle: 2,
        scheduler_args: [
            "--backup-interval-secs",
            "2",
            "--backup-retention-secs",
            "8",
        ]
        .map(String::from)
        .to_vec(),
        ..Default::default()
    })
    .await?;
    c.wait_idle_at_least(1, Duration::from_secs(120)).await?;
    let (token, gw) = c
        .sign_up("brief@example.com", "brief", json!({"openai": "sk-brief"}))
        .await?;
    let archives = archive_store();
    // The first backup, stored…
    let deadline = Instant::now() + Duration::from_secs(60);
    let (first, key): (Uuid, String) = loop {
        let row: Option<(Uuid, String)> = sqlx::query_as(
            "SELECT id, archive_key FROM backups WHERE state = 'stored' ORDER BY created_at LIMIT 1",
        )
        .fetch_optional(&c.db)
        .await?;
        if let Some(r) = row {
            break r;
        }
        anyhow::ensure!(Instant::now() < deadline, "no backup stored");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(archives.size(&key).await?.is_some());
    // …is deleted from the store once past the retention, and no longer
    // listed; newer ones are.
    wait_for(
        Duration::from_secs(60),
        "the first backup expired",
        || async {
            let state: String = sqlx::query_scalar("SELECT state FROM backups WHERE id = $1")
                .bind(first)
                .fetch_one(&c.db)
                .await?;
            Ok(state == "expired")
        },
    )
    .await?;
    assert_eq!(archives.size(&key).await?, None);
    let listed = my_backups(&c, &token).await?;
    assert!(
        listed.iter().all(|b| b["id"] != first.to_string()),
        "{listed:?}"
    );
    assert!(listed.iter().any(|b| b["state"] == "stored"), "{listed:?}");
    answers(&c, &format!("brief.{BASE_DOMAIN}"), &gw).await?;
    Ok(())
}
