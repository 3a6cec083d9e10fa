//! State archives through object storage, on the real path: a stopped
//! container's volume goes to an S3-compatible store (moto, started by
//! `scripts/test`) through a presigned PUT URL from the scheduler's archive
//! store, and comes back into another container's volume through a presigned
//! GET URL, checked against its SHA-256 and size. A corrupt or truncated
//! archive is refused and leaves the target untouched.
use clawdeploy_agent::runtime::transfer::{Archive, Transfers};
use clawdeploy_agent::runtime::{ContainerRuntime, ContainerSpec, DockerRuntime, Limits};
use clawdeploy_e2e::ops::archive_store;
use clawdeploy_scheduler::archives::{Archives, Purpose};
use uuid::Uuid;

fn spec(id: &str) -> ContainerSpec {
    ContainerSpec {
        container_id: id.into(),
        image: "clawdeploy/openclaw-standin:dev".into(),
        gateway_token: "tok-archive".into(),
        limits: Limits {
            cpu_millis: 500,
            memory_bytes: 256 << 20,
            pids: 256,
        },
        generation: 1,
    }
}

#[tokio::test]
async fn a_state_archive_round_trips_through_object_storage_and_bad_ones_are_refused() {
    // Named like the e2e nodes so `scripts/test` sweeps leftovers.
    let node = format!("t{}-s", &Uuid::new_v4().simple().to_string()[..8]);
    let state = std::env::temp_dir().join(&node);
    let network = format!("clawdeploy-{node}");
    let volumes = state.join("volumes");
    let rt = DockerRuntime::connect(
        "/var/run/docker.sock",
        &node,
        network.clone(),
        None,
        volumes.clone(),
    )
    .await
    .expect("Docker");
    rt.prepare().await.unwrap();
    let transfers = Transfers::new(&state.join("staging")).unwrap();
    let archives = archive_store();
    let http = reqwest::Client::new();
    let (src, dst, bad) = (
        format!("{node}-src"),
        format!("{node}-dst"),
        format!("{node}-bad"),
    );

    // A tenant writes into its state; the container stops; the state goes
    // to the store.
    rt.create_and_start(&spec(&src)).await.unwrap();
    let note = vec![7u8; 3 << 20];
    std::fs::write(volumes.join(&src).join("notes.bin"), &note).unwrap();
    rt.stop(&src).await.unwrap();
    let key = Archives::key(Uuid::new_v4(), Purpose::Migration);
    let put = archives.upload_url(&key).await.unwrap();
    let archive = transfers.upload(&rt, &src, &put).await.unwrap();
    assert_eq!(archives.size(&key).await.unwrap(), Some(archive.bytes));
    assert_eq!(archive.sha256.len(), 64);
    assert!(archive.bytes > note.len() as u64);

    // Back from the store under another container: the file is there.
    let get = archives.download_url(&key).await.unwrap();
    transfers.download(&rt, &dst, &get, &archive).await.unwrap();
    assert_eq!(
        std::fs::read(volumes.join(&dst).join("notes.bin")).unwrap(),
        note
    );

    // A target with state of its own, then archives that are not what the
    // scheduler recorded: each is refused and the target keeps its state.
    std::fs::create_dir_all(volumes.join(&bad)).unwrap();
    std::fs::write(volumes.join(&bad).join("mine.txt"), b"keep me").unwrap();
    let stored = http.get(&get).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(stored.len() as u64, archive.bytes);
    let mut flipped = stored.to_vec();
    flipped[stored.len() / 2] ^= 0x01;
    let truncated = stored[..stored.len() / 2].to_vec();
    for (what, body, recorded) in [
        ("a flipped byte", flipped, archive.clone()),
        ("a truncated archive", truncated, archive.clone()),
        (
            "a longer archive than recorded",
            stored.to_vec(),
            Archive {
                bytes: archive.bytes - 1,
                ..archive.clone()
            },
        ),
    ] {
        let key = Archives::key(Uuid::new_v4(), Purpose::Migration);
        let r = http
            .put(archives.upload_url(&key).await.unwrap())
            .body(body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{what}: {}", r.status());
        let url = archives.download_url(&key).await.unwrap();
        let refused = transfers.download(&rt, &bad, &url, &recorded).await;
        assert!(refused.is_err(), "{what} was imported");
        assert_eq!(
            std::fs::read(volumes.join(&bad).join("mine.txt")).unwrap(),
            b"keep me",
            "{what} touched the target"
        );
        assert!(!volumes.join(&bad).join("notes.bin").exists(), "{what}");
        archives.delete(&key).await.unwrap();
    }
    // Nothing is left in staging.
    assert_eq!(std::fs::read_dir(state.join("staging")).unwrap().count(), 0);
    archives.delete(&key).await.unwrap();
    assert_eq!(archives.size(&key).await.unwrap(), None);

    for id in [&src, &dst, &bad] {
        rt.remove(id).await.unwrap();
    }
    let _ = std::process::Command::new("docker")
        .args(["network", "rm", &network])
        .output();
    std::fs::remove_dir_all(&state).ok();
}
