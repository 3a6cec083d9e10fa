//! State volume export and import against the real Docker engine and the
//! locally built stand-in image (`scripts/test` builds it): the data path a
//! migration will use.

use std::collections::BTreeSet;
use std::time::Duration;

use clawdeploy_agent::probe::{GatewayProbe, Prober};
use clawdeploy_agent::runtime::{
    ContainerRuntime, ContainerSpec, DockerRuntime, Limits, GATEWAY_PORT,
};

fn hex8() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{:08x}",
        (nanos as u64 ^ u64::from(std::process::id())) as u32
    )
}

fn spec(id: &str) -> ContainerSpec {
    ContainerSpec {
        container_id: id.into(),
        image: "clawdeploy/openclaw-standin:dev".into(),
        gateway_token: "tok-volume".into(),
        limits: Limits {
            cpu_millis: 500,
            memory_bytes: 256 << 20,
            pids: 256,
        },
        generation: 1,
    }
}

async fn providers(rt: &DockerRuntime, id: &str) -> BTreeSet<String> {
    let ip = rt.inspect(id).await.unwrap().unwrap().ip.unwrap();
    let upstream = format!("{ip}:{GATEWAY_PORT}");
    let prober = Prober::default();
    for _ in 0..200 {
        if let Ok(p) = prober.live_providers(&upstream, "tok-volume").await {
            if !p.is_empty() {
                return p;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    BTreeSet::new()
}

#[tokio::test]
async fn a_stopped_containers_state_moves_to_a_new_container() {
    // Named like the e2e nodes so `scripts/test` sweeps leftovers.
    let node = format!("t{}-v", hex8());
    let state = std::env::temp_dir().join(&node);
    let network = format!("clawdeploy-{node}");
    let rt = DockerRuntime::connect(
        "/var/run/docker.sock",
        &node,
        network.clone(),
        None,
        state.join("volumes"),
    )
    .await
    .expect("Docker");
    rt.prepare().await.unwrap();
    let (a, b, c) = (
        format!("{node}-src"),
        format!("{node}-dst"),
        format!("{node}-bad"),
    );

    rt.create_and_start(&spec(&a)).await.unwrap();
    let config = br#"{"models":{"providers":{"openai":{"apiKey":"sk-moved"}}}}"#;
    rt.write_config(&a, config).await.unwrap();
    assert_eq!(
        providers(&rt, &a).await,
        BTreeSet::from(["openai".to_owned()])
    );

    // A running container's state is never copied half-written.
    let refused = rt.export_state(&a, &mut Vec::new()).await.unwrap_err();
    assert!(refused.to_string().contains("stop it first"), "{refused}");
    rt.stop(&a).await.unwrap();
    let mut archive = Vec::new();
    let n = rt.export_state(&a, &mut archive).await.unwrap();
    assert_eq!(n as usize, archive.len());
    assert!(n > 0);

    // Imported under a new id, then a container created on top of it
    // serves the same state.
    rt.import_state(&b, &archive[..]).await.unwrap();
    let imported = state.join("volumes").join(&b).join("openclaw.json");
    assert_eq!(std::fs::read(&imported).unwrap(), config);
    let meta = std::fs::metadata(&imported).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), 1000);
    rt.create_and_start(&spec(&b)).await.unwrap();
    assert_eq!(
        providers(&rt, &b).await,
        BTreeSet::from(["openai".to_owned()])
    );
    // Importing over a running container is refused; a broken archive
    // leaves nothing behind.
    assert!(rt.import_state(&b, &archive[..]).await.is_err());
    assert!(rt
        .import_state(&c, &b"not a tar archive"[..])
        .await
        .is_err());
    assert!(!state.join("volumes").join(&c).exists());

    for id in [&a, &b, &c] {
        rt.remove(id).await.unwrap();
    }
    assert!(!state.join("volumes").join(&a).exists());
    let _ = std::process::Command::new("docker")
        .args(["network", "rm", &network])
        .output();
    std::fs::remove_dir_all(&state).ok();
}
