//! Every `/metrics` endpoint of a running system (the scheduler, both
//! agents, the edge), after a signup has made each of them record, passes
//! `promtool check metrics` (Debian's `prometheus` package): every metric
//! has `# HELP` and `# TYPE`, and the names follow Prometheus' conventions.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use clawdeploy_e2e::{Cluster, ClusterOptions};
use serde_json::json;

fn promtool(text: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; scripts/test installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_metrics_endpoint_passes_promtool() {
    let c = Cluster::start(ClusterOptions::default()).await.unwrap();
    c.wait_idle_at_least(2, Duration::from_secs(120))
        .await
        .unwrap();
    let (_, gw) = c
        .sign_up(
            "prom@example.com",
            "prom",
            json!({"openai": "sk-prom-test"}),
        )
        .await
        .unwrap();
    let host = format!("prom.{}", clawdeploy_e2e::BASE_DOMAIN);
    let (status, _) = c.edge_get(&host, "/v1/models", Some(&gw)).await.unwrap();
    assert_eq!(status, 200);
    let mut endpoints = vec![("scheduler", c.http), ("edge", c.edge_admin)];
    endpoints.extend(c.agent_metrics.iter().map(|a| ("agent", *a)));
    for (who, addr) in endpoints {
        let text = c
            .client
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            text.contains("# HELP clawdeploy_"),
            "{who} at {addr} serves no described metric:\n{text}"
        );
        let (ok, said) = promtool(&text);
        assert!(
            ok && said.trim().is_empty(),
            "promtool check metrics on the {who} at {addr}:\n{said}"
        );
    }
}
