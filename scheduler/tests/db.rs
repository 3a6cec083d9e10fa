//! The scheduler against PostgreSQL only: no Docker, no agents, no root.
//! Each test gets a fresh database (from `CLAWDEPLOY_TEST_PG`, which
//! `scripts/test` sets) and calls the domain modules directly, or the HTTP
//! router in-process.

use std::collections::BTreeMap;
use std::time::Duration;

use clawdeploy_proto::Route;
use clawdeploy_scheduler::app::claims::{IdempotencyKey, SignUp};
use clawdeploy_scheduler::app::{App, AppRef, Config};
use clawdeploy_scheduler::crypto::pki::Ca;
use clawdeploy_scheduler::crypto::{aad, envelope, SecretBox};
use clawdeploy_scheduler::error::Error;
use clawdeploy_scheduler::fleet::{capacity, settings};
use clawdeploy_scheduler::lifecycle::idempotency::{self, Begin};
use clawdeploy_scheduler::lifecycle::{claim, retry};
use clawdeploy_scheduler::model::InstanceStatus;
use clawdeploy_scheduler::routes;
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

/// A fresh, migrated database and an `App` over it.
async fn app() -> AppRef {
    app_with(Config::default()).await
}

async fn app_with(cfg: Config) -> AppRef {
    let admin_url = std::env::var("CLAWDEPLOY_TEST_PG")
        .expect("CLAWDEPLOY_TEST_PG is not set: run the suite with scripts/test");
    let name = format!("cd_db_{}", Uuid::new_v4().simple());
    let admin = PgPool::connect(&admin_url).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    let (base, _) = admin_url.rsplit_once('/').unwrap();
    let db = PgPool::connect(&format!("{base}/{name}")).await.unwrap();
    clawdeploy_scheduler::db::migrate(&db).await.unwrap();
    let dir = std::env::temp_dir().join(&name);
    let ca = Ca::load_or_create(&dir).unwrap();
    let kek = SecretBox::from_hex(&SecretBox::generate_key_hex()).unwrap();
    let app = App::new(cfg, db, kek, ca, Some("admin-token"), None);
    settings::seed(&app).await.unwrap();
    app
}

/// An active node that heartbeats, with room for 20 containers.
async fn node(app: &App, id: &str) {
    sqlx::query(
        "INSERT INTO nodes (id, name, state, last_heartbeat, max_containers, memory_bytes, memory_available_bytes, private_address)
         VALUES ($1, $1, 'active', now(), 20, 8589934592, 8589934592, '10.1.2.3')",
    )
    .bind(id)
    .execute(&app.db)
    .await
    .unwrap();
}

/// `n` warm idle pool containers on `node_id`.
async fn idle(app: &App, node_id: &str, n: usize) -> Vec<Uuid> {
    let s = settings::load(&app.db).await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..n {
        let mut tx = app.db.begin().await.unwrap();
        let t = capacity::insert_container(app, &mut tx, &s, node_id)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        sqlx::query(
            "UPDATE containers SET state = 'idle', upstream = '10.0.0.9:18789', warm_at = now() WHERE id = $1",
        )
        .bind(t.id)
        .execute(&app.db)
        .await
        .unwrap();
        ids.push(t.id);
    }
    ids
}

async fn user(app: &App, email: &str) -> Uuid {
    let id = Uuid::new_v4();
    sqlx::query("INSERT INTO users (id, email, password_hash) VALUES ($1, $2, 'x')")
        .bind(id)
        .bind(email)
        .execute(&app.db)
        .await
        .unwrap();
    id
}

/// A ready instance of a new user's at `subdomain`, on `container`.
async fn instance(app: &App, subdomain: &str, container: Option<Uuid>) -> Uuid {
    let u = user(app, &format!("{subdomain}@example.com")).await;
    let id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO instances (id, user_id, subdomain, status, container_id) VALUES ($1, $2, $3, 'ready', $4)",
    )
    .bind(id)
    .bind(u)
    .bind(subdomain)
    .bind(container)
    .execute(&app.db)
    .await
    .unwrap();
    id
}

fn request(user_id: Uuid, subdomain: &str) -> SignUp {
    SignUp {
        user_id,
        subdomain: subdomain.into(),
        api_keys: BTreeMap::from([("openai".to_owned(), format!("sk-{subdomain}-1234567"))]),
        idempotency: None,
    }
}

/// An account made through the product's registration, from no known
/// address (no per-address limit).
async fn register(app: &App, email: &str, name: &str) -> clawdeploy_scheduler::accounts::Session {
    clawdeploy_scheduler::accounts::register(
        &app.db,
        clawdeploy_scheduler::accounts::Registration {
            email,
            password: "correct-horse-battery".into(),
            name,
            address: None,
            per_address_per_hour: 0,
        },
    )
    .await
    .unwrap()
}

async fn count(app: &App, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&app.db).await.unwrap()
}

#[tokio::test]
async fn concurrent_claims_take_distinct_idle_containers_then_fall_back_on_demand() {
    let app = app().await;
    node(&app, "n1").await;
    let mut pool = idle(&app, "n1", 3).await;
    let mut users = Vec::new();
    for i in 0..3 {
        users.push(user(&app, &format!("u{i}@example.com")).await);
    }
    let claims = futures::future::join_all(
        users
            .iter()
            .enumerate()
            .map(|(i, u)| claim::claim(&app, request(*u, &format!("tenant-{i}")))),
    )
    .await;
    let mut taken: Vec<Uuid> = claims
        .into_iter()
        .map(|c| c.unwrap().container_id.expect("a container"))
        .collect();
    taken.sort();
    pool.sort();
    assert_eq!(taken, pool, "each claim took its own idle container");
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM containers WHERE state = 'assigning'"
        )
        .await,
        3
    );
    // The keys are stored sealed, never in the clear.
    let sealed: Vec<Vec<u8>> = sqlx::query_scalar("SELECT ciphertext FROM secrets")
        .fetch_all(&app.db)
        .await
        .unwrap();
    assert_eq!(sealed.len(), 3);
    assert!(sealed
        .iter()
        .all(|c| !String::from_utf8_lossy(c).contains("sk-tenant")));

    // The pool is empty: the next claim creates a container for itself.
    let late = user(&app, "late@example.com").await;
    let c = claim::claim(&app, request(late, "late")).await.unwrap();
    let late_container = c.container_id.expect("a container");
    assert!(!pool.contains(&late_container));
    let state: String = sqlx::query_scalar("SELECT state FROM containers WHERE id = $1")
        .bind(late_container)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!((state.as_str(), c.node_id.as_str()), ("assigning", "n1"));
    let token = clawdeploy_scheduler::lifecycle::instances::gateway_token(&app, c.instance_id)
        .await
        .unwrap();
    assert_eq!(token.map(|t| t.len()), Some(64));

    // A taken subdomain and a second instance are conflicts, with nothing
    // left behind.
    let other = user(&app, "other@example.com").await;
    let r = claim::claim(&app, request(other, "late")).await;
    assert!(
        matches!(
            r,
            Err(Error::Conflict {
                code: "subdomain_taken",
                ..
            })
        ),
        "{:?}",
        r.as_ref().err()
    );
    let r = claim::claim(&app, request(late, "late-two")).await;
    assert!(
        matches!(
            r,
            Err(Error::Conflict {
                code: "instance_exists",
                ..
            })
        ),
        "{:?}",
        r.as_ref().err()
    );
    assert_eq!(count(&app, "SELECT count(*) FROM instances").await, 4);
}

