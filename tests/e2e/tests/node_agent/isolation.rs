//! Tenant isolation: no tenant reaches another, the host or the metadata
//! service.

use super::*;

/// A `FROM scratch` image holding Debian's static busybox, for probing
/// from inside a tenant's network namespace.
fn probe_image() -> Result<&'static str> {
    const IMAGE: &str = "clawdeploy/probe:dev";
    static BUILT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = std::env::temp_dir().join(format!("cd-probe-{}", std::process::id()));
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            std::fs::copy("/bin/busybox", dir.join("busybox")).map_err(|e| {
                format!("/bin/busybox: {e} (install Debian's busybox-static)")
            })?;
            std::fs::write(
                dir.join("Dockerfile"),
                "FROM scratch\nCOPY busybox /bin/busybox\nUSER 1000\nENTRYPOINT [\"/bin/busybox\"]\n",
            )
            .map_err(|e| e.to_string())?;
            let out = Command::new("docker")
                .args(["build", "-q", "-t", IMAGE])
                .arg(&dir)
                .output()
                .map_err(|e| e.to_string())?;
            std::fs::remove_dir_all(&dir).ok();
            if out.status.success() {
                Ok(())
            } else {
                Err(String::from_utf8_lossy(&out.stderr).into_owned())
            }
        })
        .clone()
        .map_err(|e| anyhow::anyhow!("building the probe image: {e}"))?;
    Ok(IMAGE)
}

/// Fetches `url` from inside `docker_id`'s network namespace; returns
/// success and what busybox wget said.
fn probe_from(docker_id: &str, url: &str) -> Result<(bool, String)> {
    // busybox's own `-T` crashes in a scratch image; the host's `timeout`
    // bounds the probe instead (a refused connection returns at once).
    let out = Command::new("timeout")
        .args(["20", "docker", "run", "--rm", "--network"])
        .arg(format!("container:{docker_id}"))
        .arg(probe_image()?)
        .args(["wget", "-O", "-", url])
        .output()?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_cannot_reach_each_other_the_host_or_the_metadata_service() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        nodes: 2,
        min_idle: 3,
        agent_metrics_ip: std::net::Ipv4Addr::UNSPECIFIED.into(),
        ..Default::default()
    })
    .await?;
    c.wait_idle(3, true, Duration::from_secs(120)).await?;
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT node_id, docker_id, upstream FROM containers WHERE state = 'idle' ORDER BY node_id",
    )
    .fetch_all(&c.db)
    .await?;
    let on = |node: &str| -> Vec<&(String, String, String)> {
        rows.iter().filter(|r| r.0 == node).collect()
    };
    let (a_nodes, b_nodes) = (on(&c.node_ids[0]), on(&c.node_ids[1]));
    let (tenant_a, neighbour) = if a_nodes.len() >= 2 {
        (a_nodes[0], a_nodes[1])
    } else {
        (b_nodes[0], b_nodes[1])
    };
    let other_node = if tenant_a.0 == c.node_ids[0] {
        b_nodes[0]
    } else {
        a_nodes[0]
    };

    // The probe works: the tenant reaches its own gateway.
    let (ok, said) = probe_from(&tenant_a.1, "http://127.0.0.1:18789/healthz")?;
    assert!(ok, "the probe must reach the tenant's own port: {said}");
    // The host reaches every tenant (the edge and the agent need that).
    for t in [neighbour, other_node] {
        let r = c
            .client
            .get(format!("http://{}/healthz", t.2))
            .send()
            .await?;
        assert_eq!(r.status(), 200);
    }
    // A tenant reaches none of: a neighbour on its node, a tenant on another
    // node's network, the metadata service, the agent's port on the host.
    let gateway = c.docker_inspect(&tenant_a.1)?["NetworkSettings"]["Networks"]
        .as_object()
        .and_then(|n| n.values().next().cloned())
        .and_then(|n| n["Gateway"].as_str().map(str::to_owned))
        .context("tenant network gateway")?;
    let agent_port = c
        .agent_metrics
        .iter()
        .find(|_| true)
        .map(|a| a.port())
        .unwrap();
    let host_metrics = c
        .client
        .get(format!("http://127.0.0.1:{agent_port}/metrics"))
        .send()
        .await?;
    assert_eq!(
        host_metrics.status(),
        200,
        "the agent's port is open on the host"
    );
    for url in [
        format!("http://{}/healthz", neighbour.2),
        format!("http://{}/healthz", other_node.2),
        "http://169.254.169.254/hetzner/v1/metadata".to_owned(),
        format!("http://{gateway}:{agent_port}/metrics"),
    ] {
        let (ok, said) = probe_from(&tenant_a.1, &url)?;
        assert!(!ok, "{url} must be unreachable from a tenant: {said}");
        assert!(
            said.contains("refused"),
            "{url}: expected the firewall's reset, got: {said}"
        );
    }
    // No Docker socket inside a tenant.
    let mounts = c.docker_inspect(&tenant_a.1)?["Mounts"].to_string();
    assert!(!mounts.contains("docker.sock"), "{mounts}");

    // The rules are installed once, however many agents ran.
    let rules = Command::new("iptables")
        .args(["-S", "DOCKER-USER"])
        .output()?;
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert_eq!(rules.matches("CLAWDEPLOY-TENANTS").count(), 1, "{rules}");
    Ok(())
}
