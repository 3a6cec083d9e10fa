//! Operator-side helpers shared by the migration tests and the migration
//! benchmark: where an instance runs, starting and following migrations and
//! drains, a client polling a tenant through the edge, and the downtime it
//! saw.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

use clawdeploy_scheduler::archives::{ArchiveConfig, Archives};

use crate::{Cluster, ADMIN_TOKEN};

/// The archive store `scripts/test` starts (moto), from the
/// `CLAWDEPLOY_ARCHIVE_*` variables it exports, as the scheduler sees it.
pub fn archive_store() -> Archives {
    let env = |k: &str| {
        std::env::var(k)
            .unwrap_or_else(|_| panic!("{k} is not set: run the suite with scripts/test"))
    };
    Archives::new(&ArchiveConfig {
        endpoint: env("CLAWDEPLOY_ARCHIVE_ENDPOINT"),
        bucket: env("CLAWDEPLOY_ARCHIVE_BUCKET"),
        region: env("CLAWDEPLOY_ARCHIVE_REGION"),
        access_key_id: env("CLAWDEPLOY_ARCHIVE_ACCESS_KEY_ID"),
        secret_access_key: env("CLAWDEPLOY_ARCHIVE_SECRET_ACCESS_KEY"),
        url_ttl: std::time::Duration::from_secs(300),
    })
    .expect("the archive store's settings")
}

/// Where the instance runs now: its container and node.
pub async fn placement(c: &Cluster, instance: Uuid) -> Result<(Uuid, String)> {
    Ok(sqlx::query_as(
        "SELECT c.id, c.node_id FROM instances i JOIN containers c ON c.id = i.container_id WHERE i.id = $1",
    )
    .bind(instance)
    .fetch_one(&c.db)
    .await?)
}

/// The ready instance named `subdomain`.
pub async fn instance_of(c: &Cluster, subdomain: &str) -> Result<Uuid> {
    Ok(
        sqlx::query_scalar("SELECT id FROM instances WHERE subdomain = $1 AND status = 'ready'")
            .bind(subdomain)
            .fetch_one(&c.db)
            .await?,
    )
}

/// The host directory of a container's state volume.
pub fn volume_dir(c: &Cluster, node: &str, container: Uuid) -> std::path::PathBuf {
    c.dir.join(node).join("volumes").join(container.to_string())
}

/// `POST /admin/instances/migrate`: status and answer.
pub async fn migrate(c: &Cluster, instance: Uuid, target: Option<&str>) -> Result<(u16, Value)> {
    let mut body = json!({"instanceId": instance});
    if let Some(t) = target {
        body["targetNode"] = t.into();
    }
    c.admin(
        Method::POST,
        "/admin/instances/migrate",
        Some(body),
        Some(ADMIN_TOKEN),
    )
    .await
}

/// `POST /admin/nodes/{node}/drain`, with an optional body.
pub async fn drain(c: &Cluster, node: &str, body: Option<Value>) -> Result<(u16, Value)> {
    c.admin(
        Method::POST,
        &format!("/admin/nodes/{node}/drain"),
        body,
        Some(ADMIN_TOKEN),
    )
    .await
}

/// `POST /admin/nodes/{node}/activate`, which must answer 200.
pub async fn activate(c: &Cluster, node: &str) -> Result<()> {
    let (status, body) = c
        .admin(
            Method::POST,
            &format!("/admin/nodes/{node}/activate"),
            None,
            Some(ADMIN_TOKEN),
        )
        .await?;
    anyhow::ensure!(status == 200, "activate {node} answered {status}: {body}");
    Ok(())
}

/// Polls the migration until it ends (done or rolled back); its final view.
pub async fn wait_migration(c: &Cluster, id: &str, within: Duration) -> Result<Value> {
    let deadline = Instant::now() + within;
    loop {
        let got = c
            .admin(
                Method::GET,
                &format!("/admin/migrations/{id}"),
                None,
                Some(ADMIN_TOKEN),
            )
            .await;
        if let Ok((200, v)) = &got {
            if v["state"] == "done" || v["state"] == "rolled_back" {
                return Ok(v.clone());
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "migration {id} did not end: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Each request's completion time (since the poller started) and success.
pub type Outcomes = Vec<(Duration, bool)>;

/// A client calling a tenant's `/v1/models` through the edge every
/// `every`, until stopped.
pub struct Poller {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Outcomes>,
}

impl Poller {
    pub fn start(c: &Cluster, host: String, gw: String, every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("client");
        let url = format!("http://{}/v1/models", c.edge);
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut seen = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let r = client
                    .get(&url)
                    .header("host", &host)
                    .bearer_auth(&gw)
                    .send()
                    .await;
                seen.push((started.elapsed(), matches!(&r, Ok(r) if r.status() == 200)));
                tokio::time::sleep(every).await;
            }
            seen
        });
        Poller { stop, task }
    }

    pub async fn stop(self) -> Result<Outcomes> {
        self.stop.store(true, Ordering::Relaxed);
        Ok(self.task.await?)
    }
}

/// The customer-visible downtime: the longest time between two successful
/// answers (a request that hangs counts in full), and how many failed.
pub fn downtime(seen: &[(Duration, bool)]) -> (Duration, usize) {
    let ok: Vec<Duration> = seen
        .iter()
        .filter(|(_, ok)| *ok)
        .map(|(at, _)| *at)
        .collect();
    let longest = ok.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default();
    (longest, seen.iter().filter(|(_, ok)| !ok).count())
}

/// The CPU (millicores) and memory (bytes) Docker enforces on a container,
/// and when it started.
pub fn docker_limits(c: &Cluster, docker_id: &str) -> Result<(i64, i64, Value)> {
    let v = c.docker_inspect(docker_id)?;
    Ok((
        v["HostConfig"]["NanoCpus"].as_i64().unwrap_or(0) / 1_000_000,
        v["HostConfig"]["Memory"].as_i64().unwrap_or(0),
        v["State"]["StartedAt"].clone(),
    ))
}