#[tokio::test]
async fn a_burst_claims_in_batches_and_each_refusal_stays_its_own() {
    let app = app().await;
    node(&app, "n1").await;
    let pool = idle(&app, "n1", 6).await;
    // A subdomain another account released a moment ago is cooling down.
    let gone = instance(&app, "released", None).await;
    sqlx::query("UPDATE instances SET status = 'deleted', released_at = now() WHERE id = $1")
        .bind(gone)
        .execute(&app.db)
        .await
        .unwrap();
    let mut wanted = Vec::new();
    for i in 0..8 {
        let u = user(&app, &format!("burst{i}@example.com")).await;
        wanted.push((u, format!("burst-{i}")));
    }
    // Refusals in the same burst: a second signup of one account, a second
    // account on a subdomain the burst also claims, a cooling subdomain.
    let twice = wanted[0].0;
    wanted.push((twice, "burst-0-again".into()));
    let rival = user(&app, "rival@example.com").await;
    wanted.push((rival, "burst-1".into()));
    let late = user(&app, "late@example.com").await;
    wanted.push((late, "released".into()));
    let results = futures::future::join_all(
        wanted
            .iter()
            .map(|(u, sub)| claim::claim(&app, request(*u, sub))),
    )
    .await;
    let code = |r: &Result<claim::Claimed, Error>| match r {
        Ok(_) => "ok",
        Err(Error::Conflict { code, .. }) => code,
        Err(e) => panic!("{e}"),
    };
    let codes: Vec<&str> = results.iter().map(code).collect();
    // Which of two claims on one account or one subdomain wins depends on
    // the batches they fell in; exactly one does.
    let pair = |a: usize, b: usize, refused: &str| {
        let mut got = vec![codes[a], codes[b]];
        got.sort_unstable();
        let mut want = vec!["ok", refused];
        want.sort_unstable();
        assert_eq!(got, want, "{codes:?}");
    };
    pair(0, 8, "instance_exists");
    pair(1, 9, "subdomain_taken");
    assert_eq!(codes[10], "subdomain_taken", "{codes:?}");
    assert!(codes[2..8].iter().all(|c| *c == "ok"), "{codes:?}");
    let claimed: Vec<claim::Claimed> = results.into_iter().filter_map(Result::ok).collect();
    assert_eq!(claimed.len(), 8);
    // The six idle containers went to six claims, each its own; the other
    // two were created on demand. Nothing was left behind by a refusal.
    let mut containers: Vec<Uuid> = claimed.iter().filter_map(|c| c.container_id).collect();
    containers.sort();
    containers.dedup();
    assert_eq!(
        containers.len(),
        8,
        "every claim has a container of its own"
    );
    assert_eq!(
        containers.iter().filter(|c| pool.contains(c)).count(),
        6,
        "the whole idle pool was taken"
    );
    // Claims that waited together committed together: a transaction's
    // now() is its start, so one batch's containers share a claim time.
    // The first two claims each found a batch run free; the other nine
    // waited and went in one.
    let batches: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT claimed_at) FROM containers WHERE id = ANY($1)")
            .bind(&pool)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(batches, 3, "six warm claims in three transactions");
    for (sql, want) in [
        (
            "SELECT count(*) FROM containers WHERE state = 'assigning'",
            8,
        ),
        (
            "SELECT count(*) FROM instances WHERE status <> 'deleted'",
            8,
        ),
        ("SELECT count(*) FROM tenant_keys", 8),
        ("SELECT count(*) FROM secrets", 8),
        (
            "SELECT count(*) FROM audit_log WHERE action = 'instance.claim'",
            8,
        ),
    ] {
        assert_eq!(count(&app, sql).await, want, "{sql}");
    }
    // Each claim's provider key opens with its own data key.
    for c in &claimed {
        let token = clawdeploy_scheduler::lifecycle::instances::gateway_token(&app, c.instance_id)
            .await
            .unwrap();
        assert_eq!(
            token, c.gateway_token,
            "the claim answered its container's token"
        );
        // Sealed under the instance's id and name: another's would not open.
        let masked = clawdeploy_scheduler::lifecycle::instances::by_id(&app, c.instance_id)
            .await
            .unwrap()
            .masked_keys
            .unwrap();
        assert_eq!(masked.get("openai").map(String::as_str), Some("sk-…4567"));
    }
}

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
async fn with_no_room_a_signup_queues_and_past_the_queue_it_is_no_capacity() {
    let app = app_with(Config {
        signup_queue_max: 1,
        ..Config::default()
    })
    .await;
    // No schedulable node: the first waits in line, with its keys stored.
    let u = user(&app, "first@example.com").await;
    let queued = claim::claim(&app, request(u, "first")).await.unwrap();
    assert_eq!(queued.container_id, None);
    let status: String = sqlx::query_scalar("SELECT status FROM instances WHERE id = $1")
        .bind(queued.instance_id)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(status, "queued");
    assert_eq!(count(&app, "SELECT count(*) FROM secrets").await, 1);
    // The queue (of one) is full: refused, with nothing left behind.
    let v = user(&app, "second@example.com").await;
    let r = claim::claim(&app, request(v, "second")).await;
    assert!(
        matches!(r, Err(Error::NoCapacity(_))),
        "{:?}",
        r.as_ref().err()
    );
    assert_eq!(count(&app, "SELECT count(*) FROM instances").await, 1);
    // Room appears: the queued one gets a container, and is pending.
    node(&app, "n1").await;
    assert_eq!(
        clawdeploy_scheduler::lifecycle::queue::drain(&app)
            .await
            .unwrap(),
        1
    );
    let (status, container): (String, Option<Uuid>) =
        sqlx::query_as("SELECT status, container_id FROM instances WHERE id = $1")
            .bind(queued.instance_id)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(status, "pending");
    assert!(container.is_some());
}

