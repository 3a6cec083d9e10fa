//! The reconciler over the in-memory runtime: no Docker, no root, virtual
//! time. Each test drives the real `Reconciler` with desired states and
//! checks what it did to the fake engine and what it reported.

use std::sync::Arc;
use std::time::Duration;

use clawdeploy_agent::reconcile::{Reconciler, StatusBoard};
use clawdeploy_agent::runtime::fake::FakeRuntime;
use clawdeploy_agent::runtime::transfer::Transfers;
use clawdeploy_agent::runtime::{ContainerSpec, Limits};
use clawdeploy_proto::{
    ArchiveExport, ArchiveImport, ContainerPhase, ContainerStatus, DesiredContainer, DesiredState,
    Resources, TenantConfig,
};
use tokio::sync::watch;

const SMALL: Resources = Resources {
    cpu_millis: 500,
    memory_bytes: 512 << 20,
    pids: 256,
};

fn container(id: &str) -> DesiredContainer {
    DesiredContainer {
        container_id: id.into(),
        image: "openclaw:test".into(),
        gateway_token: format!("tok-{id}"),
        resources: Some(SMALL),
        ..Default::default()
    }
}

fn with_tenant(mut c: DesiredContainer, version: u64, keys: &[(&str, &str)]) -> DesiredContainer {
    c.tenant = Some(TenantConfig {
        instance_id: format!("i-{}", c.container_id),
        config_version: version,
        provider_keys: keys
            .iter()
            .map(|(p, k)| ((*p).to_owned(), (*k).to_owned()))
            .collect(),
        default_model: "openai/gpt-4o".into(),
        providers: Default::default(),
    });
    c
}

fn state(generation: u64, containers: Vec<DesiredContainer>) -> DesiredState {
    DesiredState {
        generation,
        containers,
    }
}

struct Rig {
    rt: FakeRuntime,
    board: Arc<StatusBoard>,
    desired: watch::Sender<DesiredState>,
}

impl Rig {
    fn start(rt: FakeRuntime, first: DesiredState) -> Rig {
        Self::start_with(rt, first, None)
    }

    fn start_with(rt: FakeRuntime, first: DesiredState, transfers: Option<Transfers>) -> Rig {
        let board = Arc::new(StatusBoard::default());
        let (desired, rx) = watch::channel(first);
        let mut reconciler =
            Reconciler::with_probe(Arc::new(rt.clone()), rt.clone(), board.clone(), 2);
        if let Some(t) = transfers {
            reconciler = reconciler.with_transfers(Arc::new(t));
        }
        tokio::spawn(reconciler.run(rx));
        Rig { rt, board, desired }
    }

    fn status(&self, id: &str) -> Option<ContainerStatus> {
        self.board
            .snapshot()
            .into_iter()
            .find(|s| s.container_id == id)
    }

