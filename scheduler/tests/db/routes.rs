//! Completing claims from agent reports, routes that follow a container's
//! state, and route versions and tombstones.

use clawdeploy_proto::Route;
use clawdeploy_scheduler::app::AppRef;
use clawdeploy_scheduler::lifecycle::claim;
use clawdeploy_scheduler::model::InstanceStatus;
use clawdeploy_scheduler::routes;
use uuid::Uuid;

use crate::support::*;

#[tokio::test]
async fn one_report_completes_the_claims_it_confirms_together() {
    use clawdeploy_scheduler::lifecycle::complete;
    let app = app().await;
    node(&app, "n1").await;
    node(&app, "n2").await;
    idle(&app, "n1", 4).await;
    let mut claimed = Vec::new();
    for i in 0..4 {
        let u = user(&app, &format!("c{i}@example.com")).await;
        let c = claim::claim(&app, request(u, &format!("batch-{i}")))
            .await
            .unwrap();
        claimed.push((c.instance_id, c.container_id.unwrap()));
    }
    // One of them has a custom domain: it completes on its own, and its
    // hostnames come along.
    let (custom_instance, _) = claimed[2];
    sqlx::query(
        "INSERT INTO domains (hostname, instance_id, user_id, state, token)
         SELECT 'www.batch.example', id, user_id, 'pending_dns', 'tok' FROM instances WHERE id = $1",
    )
    .bind(custom_instance)
    .execute(&app.db)
    .await
    .unwrap();
    let mut ready = app.instance_ready.subscribe();
    let mut routes_out = app.route_feed.subscribe();
    // The report: three claims confirmed at their config version, one not
    // yet (version 0), and a container another node holds.
    let elsewhere = idle(&app, "n2", 1).await[0];
    let report = vec![
        (claimed[0].1, 1),
        (claimed[1].1, 1),
        (claimed[2].1, 1),
        (claimed[3].1, 0),
        (elsewhere, 1),
    ];
    complete::complete_many(&app, "n1", &report).await.unwrap();
    let status = |id: Uuid| {
        let app = app.clone();
        async move {
            sqlx::query_scalar::<_, String>("SELECT status FROM instances WHERE id = $1")
                .bind(id)
                .fetch_one(&app.db)
                .await
                .unwrap()
        }
    };
    for (i, want) in ["ready", "ready", "ready", "pending"].iter().enumerate() {
        assert_eq!(status(claimed[i].0).await, *want, "instance {i}");
    }
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM containers WHERE state = 'assigned'"
        )
        .await,
        3
    );
    let hosts: Vec<(String, String)> = sqlx::query_as(
        "SELECT hostname, upstream FROM routes WHERE NOT custom AND removed_at IS NULL ORDER BY hostname",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    assert_eq!(
        hosts,
        (0..3)
            .map(|i| (
                format!("batch-{i}.clawdeploy.localhost"),
                "10.0.0.9:18789".to_owned()
            ))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM audit_log WHERE action = 'instance.ready'"
        )
        .await,
        3
    );
    // Waiting signups and the edges heard of each. The news of a claim the
    // batch completed carries its answer as committed (status, route
    // version, container and sealed token: what a waiter would read back);
    // the one completed on its own (custom domains) leaves it to the read.
    let mut woken = Vec::new();
    while let Ok(news) = ready.try_recv() {
        woken.push(news.instance_id);
        if news.instance_id == custom_instance {
            assert!(news.settled.is_none());
            continue;
        }
        let settled = news.settled.expect("a batch completion carries the answer");
        let (version, container, token): (i64, Uuid, Vec<u8>) = sqlx::query_as(
            "SELECT r.version, c.id, c.gateway_token_enc FROM instances i
               JOIN containers c ON c.id = i.container_id
               JOIN routes r ON r.instance_id = i.id AND NOT r.custom AND r.removed_at IS NULL
              WHERE i.id = $1",
        )
        .bind(news.instance_id)
        .fetch_one(&app.db)
        .await
        .unwrap();
        assert_eq!(settled.status, InstanceStatus::Ready);
        assert_eq!(
            settled.route_version.map(|v| v.wire()),
            Some(version as u64)
        );
        assert_eq!(settled.container, Some((container, token)));
    }
    woken.sort();
    let mut want: Vec<Uuid> = claimed[..3].iter().map(|(i, _)| *i).collect();
    want.sort();
    assert_eq!(woken, want);
    let mut deltas = 0;
    while let Ok(d) = routes_out.try_recv() {
        assert!(d.upsert.is_some());
        deltas += 1;
    }
    assert_eq!(deltas, 3);
    // A repeated report changes nothing.
    complete::complete_many(&app, "n1", &report).await.unwrap();
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM audit_log WHERE action = 'instance.ready'"
        )
        .await,
        3
    );
    assert!(ready.try_recv().is_err());
}