#[tokio::test]
async fn an_idempotency_key_replays_the_first_answer_and_refuses_reuse() {
    let app = app().await;
    let u = user(&app, "idem@example.com").await;
    let hash = idempotency::fingerprint(&json!({"subdomain": "x"}));
    assert!(matches!(
        idempotency::begin(&app, u, "k1", &hash).await.unwrap(),
        Begin::First
    ));
    // The first is still running.
    let r = idempotency::begin(&app, u, "k1", &hash).await;
    assert!(matches!(
        r,
        Err(Error::Conflict {
            code: "idempotency_in_progress",
            ..
        })
    ));
    idempotency::finish(&app, u, "k1", 201, br#"{"instance":{"id":"i"}}"#).await;
    match idempotency::begin(&app, u, "k1", &hash).await.unwrap() {
        Begin::Replay(status, body) => {
            assert_eq!(status, 201);
            assert_eq!(body, br#"{"instance":{"id":"i"}}"#);
        }
        _ => panic!("a finished key replays"),
    }
    // Stored sealed.
    let stored: Vec<u8> =
        sqlx::query_scalar("SELECT response_enc FROM idempotency_keys WHERE key = 'k1'")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert!(!String::from_utf8_lossy(&stored).contains("instance"));
    let other = idempotency::fingerprint(&json!({"subdomain": "y"}));
    let r = idempotency::begin(&app, u, "k1", &other).await;
    assert!(matches!(
        r,
        Err(Error::Unprocessable {
            code: "idempotency_key_reused",
            ..
        })
    ));
    // A server error is not kept: the retry runs again.
    assert!(matches!(
        idempotency::begin(&app, u, "k2", &hash).await.unwrap(),
        Begin::First
    ));
    idempotency::finish(&app, u, "k2", 503, b"{}").await;
    assert!(matches!(
        idempotency::begin(&app, u, "k2", &hash).await.unwrap(),
        Begin::First
    ));
}

/// A signup whose claim committed but whose answer was never stored (the
/// database went away after the commit) is answered with its instance on
/// retry, never claimed twice; a server error does not release such a key.
#[tokio::test]
async fn a_key_whose_claim_committed_answers_with_its_instance() {
    let app = app().await;
    node(&app, "n1").await;
    idle(&app, "n1", 1).await;
    let u = user(&app, "lost-answer@example.com").await;
    let hash = idempotency::fingerprint(&json!({"subdomain": "lost"}));
    assert!(matches!(
        idempotency::begin(&app, u, "k", &hash).await.unwrap(),
        Begin::First
    ));
    let mut req = request(u, "lost");
    req.idempotency = Some(IdempotencyKey {
        key: "k".into(),
        request_hash: hash.clone(),
    });
    let claimed = claim::claim(&app, req).await.unwrap();
    // While the first request may still answer, a repeat is told to wait.
    assert!(matches!(
        idempotency::begin(&app, u, "k", &hash).await,
        Err(Error::Conflict {
            code: "idempotency_in_progress",
            ..
        })
    ));
    // Its answer never came (the process died): past the takeover time the
    // retry learns the instance, and no second claim runs.
    sqlx::query("UPDATE idempotency_keys SET created_at = now() - interval '10 minutes'")
        .execute(&app.db)
        .await
        .unwrap();
    match idempotency::begin(&app, u, "k", &hash).await.unwrap() {
        Begin::Claimed(id) => assert_eq!(id, claimed.instance_id),
        _ => panic!("a key with a committed claim answers with its instance"),
    }
    idempotency::finish(&app, u, "k", 503, b"{}").await;
    assert!(matches!(
        idempotency::begin(&app, u, "k", &hash).await.unwrap(),
        Begin::Claimed(_)
    ));
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM instances WHERE subdomain = 'lost'"
        )
        .await,
        1
    );
    assert!(claimed.gateway_token.is_some(), "the claim knows its token");
}

/// Registrations are limited per address per hour, taken emails included;
/// the refusal says when the window frees a slot. Other addresses, and
/// registrations with no known address, are not affected.
#[tokio::test]
async fn registrations_are_limited_per_address() {
    use clawdeploy_scheduler::accounts::{self, Registration};
    let app = app().await;
    let from = |email: &'static str, ip: [u8; 4]| Registration {
        email,
        password: "correct-horse-battery".into(),
        name: "",
        address: Some(std::net::IpAddr::from(ip)),
        per_address_per_hour: 3,
    };
    accounts::register(&app.db, from("a1@example.com", [203, 0, 113, 1]))
        .await
        .unwrap();
    accounts::register(&app.db, from("a2@example.com", [203, 0, 113, 1]))
        .await
        .unwrap();
    let taken = accounts::register(&app.db, from("a1@example.com", [203, 0, 113, 1])).await;
    assert!(matches!(
        taken,
        Err(Error::Conflict {
            code: "email_taken",
            ..
        })
    ));
    match accounts::register(&app.db, from("a3@example.com", [203, 0, 113, 1])).await {
        Err(Error::RateLimited { retry_after_secs }) => {
            assert!(
                (3500..=3600).contains(&retry_after_secs),
                "{retry_after_secs}"
            )
        }
        Err(e) => panic!("the fourth attempt is limited, not {e}"),
        Ok(_) => panic!("the fourth attempt is limited"),
    }
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM users WHERE email = 'a3@example.com'"
        )
        .await,
        0
    );
    accounts::register(&app.db, from("b1@example.com", [203, 0, 113, 2]))
        .await
        .unwrap();
    register(&app, "c1@example.com", "").await;
    // An hour later the window has room again.
    sqlx::query("UPDATE registration_attempts SET at = at - interval '61 minutes'")
        .execute(&app.db)
        .await
        .unwrap();
    accounts::register(&app.db, from("a3@example.com", [203, 0, 113, 1]))
        .await
        .unwrap();
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

#[tokio::test]
async fn a_kek_rotation_rewraps_data_keys_and_leaves_customer_ciphertext_alone() {
    let app = app().await;
    let instance = instance(&app, "kek", None).await;
    let mut conn = app.db.acquire().await.unwrap();
    let dek = envelope::create(&app.secrets, &mut conn, instance)
        .await
        .unwrap();
    let sealed = dek
        .seal(&aad::secret(instance, "openai"), b"sk-secret")
        .unwrap();
    drop(conn);
    // A custom domain's certificate key and the ACME account, sealed
    // directly under the KEK.
    let key_aad = aad::domain_key(instance, "kek.example.org");
    sqlx::query(
        "INSERT INTO domains (hostname, instance_id, user_id, token, state, key_sealed)
         SELECT 'kek.example.org', id, user_id, 't', 'active', $2 FROM instances WHERE id = $1",
    )
    .bind(instance)
    .bind(app.secrets.seal(&key_aad, b"-----key-----").unwrap())
    .execute(&app.db)
    .await
    .unwrap();
    let acct_aad = aad::acme_account("https://ca.test/dir");
    sqlx::query("INSERT INTO acme_accounts (directory_url, credentials_sealed) VALUES ($1, $2)")
        .bind("https://ca.test/dir")
        .bind(app.secrets.seal(&acct_aad, b"{}").unwrap())
        .execute(&app.db)
        .await
        .unwrap();
    let new = SecretBox::from_hex(&SecretBox::generate_key_hex()).unwrap();
    let done = envelope::rotate(&app.db, &app.secrets, &new).await.unwrap();
    assert_eq!(done.data_keys, 1);
    assert_eq!(done.certificate_keys, 2);
    let key: Vec<u8> = sqlx::query_scalar("SELECT key_sealed FROM domains")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(new.open(&key_aad, &key).unwrap(), b"-----key-----");
    let acct: Vec<u8> = sqlx::query_scalar("SELECT credentials_sealed FROM acme_accounts")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(new.open(&acct_aad, &acct).unwrap(), b"{}");
    let kek_id: String =
        sqlx::query_scalar("SELECT kek_id FROM tenant_keys WHERE instance_id = $1")
            .bind(instance)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(kek_id, new.id());
    let mut conn = app.db.acquire().await.unwrap();
    // The data key opens under the new KEK only; what it sealed is
    // unchanged and still opens.
    let rewrapped = envelope::load_one(&new, &mut conn, instance).await.unwrap();
    assert_eq!(
        rewrapped
            .open(&aad::secret(instance, "openai"), &sealed)
            .unwrap(),
        b"sk-secret"
    );
    assert!(envelope::load_one(&app.secrets, &mut conn, instance)
        .await
        .is_err());
    drop(conn);
    // A rerun changes nothing.
    let again = envelope::rotate(&app.db, &app.secrets, &new).await.unwrap();
    assert_eq!((again.data_keys, again.certificate_keys), (0, 0));
}