    /// Waits (virtual time, at most two minutes) until `ok` holds.
    async fn until(&self, what: &str, ok: impl Fn(&Rig) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while !ok(self) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; board: {:?}",
                self.board.snapshot()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn phase_is(&self, id: &str, phase: ContainerPhase) -> bool {
        self.status(id).is_some_and(|s| s.phase == phase as i32)
    }
}

#[tokio::test(start_paused = true)]
async fn a_missing_container_is_created_and_its_tenant_config_proven_live() {
    let want = with_tenant(container("a"), 1, &[("openai", "sk-1")]);
    let rig = Rig::start(FakeRuntime::default(), state(1, vec![want]));
    rig.until("config 1 live", |r| {
        r.status("a").is_some_and(|s| s.config_version == 1)
    })
    .await;
    let c = rig.rt.container("a").unwrap();
    assert!(c.running);
    let config: serde_json::Value = serde_json::from_slice(c.config.as_deref().unwrap()).unwrap();
    assert_eq!(config["models"]["providers"]["openai"]["apiKey"], "sk-1");
    assert_eq!(rig.rt.calls("create"), 1);
    let s = rig.status("a").unwrap();
    assert_eq!(s.phase, ContainerPhase::Healthy as i32);
    assert_eq!(s.upstream, format!("{}:18789", c.ip));
    assert_eq!(s.docker_id, c.docker_id);

    // A new key: written in place, no restart, no new container.
    let next = with_tenant(container("a"), 2, &[("anthropic", "sk-ant")]);
    rig.desired.send_replace(state(2, vec![next]));
    rig.until("config 2 live", |r| {
        r.status("a").is_some_and(|s| s.config_version == 2)
    })
    .await;
    let c = rig.rt.container("a").unwrap();
    assert_eq!((c.starts, rig.rt.calls("create")), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn a_running_container_is_adopted_not_recreated() {
    let rt = FakeRuntime::default();
    rt.insert_running(ContainerSpec {
        container_id: "a".into(),
        image: "openclaw:test".into(),
        gateway_token: "tok-a".into(),
        limits: Limits {
            cpu_millis: 500,
            memory_bytes: 512 << 20,
            pids: 256,
        },
        generation: 1,
    });
    let rig = Rig::start(rt, state(2, vec![container("a")]));
    rig.until("healthy", |r| r.phase_is("a", ContainerPhase::Healthy))
        .await;
    assert_eq!(rig.rt.calls("create"), 0);
    assert_eq!(rig.rt.calls("start"), 0);
    assert_eq!(rig.rt.container("a").unwrap().starts, 1);
}

#[tokio::test(start_paused = true)]
async fn orphans_and_unwanted_containers_are_removed() {
    let rt = FakeRuntime::default();
    rt.insert_running(ContainerSpec {
        container_id: "orphan".into(),
        image: "openclaw:test".into(),
        gateway_token: "t".into(),
        limits: Limits::default(),
        generation: 1,
    });
    let rig = Rig::start(rt, state(1, vec![container("a")]));
    rig.until("the orphan removed and a healthy", |r| {
        r.rt.ids() == ["a"] && r.phase_is("a", ContainerPhase::Healthy)
    })
    .await;
    rig.desired.send_replace(state(2, vec![]));
    rig.until("a removed and unreported", |r| {
        r.rt.ids().is_empty() && r.board.snapshot().is_empty()
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_failing_create_is_reported_then_retried_with_backoff() {
    let rt = FakeRuntime::default();
    rt.fail_next("create", 3);
    let started = tokio::time::Instant::now();
    let rig = Rig::start(rt, state(1, vec![container("a")]));
    rig.until("failed reported", |r| {
        r.status("a").is_some_and(|s| {
            s.phase == ContainerPhase::Failed as i32 && s.message.contains("injected")
        })
    })
    .await;
    rig.until("healthy", |r| r.phase_is("a", ContainerPhase::Healthy))
        .await;
    assert_eq!(rig.rt.calls("create"), 4);
    // Three setbacks waited 200, 400 and 800 ms.
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        started.elapsed()
    );
    assert!(rig.status("a").unwrap().message.is_empty());
}

#[tokio::test(start_paused = true)]
async fn docker_down_reports_nothing_false_and_converges_when_back() {
    let rt = FakeRuntime::default();
    rt.set_unavailable(true);
    let rig = Rig::start(rt, state(1, vec![container("a")]));
    tokio::time::sleep(Duration::from_secs(20)).await;
    // Nothing is known, so nothing is claimed: no failure is reported.
    assert!(rig
        .board
        .snapshot()
        .iter()
        .all(|s| s.phase != ContainerPhase::Failed as i32));
    assert!(rig.rt.calls("inspect") >= 4, "kept retrying");
    rig.rt.set_unavailable(false);
    rig.until("healthy", |r| r.phase_is("a", ContainerPhase::Healthy))
        .await;
}

#[tokio::test(start_paused = true)]
async fn a_resize_is_applied_in_place() {
    let rig = Rig::start(FakeRuntime::default(), state(1, vec![container("a")]));
    rig.until("healthy", |r| r.phase_is("a", ContainerPhase::Healthy))
        .await;
    let mut bigger = container("a");
    bigger.resources = Some(Resources {
        cpu_millis: 2000,
        memory_bytes: 2 << 30,
        pids: 512,
    });
    rig.desired.send_replace(state(2, vec![bigger]));
    rig.until("resized", |r| {
        r.rt.container("a").unwrap().limits.cpu_millis == 2000
    })
    .await;
    let c = rig.rt.container("a").unwrap();
    assert_eq!(c.limits.memory_bytes, 2 << 30);
    assert_eq!((c.starts, rig.rt.calls("create")), (1, 1), "no restart");
}

#[tokio::test(start_paused = true)]
async fn a_suspended_container_stops_and_starts_again_on_resume() {
    let rig = Rig::start(FakeRuntime::default(), state(1, vec![container("a")]));
    rig.until("healthy", |r| r.phase_is("a", ContainerPhase::Healthy))
        .await;
    let mut suspended = container("a");
    suspended.stopped = true;
    rig.desired.send_replace(state(2, vec![suspended]));
    rig.until("stopped", |r| r.phase_is("a", ContainerPhase::Stopped))
        .await;
    assert!(
        !rig.rt.container("a").unwrap().running,
        "volume kept, process stopped"
    );
    rig.desired.send_replace(state(3, vec![container("a")]));
    rig.until("healthy again", |r| {
        r.phase_is("a", ContainerPhase::Healthy)
    })
    .await;
    let c = rig.rt.container("a").unwrap();
    assert!(c.running);
    assert_eq!((c.starts, rig.rt.calls("create")), (2, 1));
}

#[tokio::test(start_paused = true)]
async fn a_crashed_container_is_started_again_with_its_config_kept() {
    let want = with_tenant(container("a"), 1, &[("openai", "sk-1")]);
    let rig = Rig::start(FakeRuntime::default(), state(1, vec![want]));
    rig.until("config live", |r| {
        r.status("a").is_some_and(|s| s.config_version == 1)
    })
    .await;
    rig.rt.crash("a");
    rig.until("restarted", |r| {
        r.rt.container("a").unwrap().starts == 2 && r.phase_is("a", ContainerPhase::Healthy)
    })
    .await;
    assert!(rig.rt.container("a").unwrap().running);
    assert_eq!(rig.rt.calls("create"), 1, "started, not recreated");
    assert_eq!(rig.status("a").unwrap().config_version, 1);
}

#[tokio::test(start_paused = true)]
async fn a_gateway_that_stops_answering_is_reported_and_not_restarted_blindly() {
    let rig = Rig::start(FakeRuntime::default(), state(1, vec![container("a")]));
    rig.until("healthy", |r| r.phase_is("a", ContainerPhase::Healthy))
        .await;
    rig.rt.hang("a");
    // Three failed probes mark it unhealthy; the next pass finds it
    // running but silent and reports it failed, for the scheduler to act on.
    rig.until("reported failed", |r| {
        r.status("a").is_some_and(|s| {
            s.phase == ContainerPhase::Failed as i32 && s.message.contains("/healthz")
        })
    })
    .await;
    let c = rig.rt.container("a").unwrap();
    assert!(c.running);
    assert_eq!((c.starts, rig.rt.calls("create")), (1, 1));
    assert!(rig.rt.calls("inspect") >= 2, "running was checked before");
}

/// A bucket on loopback: `PUT /<key>` stores the body, `GET /<key>` serves
/// it (what a presigned URL does, without the signature).
async fn bucket() -> (
    String,
    Arc<std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>>>,
) {
    use axum::extract::{Path, State};
    type Objects = Arc<std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>>>;
    let objects: Objects = Arc::default();
    let app = axum::Router::new()
        .route(
            "/{key}",
            axum::routing::put(
                |State(o): State<Objects>, Path(k): Path<String>, body: axum::body::Bytes| async move {
                    o.lock().unwrap().insert(k, body.to_vec());
                },
            )
            .get(|State(o): State<Objects>, Path(k): Path<String>| async move {
                o.lock()
                    .unwrap()
                    .get(&k)
                    .cloned()
                    .ok_or(axum::http::StatusCode::NOT_FOUND)
            }),
        )
        .with_state(objects.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, objects)
}

// Real time: the transfers do real I/O on loopback.
#[tokio::test]
async fn an_export_uploads_stopped_state_and_an_import_creates_only_from_a_matching_archive() {
    let (url, objects) = bucket().await;
    let staging = std::env::temp_dir().join(format!("reconciler-{}", std::process::id()));
    let rt = FakeRuntime::default();
    let src = with_tenant(container("src"), 1, &[("openai", "sk-1")]);
    let rig = Rig::start_with(
        rt.clone(),
        state(1, vec![src.clone()]),
        Some(Transfers::new(&staging).unwrap()),
    );
    rig.until("src live", |r| {
        r.status("src").is_some_and(|s| s.config_version == 1)
    })
    .await;
    rt.set_volume("src", b"the tenant's state");

    // Stopped and exported: the archive is in the bucket, reported with
    // its digest and size; the container is stopped, not removed.
    let exporting = DesiredContainer {
        stopped: true,
        export: Some(ArchiveExport {
            archive_id: "m1".into(),
            put_url: format!("{url}/m1"),
        }),
        ..src.clone()
    };
    rig.desired.send_replace(state(2, vec![exporting]));
    rig.until("export reported", |r| {
        r.status("src")
            .and_then(|s| s.export)
            .is_some_and(|e| e.archive_id == "m1")
    })
    .await;
    let report = rig.status("src").unwrap().export.unwrap();
    assert_eq!(report.error, "");
    let stored = objects.lock().unwrap().get("m1").cloned().unwrap();
    assert_eq!(stored, b"the tenant's state");
    assert_eq!(report.bytes, stored.len() as u64);
    use sha2::Digest;
    assert_eq!(report.sha256, hex::encode(sha2::Sha256::digest(&stored)));
    assert!(!rt.container("src").unwrap().running);
    assert_eq!(rt.calls("export"), 1, "one upload per archive id");

    // A target made from it: the state is in place before the first start.
    let import = ArchiveImport {
        archive_id: "m1".into(),
        get_url: format!("{url}/m1"),
        sha256: report.sha256.clone(),
        bytes: report.bytes,
    };
    let dst = DesiredContainer {
        import: Some(import.clone()),
        ..with_tenant(container("dst"), 1, &[("openai", "sk-1")])
    };
    // And one whose record does not match what the store holds.
    let bad = DesiredContainer {
        import: Some(ArchiveImport {
            sha256: "0".repeat(64),
            ..import
        }),
        ..container("bad")
    };
    rig.desired.send_replace(state(3, vec![dst, bad]));
    rig.until("dst live", |r| {
        r.status("dst").is_some_and(|s| s.config_version == 1)
    })
    .await;
    assert_eq!(rt.volume("dst").unwrap(), b"the tenant's state");
    rig.until("bad failed", |r| r.phase_is("bad", ContainerPhase::Failed))
        .await;
    let s = rig.status("bad").unwrap();
    assert!(s.message.contains("import"), "{}", s.message);
    assert!(
        rt.container("bad").is_none(),
        "nothing created from a bad archive"
    );
    assert!(rt.volume("bad").is_none(), "nothing imported either");
    std::fs::remove_dir_all(&staging).ok();
}