#[tokio::test]
async fn a_stopped_container_loses_its_routes_and_gets_them_back_when_it_runs_again() {
    use clawdeploy_proto::{
        agent_message, AgentMessage, ContainerPhase, ContainerStatus, Heartbeat, Hello,
    };
    use clawdeploy_scheduler::lifecycle::complete;
    use clawdeploy_scheduler::rpc::session::AgentSession;
    let app = app().await;
    node(&app, "n1").await;
    let container = idle(&app, "n1", 1).await[0];
    let u = user(&app, "resume@example.com").await;
    claim::claim(&app, request(u, "resume")).await.unwrap();
    complete::complete(&app, "n1", container, 1).await.unwrap();
    let (tx, _rx) = tokio::sync::mpsc::channel(64);
    let mut session = AgentSession::new(app.clone(), "n1".into(), tx);
    let hello = Hello {
        node_id: "n1".into(),
        ..Default::default()
    };
    session
        .handle(AgentMessage {
            msg: Some(agent_message::Msg::Hello(hello)),
        })
        .await
        .unwrap();
    let upstream = "10.0.0.9:18789";
    let report = |phase: ContainerPhase| AgentMessage {
        msg: Some(agent_message::Msg::Heartbeat(Heartbeat {
            containers: vec![ContainerStatus {
                container_id: container.to_string(),
                docker_id: "d1".into(),
                upstream: upstream.into(),
                phase: phase as i32,
                config_version: 1,
                ..Default::default()
            }],
            ..Default::default()
        })),
    };
    let route = |app: AppRef| async move {
        sqlx::query_scalar::<_, String>(
            "SELECT upstream FROM routes WHERE hostname = 'resume.clawdeploy.localhost' AND removed_at IS NULL",
        )
        .fetch_one(&app.db)
        .await
        .unwrap()
    };
    session
        .handle(report(ContainerPhase::Healthy))
        .await
        .unwrap();
    assert_eq!(route(app.clone()).await, upstream);
    // Suspended: Docker may hand the address to another tenant.
    session
        .handle(report(ContainerPhase::Stopped))
        .await
        .unwrap();
    assert_eq!(route(app.clone()).await, "");
    // Resumed at the very address it had: the route follows it back.
    session
        .handle(report(ContainerPhase::Healthy))
        .await
        .unwrap();
    assert_eq!(route(app.clone()).await, upstream);
}

#[tokio::test]
async fn route_changes_are_versioned_and_removals_leave_tombstones() {
    let app = app().await;
    node(&app, "n1").await;
    let c = idle(&app, "n1", 1).await[0];
    let instance = instance(&app, "r", Some(c)).await;
    let mut tx = app.db.begin().await.unwrap();
    let up = routes::upsert(
        &app,
        &mut tx,
        Route {
            hostname: "r.clawdeploy.localhost".into(),
            upstream: "10.0.0.9:18789".into(),
            instance_id: instance.to_string(),
            container_id: c.to_string(),
            ..Route::default()
        },
    )
    .await
    .unwrap();
    // No custom domains: the instance's own route only.
    assert_eq!(up.len(), 1);
    let up = &up[0];
    tx.commit().await.unwrap();
    let snap = routes::snapshot(&app).await.unwrap();
    assert_eq!((snap.routes.len(), snap.version), (1, up.version));
    assert_eq!(live_route_version(&app, instance).await, Some(up.version));

    let mut tx = app.db.begin().await.unwrap();
    let removed = routes::remove_for_instance(&mut tx, instance)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(removed.len(), 1);
    assert!(removed[0].version > up.version);
    assert_eq!(removed[0].removed_hostname, "r.clawdeploy.localhost");
    assert!(removed[0].upsert.is_none());
    // The snapshot no longer has the route, and its version counts the
    // removal: an edge at that version has seen it.
    let snap = routes::snapshot(&app).await.unwrap();
    assert!(snap.routes.is_empty());
    assert_eq!(snap.version, removed[0].version);
    // An edge catching up from before the route existed learns only its
    // latest state: the removal.
    let deltas = routes::deltas_where(&app, "WHERE version > $1", 0i64)
        .await
        .unwrap();
    assert_eq!(deltas.len(), 1);
    assert_eq!(deltas[0].version, removed[0].version);
    assert_eq!(deltas[0].removed_hostname, "r.clawdeploy.localhost");
    assert_eq!(live_route_version(&app, instance).await, None);
}