/// Serves the router on a loopback port; returns its base URL.
async fn serve(app: AppRef) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = clawdeploy_scheduler::api::router(app, clawdeploy_scheduler::metrics_handle());
    tokio::spawn(async move {
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .await
        .unwrap();
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn bad_requests_get_json_errors_from_the_router_in_process() {
    let app = app().await;
    node(&app, "n1").await;
    idle(&app, "n1", 2).await;
    let base = serve(app.clone()).await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let reg: Value = http
        .post(format!("{base}/api/auth/register"))
        .json(&json!({"email": "ok@example.com", "password": "correct-horse-battery"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = reg["token"].as_str().unwrap().to_owned();
    let post = |path: &str| http.post(format!("{base}{path}"));
    let get = |path: &str| http.get(format!("{base}{path}"));
    let pw = "correct-horse-battery";
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (
            post("/api/auth/register")
                .header("content-type", "application/json")
                .body("{not json"),
            400,
            "bad_request",
        ),
        (
            post("/api/auth/register")
                .json(&json!({"email": "a@b.co", "password": pw, "extra": 1})),
            400,
            "bad_request",
        ),
        (
            post("/api/auth/register").json(&json!({"email": "nope", "password": pw})),
            422,
            "invalid_field",
        ),
        (
            post("/api/auth/register")
                .json(&json!({"email": "weak@example.com", "password": "short"})),
            422,
            "invalid_field",
        ),
        (
            post("/api/auth/register").json(&json!({"email": "OK@example.com", "password": pw})),
            409,
            "email_taken",
        ),
        (
            post("/api/auth/login")
                .json(&json!({"email": "ok@example.com", "password": "wrong-password-here"})),
            401,
            "bad_credentials",
        ),
        (
            post("/api/auth/login")
                .json(&json!({"email": "nobody@example.com", "password": "wrong-password-here"})),
            401,
            "bad_credentials",
        ),
        (
            post("/api/instances").json(&json!({})),
            401,
            "unauthenticated",
        ),
        (
            post("/api/instances")
                .bearer_auth("cdt_forged")
                .json(&json!({})),
            401,
            "unauthenticated",
        ),
        (
            post("/api/instances")
                .bearer_auth(&token)
                .json(&json!({"subdomain": "www"})),
            422,
            "invalid_field",
        ),
        (
            post("/api/instances")
                .bearer_auth(&token)
                .json(&json!({"subdomain": 7})),
            400,
            "bad_request",
        ),
        (
            post("/api/instances")
                .bearer_auth(&token)
                .json(&json!({"subdomain": "ok-name", "unexpected": 1})),
            400,
            "bad_request",
        ),
        (
            post("/api/instances")
                .bearer_auth(&token)
                .json(&json!({"subdomain": "Bad_Name!"})),
            422,
            "invalid_field",
        ),
        (
            post("/api/instances")
                .bearer_auth(&token)
                .json(&json!({"subdomain": "-abc"})),
            422,
            "invalid_field",
        ),
        (
            post("/api/instances")
                .bearer_auth(&token)
                .json(&json!({"subdomain": "ok-name", "apiKeys": {"evil": "x"}})),
            422,
            "invalid_field",
        ),
        (
            post("/api/instances")
                .bearer_auth(&token)
                .header("Idempotency-Key", "x".repeat(300))
                .json(&json!({})),
            422,
            "invalid_field",
        ),
        (
            post("/api/instances")
                .bearer_auth(&token)
                .header("content-type", "application/json")
                .body("x".repeat(70 * 1024)),
            413,
            "too_large",
        ),
        (
            http.patch(format!("{base}/api/instances/me"))
                .bearer_auth(&token)
                .json(&json!({})),
            400,
            "bad_request",
        ),
        (
            get("/api/instances/me").bearer_auth(&token),
            404,
            "not_found",
        ),
        (
            get("/api/instances/not-a-uuid").bearer_auth(&token),
            404,
            "not_found",
        ),
        (get("/api/subdomains/a_b"), 422, "invalid_field"),
        (get("/admin/nodes"), 401, "unauthenticated"),
        (
            get("/admin/nodes").bearer_auth("wrong"),
            401,
            "unauthenticated",
        ),
        (
            post("/admin/nodes/none/drain").bearer_auth("admin-token"),
            404,
            "not_found",
        ),
        (
            http.put(format!("{base}/admin/pool"))
                .bearer_auth("admin-token")
                .json(&json!({"minIdle": 30, "maxIdle": 2})),
            422,
            "invalid_field",
        ),
        (get("/no/such/route"), 404, "not_found"),
        (
            http.delete(format!("{base}/healthz")),
            405,
            "method_not_allowed",
        ),
    ];
    for (i, (req, status, code)) in cases.into_iter().enumerate() {
        let resp = req.send().await.unwrap();
        let got = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        assert_eq!(
            (got, body["error"]["code"].as_str()),
            (status, Some(code)),
            "case {i}: {body}"
        );
        assert!(body["error"]["message"].is_string(), "case {i}: {body}");
    }
    // Nothing was created by the refused requests, and the pool is whole.
    assert_eq!(count(&app, "SELECT count(*) FROM users").await, 1);
    assert_eq!(count(&app, "SELECT count(*) FROM instances").await, 0);
    assert_eq!(count(&app, "SELECT count(*) FROM secrets").await, 0);
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM containers WHERE state IN ('assigning', 'assigned')"
        )
        .await,
        0
    );
    assert_eq!(
        count(&app, "SELECT count(*) FROM containers WHERE state = 'idle'").await,
        2
    );
    // The operator's answers are their views.
    let admin = |path: &str| http.get(format!("{base}{path}")).bearer_auth("admin-token");
    let nodes: Value = admin("/admin/nodes")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let n = &nodes["nodes"][0];
    assert_eq!(n["id"], "n1");
    assert_eq!(n["idle"], 2);
    assert_eq!(n["state"], "active");
    // The product spec's shape, next to the richer fields.
    assert_eq!(n["status"], "healthy");
    assert_eq!(n["ip"], "10.1.2.3");
    assert_eq!(
        n["containers"],
        json!({"total": 2, "idle": 2, "assigned": 0})
    );
    let pool: Value = admin("/admin/pool")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(pool["settings"]["minIdle"], 5);
    assert_eq!(pool["containers"][0]["state"], "idle");
    assert_eq!(pool["containers"][0]["count"], 2);
}

// ------------------------------------------------------------ billing ---

const WHSEC: &str = "whsec_test_secret";

/// One of Stripe's sample objects (`tests/fixtures/stripe/<name>.json`).
fn fixture(name: &str) -> serde_json::Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/stripe")
        .join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// An event around `object`, as Stripe delivers it.
fn event(id: &str, kind: &str, created: i64, object: serde_json::Value) -> String {
    let mut e = fixture("event");
    e["id"] = json!(id);
    e["type"] = json!(kind);
    e["created"] = json!(created);
    e["api_version"] = json!(null);
    e["data"] = json!({"object": object});
    e.to_string()
}

fn subscription(status: &str, price: &str, reason: Option<&str>) -> serde_json::Value {
    let mut s = fixture("subscription");
    s["id"] = json!("sub_test1");
    s["customer"] = json!("cus_test1");
    s["status"] = json!(status);
    s["items"]["data"][0]["price"]["id"] = json!(price);
    s["cancellation_details"]["reason"] = json!(reason);
    s
}

fn invoice(customer: &str) -> serde_json::Value {
    let mut i = fixture("invoice");
    i["customer"] = json!(customer);
    i
}

/// Posts a payload to the webhook with a signature header; status and body.
async fn deliver(base: &str, payload: &str, signature: &str) -> (u16, serde_json::Value) {
    let r = reqwest::Client::new()
        .post(format!("{base}/api/billing/webhook"))
        .header("stripe-signature", signature)
        .header("content-type", "application/json")
        .body(payload.to_owned())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

async fn signed(base: &str, payload: &str) -> (u16, serde_json::Value) {
    let sig = stripe_webhook::Webhook::generate_test_header(payload, WHSEC, None);
    deliver(base, payload, &sig).await
}

#[tokio::test]
async fn stripe_webhooks_are_verified_applied_once_in_order_and_end_in_grace() {
    let app = app_with(Config {
        stripe_webhook_secret: Some(WHSEC.into()),
        stripe_price_pro: Some("price_pro".into()),
        stripe_price_team: Some("price_team".into()),
        billing_grace: Duration::from_secs(1),
        ..Config::default()
    })
    .await;
    node(&app, "n1").await;
    idle(&app, "n1", 1).await;
    let session = register(&app, "payer@example.com", "Payer").await;
    let u = session.user_id;
    let claimed = claim::claim(&app, request(u, "payer")).await.unwrap();
    let container = claimed.container_id.unwrap();
    let base = serve(app.clone()).await;
    let limits = || async {
        let (tier, cpu, memory): (String, i32, i64) = sqlx::query_as(
            "SELECT i.tier, c.cpu_millis, c.memory_bytes FROM instances i JOIN containers c ON c.id = i.container_id WHERE c.id = $1",
        )
        .bind(container)
        .fetch_one(&app.db)
        .await
        .unwrap();
        (tier, cpu, memory)
    };
    let account = || async {
        sqlx::query_as::<_, (String, String)>(
            "SELECT tier, status FROM billing_accounts WHERE user_id = $1",
        )
        .bind(u)
        .fetch_one(&app.db)
        .await
        .unwrap()
    };
    let t0 = chrono::Utc::now().timestamp() - 100;

    // Checkout links customer and subscription to the account.
    let mut cs = fixture("checkout_session");
    cs["client_reference_id"] = json!(u.to_string());
    cs["customer"] = json!("cus_test1");
    cs["subscription"] = json!("sub_test1");
    let (status, body) = signed(
        &base,
        &event("evt_cs", "checkout.session.completed", t0, cs),
    )
    .await;
    assert_eq!(
        (status, body["outcome"].as_str()),
        (200, Some("linked")),
        "{body}"
    );

    // The subscription, active on pro: delivered five times at once, applied
    // once; the container is resized to pro's limits.
    let pro = event(
        "evt_sub1",
        "customer.subscription.updated",
        t0 + 10,
        subscription("active", "price_pro", None),
    );
    let answers = futures::future::join_all((0..5).map(|_| signed(&base, &pro))).await;
    let outcomes: Vec<&str> = answers
        .iter()
        .filter_map(|(_, b)| b["outcome"].as_str())
        .collect();
    assert!(answers.iter().all(|(s, _)| *s == 200), "{answers:?}");
    assert_eq!(
        outcomes.iter().filter(|o| **o == "applied").count(),
        1,
        "{outcomes:?}"
    );
    assert_eq!(
        outcomes.iter().filter(|o| **o == "duplicate").count(),
        4,
        "{outcomes:?}"
    );
    assert_eq!(limits().await, ("pro".into(), 1000, 1 << 30));
    assert_eq!(account().await, ("pro".into(), "active".into()));
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM audit_log WHERE action = 'instance.tier'"
        )
        .await,
        1
    );

    // Refused, nothing applied: a wrong signature, a stale timestamp, a
    // body changed after signing.
    let team = event(
        "evt_sub_team",
        "customer.subscription.updated",
        t0 + 20,
        subscription("active", "price_team", None),
    );
    let wrong = stripe_webhook::Webhook::generate_test_header(&team, "whsec_other", None);
    let old = stripe_webhook::Webhook::generate_test_header(
        &team,
        WHSEC,
        Some(chrono::Utc::now().timestamp() - 400),
    );
    let good = stripe_webhook::Webhook::generate_test_header(&team, WHSEC, None);
    let tampered = team.replace("price_team", "price_pro");
    for (payload, sig) in [(&team, &wrong), (&team, &old), (&tampered, &good)] {
        let (status, body) = deliver(&base, payload, sig).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["code"], "bad_request");
    }
    assert_eq!(count(&app, "SELECT count(*) FROM stripe_events").await, 2);
    assert_eq!(limits().await.0, "pro");

    // An update older than the applied state: acknowledged, not applied.
    let late = event(
        "evt_sub_late",
        "customer.subscription.updated",
        t0 + 5,
        subscription("active", "price_team", None),
    );
    let (status, body) = signed(&base, &late).await;
    assert_eq!((status, body["outcome"].as_str()), (200, Some("stale")));
    assert_eq!(limits().await.0, "pro");

    // Unknown customer, unknown type: acknowledged, no effect.
    let (status, body) = signed(
        &base,
        &event(
            "evt_inv_x",
            "invoice.payment_failed",
            t0 + 11,
            invoice("cus_nobody"),
        ),
    )
    .await;
    assert_eq!(
        (status, body["outcome"].as_str()),
        (200, Some("unknown_account"))
    );
    let (status, body) = signed(
        &base,
        &event("evt_price", "price.created", t0 + 11, fixture("price")),
    )
    .await;
    assert_eq!((status, body["outcome"].as_str()), (200, Some("ignored")));

    // Dunning: a failed payment keeps the tier (past_due); Stripe gives up
    // (unpaid): a grace period; paid during it: back to active, same tier.
    signed(
        &base,
        &event(
            "evt_inv_f1",
            "invoice.payment_failed",
            t0 + 30,
            invoice("cus_test1"),
        ),
    )
    .await;
    assert_eq!(account().await, ("pro".into(), "past_due".into()));
    signed(
        &base,
        &event(
            "evt_sub_unpaid",
            "customer.subscription.updated",
            t0 + 40,
            subscription("unpaid", "price_pro", None),
        ),
    )
    .await;
    assert_eq!(account().await, ("pro".into(), "grace".into()));
    signed(
        &base,
        &event("evt_inv_p1", "invoice.paid", t0 + 50, invoice("cus_test1")),
    )
    .await;
    assert_eq!(account().await, ("pro".into(), "active".into()));
    assert_eq!(limits().await.0, "pro");

    // Unpaid again, and the grace period (1 s here) runs out: free, live.
    signed(
        &base,
        &event(
            "evt_sub_unpaid2",
            "customer.subscription.updated",
            t0 + 60,
            subscription("unpaid", "price_pro", None),
        ),
    )
    .await;
    let me: serde_json::Value = reqwest::Client::new()
        .get(format!("{base}/api/billing"))
        .bearer_auth(&session.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["status"], "grace", "{me}");
    assert!(me["graceUntil"].is_string(), "{me}");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        clawdeploy_scheduler::billing::webhook::end_grace(&app)
            .await
            .unwrap(),
        1
    );
    assert_eq!(limits().await, ("free".into(), 500, 512 << 20));
    assert_eq!(account().await, ("free".into(), "canceled".into()));

    // Subscribed again, then canceled by the customer (not for a failed
    // payment): down to free at once, no grace.
    signed(
        &base,
        &event(
            "evt_sub_again",
            "customer.subscription.updated",
            t0 + 70,
            subscription("active", "price_pro", None),
        ),
    )
    .await;
    assert_eq!(limits().await.0, "pro");
    let (status, body) = signed(
        &base,
        &event(
            "evt_sub_del",
            "customer.subscription.deleted",
            t0 + 80,
            subscription("canceled", "price_pro", Some("cancellation_requested")),
        ),
    )
    .await;
    assert_eq!(
        (status, body["outcome"].as_str()),
        (200, Some("applied")),
        "{body}"
    );
    assert_eq!(limits().await, ("free".into(), 500, 512 << 20));
    assert_eq!(account().await, ("free".into(), "canceled".into()));

    // A paying account's new instance starts at its tier.
    let team = user(&app, "team@example.com").await;
    sqlx::query(
        "INSERT INTO billing_accounts (user_id, tier, status) VALUES ($1, 'team', 'active')",
    )
    .bind(team)
    .execute(&app.db)
    .await
    .unwrap();
    let c = claim::claim(&app, request(team, "teamwork")).await.unwrap();
    let (tier, cpu, memory): (String, i32, i64) = sqlx::query_as(
        "SELECT i.tier, c.cpu_millis, c.memory_bytes FROM instances i JOIN containers c ON c.id = i.container_id WHERE i.id = $1",
    )
    .bind(c.instance_id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!((tier.as_str(), cpu, memory), ("team", 2000, 2 << 30));
}

