//! Restarting the Docker daemon under a running node. This is its own test
//! binary with one test: cargo runs test binaries one after another, so no
//! other test's containers are running when the daemon goes away.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clawdeploy_e2e::{wait_for, Cluster};
use serde_json::json;

fn docker_up() -> bool {
    Command::new("docker")
        .arg("info")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Restarts the engine: through systemd where it manages Docker, otherwise
/// by stopping `dockerd` (SIGTERM, as a service manager would) and starting
/// it again with the same command line, detached from this test.
async fn restart_docker() -> Result<()> {
    let systemd = Command::new("systemctl")
        .args(["is-active", "--quiet", "docker"])
        .status()
        .is_ok_and(|s| s.success());
    if systemd {
        let st = Command::new("systemctl")
            .args(["restart", "docker"])
            .status()?;
        anyhow::ensure!(st.success(), "systemctl restart docker failed");
    } else {
        let out = Command::new("pgrep").args(["-x", "dockerd"]).output()?;
        let pid = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .context("no dockerd process")?
            .to_owned();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))?;
        let argv: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let st = Command::new("kill").args(["-TERM", &pid]).status()?;
        anyhow::ensure!(st.success(), "could not signal dockerd");
        let proc_dir = std::path::PathBuf::from(format!("/proc/{pid}"));
        wait_for(Duration::from_secs(60), "dockerd stopped", || async {
            Ok(!proc_dir.exists())
        })
        .await?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open("/var/log/dockerd-restarted.log")?;
        Command::new("setsid")
            .args(&argv)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting dockerd again")?;
    }
    wait_for(
        Duration::from_secs(60),
        "Docker answering again",
        || async { Ok(docker_up()) },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_and_agent_survive_a_docker_daemon_restart() -> Result<()> {
    if !docker_up() {
        bail!("the Docker engine is not reachable");
    }
    let c = Cluster::single_node_warm(2).await?;
    let (_, gw) = c
        .sign_up(
            &format!("dockerd-{}@example.com", uuid::Uuid::new_v4().simple()),
            "dockerd",
            json!({"openai": "sk-dockerd-1"}),
        )
        .await?;
    let host = "dockerd.clawdeploy.localhost";
    assert_eq!(c.edge_get(host, "/v1/models", Some(&gw)).await?.0, 200);
    c.wait_idle(2, false, Duration::from_secs(60)).await?;

    restart_docker().await?;

    // The tenant answers again, with its keys, through the same route.
    wait_for(Duration::from_secs(90), "tenant back after the restart", || async {
        Ok(matches!(c.edge_get(host, "/v1/models", Some(&gw)).await, Ok((200, body)) if body.contains("openai")))
    })
    .await?;
    // The agent lived through it, and Docker runs what the database wants.
    assert!(
        c.agent_metric(0, "clawdeploy_agent_connected").await? == 1.0,
        "the agent kept its session"
    );
    c.wait_idle(2, false, Duration::from_secs(90)).await?;
    c.wait_docker_matches_db(Duration::from_secs(60)).await?;
    // The tenant firewall is still in place.
    let rules = Command::new("iptables")
        .args(["-S", "DOCKER-USER"])
        .output()?;
    assert!(String::from_utf8_lossy(&rules.stdout).contains("CLAWDEPLOY-TENANTS"));
    // And the node takes claims.
    let (_, gw2) = c
        .sign_up(
            &format!("dockerd2-{}@example.com", uuid::Uuid::new_v4().simple()),
            "dockerd-after",
            json!({"anthropic": "sk-ant-after"}),
        )
        .await?;
    let (status, body) = c
        .edge_get(
            "dockerd-after.clawdeploy.localhost",
            "/v1/models",
            Some(&gw2),
        )
        .await?;
    assert_eq!(status, 200, "{body}");
    Ok(())
}
