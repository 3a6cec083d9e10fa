//! What a test reads of a cluster besides its API: rows in its database,
//! containers in Docker, and its processes' Prometheus metrics.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Result;
use serde_json::Value;

use crate::{wait_for, Cluster};

impl Cluster {
    /// One Prometheus sample from node `i`'s agent (0 when absent).
    pub async fn agent_metric(&self, i: usize, name: &str) -> Result<f64> {
        self.metric_at(self.agent_metrics[i], name).await
    }

    /// One Prometheus sample from the process serving `/metrics` at `addr`
    /// (0 when absent).
    pub async fn metric_at(&self, addr: SocketAddr, name: &str) -> Result<f64> {
        let text = self
            .client
            .get(format!("http://{addr}/metrics"))
            .send()
            .await?
            .text()
            .await?;
        Ok(metric_value(&text, name).unwrap_or(0.0))
    }

    pub async fn edge_metric(&self, name: &str) -> Result<f64> {
        self.metric_at(self.edge_admin, name).await
    }

    /// One Prometheus sample from scheduler `i` (0 when absent).
    pub async fn scheduler_metric(&self, i: usize, name: &str) -> Result<f64> {
        self.metric_at(self.https[i], name).await
    }

    /// Every node has a fresh heartbeat.
    pub async fn wait_nodes_connected(&self, within: Duration) -> Result<()> {
        let n = self.node_ids.len() as i64;
        wait_for(within, "all agents connected", || async {
            let live: i64 = sqlx::query_scalar("SELECT count(*) FROM nodes WHERE state = 'active' AND last_heartbeat > now() - interval '5 seconds'")
                .fetch_one(&self.db)
                .await
                .unwrap_or(0);
            Ok(live >= n)
        })
        .await
    }

    pub async fn idle_by_node(&self) -> Result<HashMap<String, i64>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT node_id, count(*) FROM containers WHERE state = 'idle' GROUP BY node_id",
        )
        .fetch_all(&self.db)
        .await?;
        Ok(rows.into_iter().collect())
    }

    pub async fn count(&self, sql: &str) -> Result<i64> {
        Ok(sqlx::query_scalar(sql).fetch_one(&self.db).await?)
    }

    /// Waits until at least `n` containers are idle.
    pub async fn wait_idle_at_least(&self, n: i64, within: Duration) -> Result<()> {
        wait_for(within, &format!("at least {n} idle containers"), || async {
            Ok(self.idle_by_node().await?.values().sum::<i64>() >= n)
        })
        .await
    }

    /// Waits until exactly `n` containers are idle; with `spread`, on every node.
    pub async fn wait_idle(
        &self,
        n: i64,
        spread: bool,
        within: Duration,
    ) -> Result<HashMap<String, i64>> {
        wait_for(
            within,
            &format!(
                "{n} idle containers{}",
                if spread { " on every node" } else { "" }
            ),
            || async {
                let by_node = self.idle_by_node().await?;
                let total: i64 = by_node.values().sum();
                let all_nodes = self
                    .node_ids
                    .iter()
                    .all(|id| by_node.get(id).copied().unwrap_or(0) > 0);
                Ok(total == n && (!spread || all_nodes))
            },
        )
        .await?;
        self.idle_by_node().await
    }

    /// Docker ids of the running containers of this cluster's nodes.
    pub fn docker_running(&self) -> Vec<String> {
        self.node_ids
            .iter()
            .flat_map(|node| {
                let out = Command::new("docker")
                    .args([
                        "ps",
                        "-q",
                        "--no-trunc",
                        "--filter",
                        &format!("label=clawdeploy.node={node}"),
                    ])
                    .output();
                out.map(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .split_whitespace()
                        .map(str::to_owned)
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
            })
            .collect()
    }

    /// Waits until Docker runs exactly as many of this cluster's containers
    /// as the database holds idle or assigned.
    pub async fn wait_docker_matches_db(&self, within: Duration) -> Result<()> {
        wait_for(within, "Docker to run what the database wants", || async {
            let want = self
                .count("SELECT count(*) FROM containers WHERE state IN ('idle', 'assigned')")
                .await?;
            Ok(self.docker_running().len() as i64 == want)
        })
        .await
    }

    pub fn docker_inspect(&self, docker_id: &str) -> Result<Value> {
        let out = Command::new("docker")
            .args(["inspect", docker_id])
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "docker inspect failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout)?;
        Ok(v[0].clone())
    }
}

/// The value of the first Prometheus sample named `name`: a bare name
/// matches any labels, a name with `{labels}` matches them exactly.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| {
            if name.contains('{') {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' '))
            } else {
                l.split([' ', '{']).next() == Some(name)
            }
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Removes the containers, volumes and networks an agent with this node id made.
pub fn docker_cleanup_node(node: &str) {
    let filter = format!("label=clawdeploy.node={node}");
    // (how to list them, how to remove them), containers first: volumes and
    // networks in use cannot be removed.
    let kinds: [(&[&str], &[&str]); 3] = [
        (&["ps", "-aq"], &["rm", "-f"]),
        (&["volume", "ls", "-q"], &["volume", "rm", "-f"]),
        (&["network", "ls", "-q"], &["network", "rm"]),
    ];
    for (list, remove) in kinds {
        let ids: Vec<String> = Command::new("docker")
            .args(list)
            .args(["--filter", &filter])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        if !ids.is_empty() {
            let _ = Command::new("docker")
                .args(remove)
                .args(&ids)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}