#[tokio::test]
async fn checkout_makes_one_customer_per_account_and_keeps_redirects_home() {
    use clawdeploy_scheduler::billing::checkout::{checkout, portal};
    use clawdeploy_scheduler::model::Tier;
    use clawdeploy_scheduler::payments::FakeProvider;
    let cfg = Config {
        stripe_price_pro: Some("price_pro".into()),
        public_origin: "https://app.example.com".into(),
        ..Config::default()
    };
    let app = app_with(cfg.clone()).await;
    let fake = FakeProvider::default();
    let s = register(&app, "buyer@example.com", "Buyer").await;
    let ok = "https://app.example.com/?paid=1";

    // Refused before anything is created: a redirect off our origin, a
    // tier without a price, and the portal of an account that never paid.
    for (tier, url) in [
        (Tier::Pro, "https://evil.example/"),
        (Tier::Team, ok),
        (Tier::Free, ok),
    ] {
        let r = checkout(&app.db, &cfg, &fake, s.user_id, tier, url, ok, None).await;
        assert!(
            matches!(r, Err(Error::Invalid { .. })),
            "{tier:?} {url}: {r:?}"
        );
    }
    let r = portal(&app.db, &cfg, &fake, s.user_id, ok).await;
    assert!(
        matches!(
            r,
            Err(Error::Conflict {
                code: "no_customer",
                ..
            })
        ),
        "{r:?}"
    );
    assert!(fake.calls().is_empty(), "{:?}", fake.calls());

    // Two checkouts: one customer (named after the account), two sessions,
    // each with its own idempotency key; the portal then opens.
    let a = checkout(
        &app.db,
        &cfg,
        &fake,
        s.user_id,
        Tier::Pro,
        ok,
        ok,
        Some("k1"),
    )
    .await
    .unwrap();
    let b = checkout(&app.db, &cfg, &fake, s.user_id, Tier::Pro, ok, ok, None)
        .await
        .unwrap();
    assert_ne!(a, b);
    let calls = fake.calls();
    let customers: Vec<&String> = calls.iter().filter(|c| c.starts_with("customer")).collect();
    assert_eq!(customers.len(), 1, "{calls:?}");
    assert!(
        customers[0].ends_with("buyer@example.com Buyer"),
        "{calls:?}"
    );
    assert!(
        calls[1].contains(&format!("price_pro {}", s.user_id)),
        "{calls:?}"
    );
    assert!(
        calls[1].ends_with(&format!("checkout-{}-k1", s.user_id)),
        "{calls:?}"
    );
    let url = portal(&app.db, &cfg, &fake, s.user_id, ok).await.unwrap();
    assert!(url.starts_with("https://portal.fake/cus_fake_"), "{url}");
}

#[tokio::test]
async fn custom_domains_need_a_plan_are_normalized_owned_once_and_bounded() {
    let app = app_with(Config {
        max_domains_per_instance: 2,
        edge_addresses: vec![
            "203.0.113.7".parse().unwrap(),
            "2001:db8::7".parse().unwrap(),
        ],
        ..Config::default()
    })
    .await;
    node(&app, "n1").await;
    idle(&app, "n1", 2).await;
    let base = serve(app.clone()).await;
    let mut tokens = Vec::new();
    for (email, sub) in [
        ("owner@example.com", "owner"),
        ("rival@example.com", "rival"),
    ] {
        let s = register(&app, email, "").await;
        let c = claim::claim(&app, request(s.user_id, sub)).await.unwrap();
        tokens.push((s.token, c.instance_id));
    }
    let http = reqwest::Client::new();
    let add = |token: &str, hostname: &str| {
        http.post(format!("{base}/api/instances/me/domains"))
            .bearer_auth(token)
            .json(&json!({"hostname": hostname}))
            .send()
    };
    let (owner, rival) = (&tokens[0], &tokens[1]);

    // The free tier has no custom domains.
    let r = add(&owner.0, "chat.example.org").await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "plan_required"
    );
    for (_, instance) in &tokens {
        clawdeploy_scheduler::billing::tier::set_tier(
            &app,
            *instance,
            clawdeploy_scheduler::model::Tier::Pro,
            "test",
        )
        .await
        .unwrap();
    }

    // Normalized, with the records to create.
    let r = add(&owner.0, " Chat.Example.ORG. ").await.unwrap();
    assert_eq!(r.status(), 201);
    let d = r.json::<Value>().await.unwrap()["domain"].clone();
    assert_eq!(d["hostname"], "chat.example.org");
    assert_eq!(d["state"], "pending_dns");
    assert_eq!(d["records"][0]["type"], "TXT");
    assert_eq!(
        d["records"][0]["name"],
        "_clawdeploy-challenge.chat.example.org"
    );
    assert!(
        d["records"][0]["value"].as_str().unwrap().len() >= 32,
        "{d}"
    );
    assert_eq!(d["records"][1]["type"], "CNAME");
    assert_eq!(d["records"][1]["value"], "owner.clawdeploy.localhost");

    // Once per instance; another account may claim the name too (with its
    // own token), but only a TXT check makes it the owner (the custom
    // domains end-to-end test shows the move); bad names refused; an apex
    // gets A and AAAA.
    let r = add(&owner.0, "chat.example.org").await.unwrap();
    assert_eq!(r.status(), 409);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "domain_exists"
    );
    let r = add(&rival.0, "CHAT.example.org").await.unwrap();
    assert_eq!(r.status(), 201);
    let claim = r.json::<Value>().await.unwrap()["domain"].clone();
    assert_eq!(claim["state"], "pending_dns");
    assert_ne!(claim["records"][0]["value"], d["records"][0]["value"]);
    for bad in [
        "10.0.0.1",
        "x.clawdeploy.localhost",
        "*.example.org",
        "intranet",
    ] {
        assert_eq!(add(&owner.0, bad).await.unwrap().status(), 422, "{bad}");
    }
    let r = add(&owner.0, "example.net").await.unwrap();
    assert_eq!(r.status(), 201);
    let d = r.json::<Value>().await.unwrap()["domain"].clone();
    let kinds: Vec<(&str, &str)> = d["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["type"].as_str().unwrap(), r["value"].as_str().unwrap()))
        .collect();
    assert_eq!(kinds[1..], [("A", "203.0.113.7"), ("AAAA", "2001:db8::7")]);

    // The bound (2 here), the list, removal.
    let r = add(&owner.0, "third.example.org").await.unwrap();
    assert_eq!(r.status(), 409);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "domain_limit"
    );
    let list: Value = http
        .get(format!("{base}/api/instances/me/domains"))
        .bearer_auth(&owner.0)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["domains"].as_array().unwrap().len(), 2, "{list}");
    let delete = || {
        http.delete(format!("{base}/api/instances/me/domains/chat.example.org"))
            .bearer_auth(&owner.0)
            .send()
    };
    assert_eq!(delete().await.unwrap().status(), 204);
    assert_eq!(delete().await.unwrap().status(), 404);
    // The rival's claim is untouched by the owner's removal (and cannot
    // be made twice).
    assert_eq!(
        add(&rival.0, "chat.example.org").await.unwrap().status(),
        409
    );
}

/// Debian's `pebble-challtestsrv` on loopback: a DNS server whose records a
/// test sets through its management API. Killed when dropped.
struct Challtestsrv {
    child: std::process::Child,
    dns: std::net::SocketAddr,
    management: String,
}

impl Drop for Challtestsrv {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn challtestsrv() -> Challtestsrv {
    let (dns, management) = (free_port(), free_port());
    let child = std::process::Command::new("pebble-challtestsrv")
        .args(["-dns01", &format!("127.0.0.1:{dns}")])
        .args(["-management", &format!("127.0.0.1:{management}")])
        .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("pebble-challtestsrv (Debian's pebble; scripts/test installs it)");
    let management = format!("http://127.0.0.1:{management}");
    for _ in 0..100 {
        if reqwest::Client::new()
            .post(format!("{management}/clear-txt"))
            .json(&json!({"host": "warmup.example."}))
            .send()
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Challtestsrv {
        child,
        dns: format!("127.0.0.1:{dns}").parse().unwrap(),
        management,
    }
}

#[tokio::test]
async fn a_domain_is_verified_once_its_txt_record_holds_the_token() {
    let dns = challtestsrv().await;
    let app = app_with(Config {
        dns_nameservers: vec![dns.dns],
        ..Config::default()
    })
    .await;
    node(&app, "n1").await;
    idle(&app, "n1", 1).await;
    let base = serve(app.clone()).await;
    let s = register(&app, "dns@example.com", "").await;
    let c = claim::claim(&app, request(s.user_id, "dnsowner"))
        .await
        .unwrap();
    clawdeploy_scheduler::billing::tier::set_tier(
        &app,
        c.instance_id,
        clawdeploy_scheduler::model::Tier::Pro,
        "test",
    )
    .await
    .unwrap();
    let http = reqwest::Client::new();
    let d: Value = http
        .post(format!("{base}/api/instances/me/domains"))
        .bearer_auth(&s.token)
        .json(&json!({"hostname": "chat.example.org"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = d["domain"]["records"][0]["value"]
        .as_str()
        .unwrap()
        .to_owned();
    let verify = || async {
        let r = http
            .post(format!(
                "{base}/api/instances/me/domains/chat.example.org/verify"
            ))
            .bearer_auth(&s.token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json::<Value>().await.unwrap()["domain"].clone()
    };
    // No record yet (NXDOMAIN): still pending, and the customer is told why.
    let d = verify().await;
    assert_eq!(d["state"], "pending_dns", "{d}");
    assert!(
        d["reason"]
            .as_str()
            .unwrap()
            .contains("_clawdeploy-challenge.chat.example.org"),
        "{d}"
    );
    // A wrong value: still pending.
    let set = |value: String| {
        http.post(format!("{}/set-txt", dns.management))
            .json(&json!({"host": "_clawdeploy-challenge.chat.example.org.", "value": value}))
            .send()
    };
    set("not-the-token".into()).await.unwrap();
    assert_eq!(verify().await["state"], "pending_dns");
    // The token: verified at once (no cache between checks).
    http.post(format!("{}/clear-txt", dns.management))
        .json(&json!({"host": "_clawdeploy-challenge.chat.example.org."}))
        .send()
        .await
        .unwrap();
    set(token).await.unwrap();
    let d = verify().await;
    assert_eq!(
        (d["state"].as_str(), d["reason"].as_str()),
        (Some("verified"), Some("")),
        "{d}"
    );
}

#[tokio::test]
async fn acme_orders_wait_for_the_rate_caps_without_asking_the_ca() {
    // A CA nobody listens on: an order that reached it would fail loudly.
    let app = app_with(Config {
        acme: Some(clawdeploy_scheduler::acme::AcmeConfig {
            directory_url: "https://127.0.0.1:1/dir".into(),
            ca_bundle: None,
            contact: None,
        }),
        acme_orders_per_hostname_per_hour: 2,
        ..Config::default()
    })
    .await;
    let instance = instance(&app, "capped", None).await;
    sqlx::query(
        "INSERT INTO domains (hostname, instance_id, user_id, token, state)
         SELECT 'capped.example.org', id, user_id, 't', 'verified' FROM instances WHERE id = $1",
    )
    .bind(instance)
    .execute(&app.db)
    .await
    .unwrap();
    // Two orders for the name in the last hour (the oldest 50 minutes ago).
    sqlx::query(
        "INSERT INTO acme_orders (hostname, renewal, started_at, result)
         VALUES ('capped.example.org', false, now() - interval '50 minutes', 'failed'),
                ('capped.example.org', false, now() - interval '5 minutes', 'failed')",
    )
    .execute(&app.db)
    .await
    .unwrap();
    let tried = clawdeploy_scheduler::domains::issue::run_due(&app, 4)
        .await
        .unwrap();
    assert_eq!(tried, 1);
    let (state, reason, wait_secs): (String, String, f64) = sqlx::query_as(
        "SELECT state, reason, EXTRACT(EPOCH FROM next_attempt_at - now())::float8 FROM domains",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(state, "verified");
    assert!(reason.contains("rate limit"), "{reason}");
    // It waits until the oldest order leaves the hour: about 10 minutes.
    assert!((540.0..=600.0).contains(&wait_secs), "{wait_secs}");
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM acme_orders")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(orders, 2, "no order was started");
    // Nothing is due now.
    assert_eq!(
        clawdeploy_scheduler::domains::issue::run_due(&app, 4)
            .await
            .unwrap(),
        0
    );
}

/// A node whose state disk runs low gets no claims and no new pool
/// containers, and a claim already sent to it moves at once to a node
/// with room (its agent cannot write the config, nor its ledger).
#[tokio::test]
async fn a_node_low_on_disk_gets_no_claims_and_its_pending_claims_move() {
    let app = app().await;
    node(&app, "full").await;
    node(&app, "roomy").await;
    let on_full = idle(&app, "full", 2).await;
    idle(&app, "roomy", 1).await;
    // The oldest idle containers are on "full": a claim takes one there.
    let u1 = user(&app, "before-full@example.com").await;
    let first = claim::claim(&app, request(u1, "beforefull")).await.unwrap();
    assert_eq!(first.node_id, "full");
    assert!(on_full.contains(&first.container_id.unwrap()));

    // The agent reports 1 MiB free of 10 GiB.
    sqlx::query(
        "UPDATE nodes SET disk_total_bytes = 10737418240, disk_available_bytes = 1048576 WHERE id = 'full'",
    )
    .execute(&app.db)
    .await
    .unwrap();
    let u2 = user(&app, "after-full@example.com").await;
    let second = claim::claim(&app, request(u2, "afterfull")).await.unwrap();
    assert_eq!(second.node_id, "roomy", "no claim on a node low on disk");
    let s = settings::load(&app.db).await.unwrap();
    let nodes = capacity::schedulable_nodes(&app, &app.db, &s, None)
        .await
        .unwrap();
    assert_eq!(
        nodes.iter().map(|n| n.id.as_str()).collect::<Vec<_>>(),
        ["roomy"],
        "no pool containers on a node low on disk"
    );

    // The claim already on "full" moves now, not after the claim timeout.
    let touched = retry::retry_unconfirmed(&app).await.unwrap();
    assert!(
        touched.contains("full") && touched.contains("roomy"),
        "{touched:?}"
    );
    let (node_id, state): (String, String) = sqlx::query_as(
        "SELECT c.node_id, c.state::text FROM instances i JOIN containers c ON c.id = i.container_id WHERE i.id = $1",
    )
    .bind(first.instance_id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!((node_id.as_str(), state.as_str()), ("roomy", "assigning"));
    // A node with room keeps its claims until the timeout.
    assert!(retry::retry_unconfirmed(&app).await.unwrap().is_empty());
}

/// The version of the instance's own live route, if it has one.
async fn live_route_version(app: &App, instance: uuid::Uuid) -> Option<u64> {
    sqlx::query_scalar::<_, i64>(
        "SELECT version FROM routes WHERE instance_id = $1 AND NOT custom AND removed_at IS NULL",
    )
    .bind(instance)
    .fetch_optional(&app.db)
    .await
    .unwrap()
    .map(|v| v as u64)
}

/// Ages a claimed container past the claim and warm timeouts: its node
/// never confirmed it.
async fn unconfirmed_for_an_hour(app: &App, container: Option<Uuid>) {
    sqlx::query(
        "UPDATE containers SET claimed_at = now() - interval '1 hour', warm_at = now() - interval '1 hour' WHERE id = $1",
    )
    .bind(container)
    .execute(&app.db)
    .await
    .unwrap();
}

/// The instance's container now: its id, node and state.
async fn placed(app: &App, instance: Uuid) -> (Uuid, String, String) {
    sqlx::query_as(
        "SELECT c.id, c.node_id, c.state::text FROM instances i JOIN containers c ON c.id = i.container_id WHERE i.id = $1",
    )
    .bind(instance)
    .fetch_one(&app.db)
    .await
    .unwrap()
}

#[tokio::test]
async fn an_unconfirmed_claim_moves_off_the_silent_node_even_past_its_idle_containers() {
    let app = app().await;
    node(&app, "silent").await;
    node(&app, "other").await;
    let on_silent = idle(&app, "silent", 3).await;
    let u1 = user(&app, "moved@example.com").await;
    let first = claim::claim(&app, request(u1, "moved")).await.unwrap();
    assert_eq!(first.node_id, "silent");
    unconfirmed_for_an_hour(&app, first.container_id).await;
    let touched = retry::retry_unconfirmed(&app).await.unwrap();
    assert!(touched.contains("other"), "{touched:?}");
    // "silent" still has two idle containers; the retry skipped them and
    // created one on "other".
    let (_, node_id, state) = placed(&app, first.instance_id).await;
    assert_eq!((node_id.as_str(), state.as_str()), ("other", "assigning"));
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM containers WHERE node_id = 'silent' AND state = 'idle'"
        )
        .await,
        2
    );
    assert_eq!(
        count(&app, "SELECT count(*) FROM audit_log WHERE action = 'instance.claim_retry' AND detail->>'onDemand' = 'true'").await,
        1
    );

    // With "other" full, a second tenant's retry takes an idle container
    // on "silent" rather than failing.
    sqlx::query("UPDATE nodes SET max_containers = 1 WHERE id = 'other'")
        .execute(&app.db)
        .await
        .unwrap();
    let u2 = user(&app, "stays@example.com").await;
    let second = claim::claim(&app, request(u2, "stays")).await.unwrap();
    assert_eq!(second.node_id, "silent");
    unconfirmed_for_an_hour(&app, second.container_id).await;
    retry::retry_unconfirmed(&app).await.unwrap();
    let (now_on, node_id, state) = placed(&app, second.instance_id).await;
    assert_eq!((node_id.as_str(), state.as_str()), ("silent", "assigning"));
    assert!(on_silent.contains(&now_on) && Some(now_on) != second.container_id);
}
